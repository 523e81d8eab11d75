"""k-shot evaluation: peftlab's fixed demonstrations in the shared prefix against lm-evaluation-harness (issue 13).

    OMP_NUM_THREADS=1 python bench/kshot_bench.py --data ../shared/data/aclImdb_labeled.tar.gz --n 64 \
        --shots 0,4 --dtype fp32 --threads 1 --out bench/results/cpu-kshot-lmeval-fp32.json

One process, one SmolLM2-135M-Instruct loaded as peftlab loads it (the embedded GGUF, in --dtype), the same
balanced test reviews; for each k in --shots, one after the other:
  - peftlab   `prompt.shots=k` (fixed demonstrations, drawn as every peftlab run draws them), scored by
              `score_examples`: the demonstrations and the instruction are one prefix pass per evaluation, each
              review then runs behind that cache; timed from tokenising the reviews to the last score
  - lm-eval   lm-evaluation-harness 0.4.13's HFLM `loglikelihood` on the same model object, given each review's
              whole k-shot prompt as context text (bench/peers/prompt_text.py: the same demonstrations, template,
              cut reviews and label words) and the label words as continuations; it runs every prompt in full
Both count the same tokens: the k-shot prompt each review is scored behind (demonstrations + template +
review, in peftlab's token ids), summed over the reviews; tokens/s is that sum over each side's wall time.
Before any speed means something the prompts must be the same: the JSON says for how many (review, label)
pairs lm-eval's own token ids equal peftlab's, how many predictions agree, and how far the log-probabilities
lie apart (lm-eval's continuation also holds the prompt's final newline, a term the same for every label
word: the comparison is over the label words, log p(word | prompt) normalised over them, and the margin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's peftlab, not an installed one
sys.path.insert(0, str(ROOT))

from bench.peers import predict_with_lm_eval  # noqa: E402
from bench.peers.prompt_text import prompt_texts  # noqa: E402
from peftlab.config import build_config  # noqa: E402
from peftlab.data import load_splits  # noqa: E402
from peftlab.evaluate.scoring import build_rows, score_examples, shareable_prefix  # noqa: E402
from peftlab.models import load_base_model  # noqa: E402
from peftlab.repro import cpu_flags, git_commit, hardware  # noqa: E402
from peftlab.runs import make_task, sample_task  # noqa: E402


def run_peftlab(model, tokenizer, task, batch_size: int, max_tokens: int) -> dict:
    """peftlab's evaluation path: tokenise, build the rows, score (shared prefix included) in one timed region."""
    enc = task.encoder
    start = time.perf_counter()
    encoded = enc.encode(task.test, tokenizer)
    rows = build_rows(encoded, enc.label_ids)
    result = score_examples(model, rows, len(enc.classes), tokenizer.pad_token_id, 0, batch_size, max_tokens,
                            progress=False)
    seconds = time.perf_counter() - start
    prefix = shareable_prefix(model, rows, 0) or []
    return {"scores": result.scores.tolist(), "seconds": seconds, "score_seconds": result.seconds,
            "prompt_ids": [e.prompt_ids for e in encoded], "shared_prefix_tokens": len(prefix),
            # what the model runs: the prefix once, then each review's rest
            "input_tokens": len(prefix) + sum(len(r.seq) - len(prefix) for rs in rows for r in rs)}


def compare(peftlab: dict, lm_eval: dict, label_ids: list[list[int]]) -> dict:
    """Are the two sides scoring the same prompts, and do they give the same answers?"""
    same_ids = [[lm_eval["sequences"][k][c] == ids + label_ids[c] for c in range(len(label_ids))]
                for k, ids in enumerate(peftlab["prompt_ids"])]
    a, b = torch.tensor(peftlab["scores"]), torch.tensor(lm_eval["scores"])
    normalised = (a.log_softmax(1) - b.log_softmax(1)).abs().max(1).values  # per review, over the label words
    margin = ((a - a[:, :1]) - (b - b[:, :1])).abs().max(1).values           # against the first label word
    equal = torch.tensor([all(row) for row in same_ids])
    agree = a.argmax(1) == b.argmax(1)
    raw = b - a  # lm-eval's final-newline term (the same for every label word) plus rounding
    return {
        "token_ids_equal_pairs": sum(map(sum, same_ids)), "pairs": len(label_ids) * len(same_ids),
        "reviews_with_other_token_ids": [k for k, e in enumerate(equal.tolist()) if not e],
        "predictions_agree": int(agree.sum()), "reviews": len(agree),
        "max_abs_diff_logprob_over_label_words": float(normalised.max()),
        "max_abs_diff_logprob_over_label_words_same_ids": float(normalised[equal].max()) if equal.any() else None,
        "max_abs_diff_margin": float(margin.max()),
        "lm_eval_minus_peftlab_raw_range": [float(raw.min()), float(raw.max())],
    }


LSCPU_FIELDS = ("Model name", "CPU family", "Model", "Stepping", "Thread(s) per core", "Core(s) per socket")


