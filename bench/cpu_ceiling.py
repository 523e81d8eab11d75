"""What this CPU can do for a model's shapes: the ceiling that peftlab's CPU speeds are measured against.

    python bench/cpu_ceiling.py --model smollm2 --out bench/results/cpu-ceiling-smollm2.json
    python bench/cpu_ceiling.py --dtype fp32 --threads 1 --out bench/results/cpu-ceiling-smollm2-fp32-1t.json

Measures, in one process:
  - GFLOP/s of torch's bf16 and fp32 matrix products (oneDNN) for the model's own projection shapes
    (hidden -> hidden, hidden -> kv, hidden -> intermediate, intermediate -> hidden) and a large
    square product, at the row counts of an evaluation batch;
  - the transformer body alone (no LM head) in --dtype (default: peftlab's own choice for this CPU, bf16
    where it computes bf16 natively, else fp32), batch x tokens as evaluation runs it.
The ceilings are derived in that same precision. bf16 products are timed only where the CPU has native bf16
(AVX512-BF16 or AMX): elsewhere they run at ~1 GFLOP/s and one shape would take minutes.
From the model's FLOPs per token (2 x matrix parameters of the body, + attention at that length) it
derives the ceilings: evaluation tok/s at the measured GEMM rate (2 FLOPs per parameter and token)
and LoRA / prompt-tuning training tok/s (4: the forward pass and the backward pass through frozen
weights, without their weight gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from peftlab.config import ModelConfig  # noqa: E402
from peftlab.models import load_base_model  # noqa: E402
from peftlab.models.loading import DTYPES, choose_dtype, cpu_has_fast_bf16  # noqa: E402
from peftlab.repro import hardware  # noqa: E402


def seconds_per_call(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def gemm_gflops(rows: int, k: int, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    a, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    with torch.inference_mode():
        return 2 * rows * k * n / seconds_per_call(lambda: torch.nn.functional.linear(a, w), reps) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per row of the body-only batch")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                        help="precision of the body test and the ceilings (auto: what peftlab computes in here)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = choose_dtype(args.dtype, torch.device("cpu"))
    name = {v: k for k, v in DTYPES.items()}[dtype]

    model, _ = load_base_model(ModelConfig(name=args.model, dtype=name, device="cpu"))
    report = {"model": args.model, **measure(model, name, args.batch_size, args.tokens)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def measure(model, name: str, batch_size: int, tokens: int) -> dict:
    """GEMM rates for the model's shapes, the body alone, and the ceilings derived from them, in `name`
    (bf16 or fp32); bench/fp32_shares.py calls this beside peftlab's own runs."""
    cfg = model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    rows = batch_size * tokens
    shapes = {"hidden->hidden": (h, h), "hidden->kv": (h, kv), "hidden->intermediate": (h, inter),
              "intermediate->hidden": (inter, h), "4096->4096": (4096, 4096)}
    gemm = {dtype_name: {shape: gemm_gflops(rows, k, n, gemm_dtype, reps=3 if k == 4096 else 10)
                         for shape, (k, n) in shapes.items()}
            for dtype_name, gemm_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
            if dtype_name == name or cpu_has_fast_bf16()}

    # Matrix parameters of the body: q, o (h x h), k, v (h x kv), gate, up, down (h x inter).
    matrix_params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention_flops = layers * 2 * 2 * h * tokens / 2  # QK^T and AV over a causal (half) window
    flops_per_token = 2 * matrix_params + attention_flops
    ids = torch.randint(10, cfg.vocab_size - 10, (batch_size, tokens))
    with torch.inference_mode():
        body_s = seconds_per_call(lambda: model.model(input_ids=ids), reps=3)
    body_tok_s = rows / body_s
    # GFLOP/s over the body's mix of shapes: each shape's share of the FLOPs at its own rate (time adds up).
    shares = (("hidden->hidden", 2 * h * h), ("hidden->kv", 2 * h * kv), ("hidden->intermediate", 2 * h * inter),
              ("intermediate->hidden", inter * h))
    rate = sum(w for _, w in shares) / sum(w / gemm[name][k] for k, w in shares)
    return {
        "batch": [batch_size, tokens], "hardware": hardware(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "gemm_gflops": gemm, "body_matrix_parameters": matrix_params, "flops_per_token_forward": flops_per_token,
        "dtype": name, "cpu_has_fast_bf16": cpu_has_fast_bf16(), "load_average": list(os.getloadavg()),
        f"body_mix_{name}_gflops": rate,
        f"body_only_{name}_tok_s": body_tok_s,
        f"body_only_{name}_gflops": body_tok_s * flops_per_token / 1e9,
        "ceiling_eval_tok_s": rate * 1e9 / flops_per_token,
        "ceiling_train_tok_s": rate * 1e9 / (2 * flops_per_token),
    }


if __name__ == "__main__":
    main()
