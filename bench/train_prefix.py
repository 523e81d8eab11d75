"""One lever, A/B in one process: the shared prompt prefix in training (run once per batch, or per row).

    python bench/train_prefix.py --data ../shared/data/aclImdb_labeled.tar.gz --max-input-tokens 128

SmolLM2-135M-Instruct in bf16, LoRA r=8 alpha=16 d=0 (peftlab shares the prefix only without dropout:
with it, one pass would draw one mask for the whole batch) or, with `--method prompt-tuning`, prompt
tuning with peftlab's defaults, batch 8: peftlab's `fit` over the same
training reviews with `share_prefix=False` and `True`, alternating `--reps` times (the adapter keeps
training across epochs; speed does not depend on that). Prints tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftlab.config import build_config  # noqa: E402
from peftlab.evaluate.scoring import build_rows  # noqa: E402
from peftlab.models import attach_method, load_base_model  # noqa: E402
from peftlab.models.methods import prompt_init_ids  # noqa: E402
from peftlab.repro import hardware  # noqa: E402
from peftlab.runs import load_task  # noqa: E402
from peftlab.train.loop import Objective, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--max-input-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--method", default="lora", help="lora (d=0) or prompt-tuning (peftlab's defaults)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = build_config({"data.source": args.data, "data.n_train": args.n_train, "data.n_test": 8,
                        "prompt.max_input_tokens": args.max_input_tokens, "train.epochs": 1,
                        "train.batch_size": 8, "method.method": args.method, "method.lora_dropout": 0.0})
    model, tokenizer = load_base_model(cfg.model)
    task = load_task(cfg, tokenizer)
    encoded = task.encoder.encode(task.train, tokenizer)
    rows = build_rows(encoded, task.encoder.label_ids, gold_only=True)
    gold = [e.label for e in encoded]
    init_ids = prompt_init_ids(cfg.method, tokenizer, task.encoder.instruction, task.encoder.label_ids)
    peft_model = attach_method(model, cfg.method, init_ids, seed=0)
    speeds = {"per_row": [], "shared": []}
    for _ in range(args.reps):
        for name, share in (("per_row", False), ("shared", True)):
            start = time.perf_counter()
            objective = Objective(rows, gold, 2, tokenizer.pad_token_id, cfg.train.loss)
            history = fit(peft_model, objective, cfg.train, progress=False, share_prefix=share)
            speeds[name].append(history[0].tokens / (time.perf_counter() - start))
            print(f"{name}: {speeds[name][-1]:.0f} tok/s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "torch": torch.__version__, "method": args.method,
              "max_input_tokens": args.max_input_tokens, "n_train": args.n_train,
              "prefix_tokens": len(task.encoder.prefix_ids),
              "mean_row_tokens": sum(len(r[0].seq) for r in rows) / len(rows), "tokens_per_s": speeds,
              "speedup_of_medians": statistics.median(speeds["shared"]) / statistics.median(speeds["per_row"])}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
