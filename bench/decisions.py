"""Zero-shot accuracy and macro-F1 of every eval.score_norm x eval.calibration, from one scoring pass.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/decisions.py --data ../shared/data/aclImdb_labeled.tar.gz \
        --labels rating-4 --n-test 200 --n-val 40 --dtype fp32 --out bench/results/decisions-rating4-200.json

Six `peftlab eval` runs (configs/sweeps/smollm2-rating4.yaml) would score the same reviews six times; with
four label words of one and two tokens that is 4 rows a review, so one pass here is worth ~3 hours on a
2-core CPU at 2000 reviews.

The test reviews, the content-free inputs and a balanced validation sample of the training split
(disjoint from the test split; fit_prior's data) are scored once with peftlab's scorer; each setting
then decides through peftlab.evaluate.calibration.decide, as `peftlab eval` does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from peftlab.config import EvalConfig, build_config
from peftlab.data.sampling import balanced_sample
from peftlab.evaluate.calibration import SCORE_NORMS, decide, fit_prior, normalise_scores
from peftlab.evaluate.metrics import classification_metrics
from peftlab.evaluate.scoring import build_rows, read_ids, score_examples
from peftlab.models import load_base_model
from peftlab.models.methods import load_adapter, position_offset
from peftlab.repro import cpuinfo_field, git_commit, hardware
from peftlab.runs import load_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", default="rating-4")
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--adapter", help="a trained adapter folder (peftlab train's adapter/): its decisions "
                        "instead of the base model's zero-shot ones")
    parser.add_argument("--model", default="smollm2", help="model.name (smollm2, gemma3-270m, a folder, ...)")
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto: bf16 where the CPU computes it fast)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = build_config({"data.source": args.data, "data.labels": args.labels, "data.n_train": 0,
                        "data.n_test": args.n_test, "model.name": args.model, "model.dtype": args.dtype,
                        "prompt.shots": args.shots})
    model, tok = load_base_model(cfg.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    task = load_task(cfg, tok)
    enc, k = task.encoder, len(task.encoder.classes)
    offset = position_offset(model)  # virtual tokens of a prompt-learning adapter shift every position
    score = lambda rows: score_examples(model, rows, k, tok.pad_token_id, offset, progress=False)  # noqa: E731
    start = time.perf_counter()
    test = enc.encode(task.test, tok)
    raw = score(build_rows(test, read_ids(model, enc.label_ids)))
    val_examples = balanced_sample(task.splits.train, args.n_val, task.splits.classes, 0, "val")
    val = enc.encode(val_examples, tok)
    val_raw = score(build_rows(val, read_ids(model, enc.label_ids))).scores
    cached = {}

    def score_rows(rows):  # the content-free inputs, scored once and reused by every setting
        if "cf" not in cached:
            cached["cf"] = score(rows).scores
        return cached["cf"]

    gold = [e.label for e in test]
    results = []
    for norm in SCORE_NORMS:
        for calibration in ("none", "content-free", "val"):
            offsets = None
            if calibration == "val":
                offsets = fit_prior(normalise_scores(val_raw, enc.label_ids, enc.bare_words, norm),
                                    [e.label for e in val])
            decided, info = decide(raw.scores, enc, EvalConfig(score_norm=norm, calibration=calibration), score_rows,
                                   tok, offsets)
            pred = decided.argmax(1).tolist()
            m = classification_metrics(gold, pred, enc.classes)
            results.append({"score_norm": norm, "calibration": calibration, "accuracy": m["accuracy"],
                            "ci95": m["ci95"], "macro_f1": m["macro_f1"], "confusion": m["confusion"]["matrix"],
                            "predicted_counts": [pred.count(c) for c in range(k)], "decision": info})
            print(f"{norm:6s} {calibration:13s} acc {100 * m['accuracy']:5.1f}  macro-F1 {100 * m['macro_f1']:5.1f}"
                  f"  predicted {results[-1]['predicted_counts']}", flush=True)
    out = {"args": vars(args), "classes": enc.classes, "label_ids": enc.label_ids, "n_test": len(test),
           "n_val": len(val), "scoring_seconds": time.perf_counter() - start, "test_tokens": raw.tokens,
           "torch_threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
           "hardware": hardware(), "cpu": cpuinfo_field("model name"), "git_commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
