"""Training benchmark: a LoRA epoch and a prompt-tuning epoch, peftlab against transformers.Trainer + peft.

    python bench/train_bench.py --data ../shared/data/aclImdb_labeled.tar.gz --n-train 96 --n-test 96

Same model (SmolLM2-135M-Instruct), same training reviews in the same prompts, same hyper-parameters,
one process. The peer is the standard recipe of peft's documentation (bench/peers/trainer_peer.py):
fp32 model, Trainer with bf16 autocast where this machine computes bf16 fast (peftlab's own test,
models/loading.py: choose_dtype), plain fp32 elsewhere, padded batches, causal-LM loss on the answer; peftlab
runs in its auto precision (the same choice). The report names each side's precision. Both trained
adapters are then scored by the same scorer on the same test reviews, so accuracy compares the training.
Reports training tokens/s, peak resident memory during training, accuracy, and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftlab.config import build_config  # noqa: E402
from peftlab.models import load_base_model  # noqa: E402
from peftlab.models.loading import choose_dtype  # noqa: E402
from peftlab.models.methods import build_peft_config  # noqa: E402
from peftlab.repro import hardware  # noqa: E402
from peftlab.runs import evaluate_examples, load_task, run_train  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start_rss = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start_rss) / 2**20


def peer_prompts(task, tokenizer, examples):
    enc = task.encoder
    prompts, targets = [], []
    for ex in examples:
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        prompts.append(enc.prefix_text + tokenizer.decode(enc.truncate(ids)) + enc.suffix_text)
        targets.append(enc.label_words[enc.classes.index(ex.label)])
    return prompts, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--max-input-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="lora,prompt-tuning")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: peftlab's, 0.1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                        help="precision of both sides (auto: bf16 where this CPU computes it natively, else fp32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from bench.peers import train_with_trainer

    report = {"n_train": args.n_train, "n_test": args.n_test, "max_input_tokens": args.max_input_tokens,
              "batch_size": args.batch_size, "hardware": hardware(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": {}}
    # On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 products run ~100x slower than fp32 (issue 15):
    # each side computes in the precision this machine is fast at, as a user's run would.
    fast_bf16 = choose_dtype(args.dtype, torch.device("cpu")) == torch.bfloat16
    report["precision"] = {"peftlab": "bf16" if fast_bf16 else "fp32",
                           "trainer_peer": "fp32 weights, bf16 autocast" if fast_bf16 else "fp32"}
    for method in args.methods.split(","):
        layer = {"data.source": args.data, "data.n_train": args.n_train, "data.n_test": args.n_test,
                 "prompt.max_input_tokens": args.max_input_tokens, "train.epochs": 1,
                 "train.batch_size": args.batch_size, "method.method": method, "out": f"/tmp/train-bench/{method}",
                 "model.dtype": "bf16" if fast_bf16 else "fp32"}
        if args.lora_dropout is not None and method == "lora":
            layer["method.lora_dropout"] = args.lora_dropout
        cfg = build_config(layer)
        model, tokenizer = load_base_model(cfg.model)  # auto: bf16 on a CPU with AVX512-BF16, else fp32
        with PeakRSS() as mem:
            metrics = run_train(cfg, model, tokenizer, progress=False)
        ours = {"tokens_per_s": metrics["train_tokens_per_s"], "train_seconds": metrics["timings"]["train_s"],
                "peak_extra_rss_mb": mem.extra_mb, "accuracy": metrics["accuracy"], "lr": metrics["lr"],
                "loss": cfg.train.loss}

        task = load_task(cfg, tokenizer)
        prompts, targets = peer_prompts(task, tokenizer, task.train)
        fp32, _ = load_base_model(build_config({"model.dtype": "fp32"}).model)
        with PeakRSS() as mem:
            peer = train_with_trainer(copy.deepcopy(fp32), tokenizer, prompts, targets, build_peft_config(cfg.method),
                                      epochs=1, lr=metrics["lr"], batch_size=args.batch_size, seed=0, bf16=fast_bf16)
        peer_model = peer["model"].to(torch.bfloat16 if fast_bf16 else torch.float32).eval()
        peer_metrics, _, _ = evaluate_examples(peer_model, tokenizer, task.encoder, task.test, cfg, progress=False)
        theirs = {"tokens_per_s": peer["tokens_per_s"], "train_seconds": peer["seconds"],
                  "peak_extra_rss_mb": mem.extra_mb, "accuracy": peer_metrics["accuracy"]}
        report["lora_dropout"] = cfg.method.lora_dropout
        report["results"][method] = {"peftlab": ours, "trainer_peer": theirs,
                                     "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"]}
        print(json.dumps({method: report["results"][method]}, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
