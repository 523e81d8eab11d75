"""Evaluation benchmark: peftlab's zero-shot scoring against the tools users would pick instead.

    python bench/eval_bench.py --data ../shared/data/aclImdb_labeled.tar.gz --n 64

Same model (SmolLM2-135M-Instruct), same reviews, same Alpaca prompts (reviews cut to the same
token budget), one process, run one after the other:
  - peftlab      score_examples: one forward pass per review, LM head only at the scored position,
                 length-grouped right-padded batches, bf16 on this CPU
  - generate     the study's / notebooks' way: model.generate() + parsing the answer, in the model's
                 default precision (fp32), bench/peers/generate_peer.py
  - lm-eval      EleutherAI lm-evaluation-harness's HF backend scoring the two label words as
                 loglikelihood requests, on the same bf16 model as peftlab (bench/peers/lm_eval_peer.py)
Prints reviews/s, tokens/s, accuracy, agreement of the predictions, the ratios, and the hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers.prompt_text import prompt_texts  # noqa: E402
from peftlab.config import build_config  # noqa: E402
from peftlab.evaluate.scoring import build_rows, score_examples  # noqa: E402
from peftlab.models import load_base_model  # noqa: E402
from peftlab.repro import hardware  # noqa: E402
from peftlab.runs import load_task  # noqa: E402


def run_peftlab(model, tokenizer, task, batch_size: int) -> dict:
    encoded = task.encoder.encode(task.test, tokenizer)
    rows = build_rows(encoded, task.encoder.label_ids)
    start = time.perf_counter()
    result = score_examples(model, rows, 2, tokenizer.pad_token_id, 0, batch_size, 16384, progress=False)
    seconds = time.perf_counter() - start  # includes batching, not only the forward passes
    return {"preds": result.scores.argmax(1).tolist(), "seconds": seconds, "tokens": result.tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=64, help="balanced test reviews")
    parser.add_argument("--max-input-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12,
                        help="the generate peer's answer budget: SmolLM2 answers 'The movie review is ...' before the "
                             "label word, which 4 tokens never reach (64/64 answers unparsed, measured)")
    parser.add_argument("--skip", default="", help="comma-separated peers to skip: generate,lm-eval")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    cfg = build_config({"data.source": args.data, "data.n_train": 0, "data.n_test": args.n,
                        "prompt.max_input_tokens": args.max_input_tokens})
    model, tokenizer = load_base_model(cfg.model)
    task = load_task(cfg, tokenizer, n_train=0)
    gold = [task.encoder.classes.index(e.label) for e in task.test]
    prompts = prompt_texts(task.encoder, task.test, tokenizer)  # the peers get text: the same prompts
    words = task.encoder.label_words
    results: dict[str, dict] = {}

    results["peftlab-bf16"] = run_peftlab(model, tokenizer, task, args.batch_size)
    if "lm-eval" not in skip:
        from bench.peers import predict_with_lm_eval

        results["lm-eval-bf16"] = predict_with_lm_eval(model, tokenizer, prompts, words, batch_size=args.batch_size)
    fp32 = model.float()  # the model's default precision (what from_pretrained gives without dtype=)
    results["peftlab-fp32"] = run_peftlab(fp32, tokenizer, task, args.batch_size)
    if "generate" not in skip:
        from bench.peers import predict_by_generate

        results["generate-fp32"] = predict_by_generate(fp32, tokenizer, prompts, words, batch_size=args.batch_size,
                                                       max_new_tokens=args.max_new_tokens)

    prompt_tokens = results["peftlab-bf16"]["tokens"]
    table = {}
    for name, r in results.items():
        preds = r["preds"]
        table[name] = {
            "reviews_per_s": len(preds) / r["seconds"],
            "prompt_tokens_per_s": prompt_tokens / r["seconds"],
            "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
            "unparsed": sum(p is None for p in preds),
            "agreement_with_peftlab_bf16": sum(p == q for p, q in zip(preds, results["peftlab-bf16"]["preds"]))
            / len(preds),
            "seconds": r["seconds"],
        }
    base = table["peftlab-bf16"]["reviews_per_s"]
    for name in table:
        table[name]["peftlab_speedup"] = base / table[name]["reviews_per_s"]
    report = {"n": args.n, "max_input_tokens": args.max_input_tokens, "batch_size": args.batch_size,
              "generate_max_new_tokens": args.max_new_tokens,
              "prompt_tokens": prompt_tokens, "hardware": hardware(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": table}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