def lscpu() -> dict:
    """lscpu's name of the CPU and its family/model numbers (a VM may show only a generic name)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs if key.strip() in LSCPU_FIELDS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=64, help="balanced test reviews")
    parser.add_argument("--shots", default="0,4", help="comma-separated k")
    parser.add_argument("--max-input-tokens", type=int, default=256, help="reviews and demonstrations cut to this")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the one model both sides score")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows a batch, both sides")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="peftlab's token budget a batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side per k, alternating")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shots = [int(k) for k in args.shots.split(",")]
    commit = git_commit()
    if commit is None or commit.endswith("-dirty"):
        print(f"warning: commit {commit}: figures from an uncommitted tree cannot be traced", file=sys.stderr)
    load_start = os.getloadavg()

    layer = {"data.source": args.data, "data.n_train": 0, "data.n_test": args.n, "model.dtype": args.dtype,
             "model.device": "cpu", "prompt.max_input_tokens": args.max_input_tokens}
    base = build_config(layer)
    model, tokenizer = load_base_model(base.model)
    splits = load_splits(base.data)
    samples = sample_task(base, splits, 0)  # the same test reviews for every k
    tasks = {k: make_task(build_config(layer, {"prompt.shots": k}), tokenizer, splits, samples) for k in shots}

    # Warm-up, not timed: the first forward passes of a process pay for oneDNN's kernel choices.
    warm = tasks[shots[0]]
    warm_rows = build_rows(warm.encoder.encode(warm.test[:2], tokenizer), warm.encoder.label_ids)
    score_examples(model, warm_rows, len(warm.encoder.classes), tokenizer.pad_token_id, 0, progress=False)
    predict_with_lm_eval(model, tokenizer, prompt_texts(warm.encoder, warm.test[:2], tokenizer),
                         warm.encoder.label_words, batch_size=args.batch_size)

    per_k = {}
    for k in shots:
        task = tasks[k]
        enc = task.encoder
        gold = [enc.classes.index(e.label) for e in task.test]
        texts = prompt_texts(enc, task.test, tokenizer)
        runs = {"peftlab": [], "lm-eval": []}
        for _ in range(args.repeats):
            runs["peftlab"].append(run_peftlab(model, tokenizer, task, args.batch_size, args.max_batch_tokens))
            runs["lm-eval"].append(predict_with_lm_eval(model, tokenizer, texts, enc.label_words,
                                                        batch_size=args.batch_size))
        ours, theirs = runs["peftlab"][0], runs["lm-eval"][0]
        prompt_tokens = sum(len(ids) for ids in ours["prompt_ids"])
        longest = max(len(ids) for ids in ours["prompt_ids"]) + max(map(len, enc.label_ids))
        if longest > theirs["max_length"] + 1:
            raise SystemExit(f"k={k}: a prompt of {longest} tokens exceeds lm-eval's window {theirs['max_length']}")
        sides = {}
        for name, rs in runs.items():
            seconds = statistics.median(r["seconds"] for r in rs)
            preds = torch.tensor(rs[0]["scores"]).argmax(1).tolist()
            sides[name] = {"seconds": [r["seconds"] for r in rs], "tokens_per_s": prompt_tokens / seconds,
                           "reviews_per_s": len(gold) / seconds, "input_tokens": rs[0]["input_tokens"],
                           "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
                           "predicted": {w: preds.count(c) for c, w in enumerate(enc.label_words)}}
        sides["lm-eval"]["own_prompt_tokens"] = theirs["prompt_tokens"]
        sides["lm-eval"]["setup_seconds"] = theirs["setup_seconds"]
        sides["peftlab"]["shared_prefix_tokens"] = ours["shared_prefix_tokens"]
        per_k[k] = {"prompt_tokens": prompt_tokens, "prompt_tokens_per_review_mean": prompt_tokens / len(gold),
                    "longest_prompt": longest - max(map(len, enc.label_ids)),
                    "lm_eval_max_length": theirs["max_length"],
                    "demonstrations": [d.id for d in enc.demonstrations], **sides,
                    "ratio_peftlab_over_lm_eval": sides["peftlab"]["tokens_per_s"] / sides["lm-eval"]["tokens_per_s"],
                    "agreement": compare(ours, theirs, enc.label_ids)}
        print(json.dumps({k: {s: per_k[k][s]["tokens_per_s"] for s in runs}
                          | {"ratio": per_k[k]["ratio_peftlab_over_lm_eval"], **per_k[k]["agreement"]}}),
              flush=True)

    import peftlab

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": commit, "peftlab_file": peftlab.__file__,
        "command": " ".join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
                            + ["python", *sys.argv]),
        "hardware": hardware(), "lscpu": lscpu(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512f"))),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "versions": {name: version(name) for name in ("torch", "transformers", "lm-eval")},
        "dtype": args.dtype, "model_dtype": str(next(model.parameters()).dtype), "model": base.model.name,
        "n": args.n, "max_input_tokens": args.max_input_tokens, "truncation": base.prompt.truncation,
        "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "repeats": args.repeats,
        "label_words": tasks[shots[0]].encoder.label_words,
        "tokens_counted": "the k-shot prompt each review is scored behind (demonstrations + template + cut review), "
                          "in peftlab's token ids, summed over the reviews; the same count for both sides",
        "shots": per_k,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
