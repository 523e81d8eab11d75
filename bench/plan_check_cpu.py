"""The memory planner against measurement on this CPU: SmolLM2, one LoRA training step and one eval batch.

    PYTHONPATH=src python bench/plan_check_cpu.py --out bench/results/plan-check-cpu-smollm2.json   # ~1 min, 2 cores

Measured as the rise of the process's resident memory above its level after the model is loaded and
LoRA attached: the peak is reset before each phase (`/proc/self/clear_refs` 5, Linux >= 4.0) and read
from VmHWM afterwards; freed heap is handed back to the OS first (malloc_trim), so that memory the
loader freed does not hide the step's own. `resource.getrusage` maxrss is reported beside it.
Each measurement runs twice, in fresh processes: with glibc's default heap, whose dynamic mmap
threshold keeps freed blocks resident (30-40% more RSS than live tensors, measured), and with
MALLOC_MMAP_THRESHOLD_=65536, where resident memory follows the live tensors (what the planner
predicts, as torch.cuda.max_memory_allocated does on a GPU).
The planner's prediction for the same phase is everything but what is already resident at the start
(weights, adapters, runtime). Rows are random token ids (memory does not depend on their values) in
peftlab's own code path (build_rows, batch_loss, example_scores), right-padded as peftlab pads them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftlab.config import MethodConfig, ModelConfig  # noqa: E402
from peftlab.evaluate.scoring import build_rows, example_scores  # noqa: E402
from peftlab.models import attach_method, load_base_model  # noqa: E402
from peftlab.models.planner import GIB, PlanRequest, plan_memory, read_model_shape  # noqa: E402
from peftlab.prompts.encoding import EncodedExample  # noqa: E402
from peftlab.train.loop import batch_loss  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def settle() -> int:
    """Free what can be freed, reset the peak to the current RSS; returns the current RSS in bytes."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS") * 1024


def rows_of(n: int, max_len: int, vocab: int, rng: random.Random):
    # Lengths step down by 3 tokens, as length-grouped batches of real reviews do: K = n distinct positions.
    examples = [EncodedExample(str(i), [rng.randrange(3, vocab) for _ in range(max_len - 3 * i)], i % 2, False)
                for i in range(n)]
    return build_rows(examples, [[1000], [2000]], gold_only=False), [e.label for e in examples]


def main() -> None:
    """Measure twice, each in a fresh process: glibc's default heap, and with a fixed mmap threshold."""
    import os
    import subprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args, rest = parser.parse_known_args()
    report = {}
    for label, env in (("default_malloc", {}), ("fixed_mmap_threshold", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        proc = subprocess.run([sys.executable, __file__, "--measure", *rest], env={**os.environ, **env},
                              capture_output=True, text=True, check=True)
        report[label] = json.loads(proc.stdout[proc.stdout.index("{"):])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def measure() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=1, help="steady steps measured after the first")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_base_model(ModelConfig(name="smollm2", device="cpu"))
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[next(model.parameters()).dtype]
    method = MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=args.lora_dropout)
    peft_model = attach_method(model, method, seed=0)
    rng = random.Random(0)
    train_rows, gold = rows_of(args.batch_size, args.seq_len, len(tokenizer), rng)
    eval_rows, _ = rows_of(args.eval_batch_size, args.seq_len, len(tokenizer), rng)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    report = {"model": "smollm2 (SmolLM2-135M-Instruct)", "dtype": dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "eval_batch_size": args.eval_batch_size, "lora_dropout": args.lora_dropout,
              "date": time.strftime("%Y-%m-%d")}

    def train_step() -> None:
        peft_model.train()
        loss = batch_loss(peft_model, train_rows, torch.tensor(gold), 2, tokenizer.pad_token_id, 0, "lm")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_batch() -> None:
        with torch.inference_mode():
            peft_model.eval()
            example_scores(peft_model, eval_rows, 2, tokenizer.pad_token_id, 0)

    # The first step also allocates what stays for the process's life (oneDNN kernels and caches,
    # autograd's threads, Adam's state): measured on its own, then the steady steps after it.
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["resident_after_load_gib"] = settle() / GIB
    for name, phase in [("train", train_step), ("eval", eval_batch)] * (1 + args.repeats):
        base = settle()
        start = time.perf_counter()
        phase()
        report.setdefault(f"{name}_seconds", []).append(time.perf_counter() - start)
        report.setdefault(f"{name}_measured_each_gib", []).append((status_kib("VmHWM") * 1024 - base) / GIB)
        if name == "train" and "train_maxrss_rise_gib" not in report:
            report["train_maxrss_rise_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                                               - maxrss_before) / GIB
    for name in ("train", "eval"):
        steady = report[f"{name}_measured_each_gib"][1:]
        report[f"{name}_measured_gib"] = sum(steady) / len(steady)

    shape = read_model_shape("smollm2")
    req = PlanRequest(method="lora", dtype=dtype, device="cpu", batch_size=args.batch_size, seq_len=args.seq_len,
                      lora_dropout=args.lora_dropout, eval_batch_size=args.eval_batch_size,
                      max_batch_tokens=args.eval_batch_size * args.seq_len)
    plan = plan_memory(shape, req)
    resident = ("weights", "adapters", "runtime")  # already there when the measurement starts
    report["train_predicted_gib"] = sum(v for k, v in plan.train.items() if k not in resident) / GIB
    report["eval_predicted_gib"] = sum(v for k, v in plan.eval.items() if k not in resident + ("optimiser",)) / GIB
    report["train_components_gib"] = {k: v / GIB for k, v in plan.train.items()}
    report["eval_components_gib"] = {k: v / GIB for k, v in plan.eval.items()}
    report["predicted_weights_adapters_runtime_gib"] = sum(plan.train[k] for k in resident) / GIB
    for part in ("train", "eval"):
        report[f"{part}_error"] = report[f"{part}_predicted_gib"] / report[f"{part}_measured_gib"] - 1
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    measure() if "--measure" in sys.argv else main()
