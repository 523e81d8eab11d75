"""peftlab's fp32 CPU speeds as shares of this CPU's fp32 ceiling, measured in one process (issue 15).

    OMP_NUM_THREADS=1 python bench/fp32_shares.py --data ../shared/data/aclImdb_labeled.tar.gz --threads 1 \
        --out bench/results/fp32-shares.json

In this order, with the same loaded SmolLM2 model in fp32 (the precision a CPU without native bf16 computes
fast, and what `--dtype fp32` forces anywhere):
  1. the ceiling (bench/cpu_ceiling.py `measure`: GEMM rates for the model's shapes, the body alone);
  2. peftlab evaluation (`run_eval`, zero-shot, --n-test balanced reviews);
  3. peftlab LoRA training (`run_train`, --n-train reviews, one epoch, r=8);
  4. the ceiling again, so a neighbour's load changing mid-run shows as two different ceilings.
Each share is the run's own tok/s (the figure in its metrics.json) over the ceiling range of 1 and 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_ceiling import measure  # noqa: E402
from peftlab.config import ModelConfig, build_config  # noqa: E402
from peftlab.models import load_base_model  # noqa: E402
from peftlab.repro import cpu_flags  # noqa: E402
from peftlab.runs import run_eval, run_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--max-input-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model(ModelConfig(name="smollm2", dtype="fp32", device="cpu"))
    before = measure(model, "fp32", 16, args.max_input_tokens)
    layer = {"model.dtype": "fp32", "model.device": "cpu", "data.source": args.data,
             "prompt.max_input_tokens": args.max_input_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        evaluated = run_eval(build_config(layer, {"data.n_train": 0, "data.n_test": args.n_test,
                                                  "out": f"{tmp}/eval"}), model, tokenizer, progress=False)
        trained = run_train(build_config(layer, {"data.n_train": args.n_train, "data.n_test": 16,
                                                 "method.method": "lora", "method.lora_r": 8,
                                                 "method.lora_alpha": 16, "train.epochs": 1,
                                                 "out": f"{tmp}/train"}), model, tokenizer, progress=False)
    after = measure(model, "fp32", 16, args.max_input_tokens)
    ceilings = {kind: sorted([before[f"ceiling_{kind}_tok_s"], after[f"ceiling_{kind}_tok_s"]])
                for kind in ("eval", "train")}
    speeds = {"eval": evaluated["eval_tokens_per_s"], "train": trained["train_tokens_per_s"]}
    report = {
        "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "hardware": before["hardware"],
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "load_average_end": list(os.getloadavg()), "ceiling_before": before, "ceiling_after": after,
        "tok_s": speeds, "ceiling_tok_s": ceilings,
        "share_of_ceiling": {k: [speeds[k] / ceilings[k][1], speeds[k] / ceilings[k][0]] for k in speeds},
        "eval_accuracy": evaluated["accuracy"], "n_test": args.n_test, "n_train": args.n_train,
        "max_input_tokens": args.max_input_tokens,
    }
    print(json.dumps({k: report[k] for k in ("threads", "tok_s", "ceiling_tok_s", "share_of_ceiling")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
