"""GPU check: LoRA training and evaluation throughput of a LLaMA-2-7B-shaped model, peftlab vs the peer.

    PYTHONPATH=src python bench/gpu_bench.py --out bench/gpu.json     # one H100, < 8 minutes

The model is initialised at random from a config (no download: speed and memory do not depend on
the weights' values), in bf16. Inputs are random token rows whose lengths follow IMDB reviews cut
at 512 tokens. Measured, in one process and on the same rows:
  - peftlab LoRA training (peftlab.train.loop.fit: length-grouped batches, logits at the label only)
  - the peer: transformers.Trainer + peft LoRA, padded batches, causal-LM loss on the label token
  - peftlab evaluation (score_examples: one pass per example, logits at the scored position)
  - peak GPU memory of each, model FLOPs utilisation (MFU) against the H100's 989 TFLOP/s bf16 dense
  - the memory planner's prediction (peftlab.models.planner, when present) against the measured peak
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftlab.config import MethodConfig, TrainConfig  # noqa: E402
from peftlab.evaluate.scoring import build_rows, score_examples  # noqa: E402
from peftlab.models import attach_method, trainable_parameters  # noqa: E402
from peftlab.models.methods import detach_method  # noqa: E402
from peftlab.prompts.encoding import EncodedExample  # noqa: E402
from peftlab.train.loop import Objective, fit  # noqa: E402

H100_BF16_DENSE = 989e12
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script only
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
LABEL_IDS = [[1000], [2000]]  # two single-token label words


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def random_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    return model


def synthetic_examples(n: int, max_len: int, seed: int) -> list[EncodedExample]:
    # IMDB reviews are ~300 tokens on average and a third exceed 512: lengths from that shape.
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = min(max_len, max(64, int(rng.lognormvariate(math.log(280), 0.6)))) + 60  # + template
        out.append(EncodedExample(str(i), [rng.randrange(3, 31000) for _ in range(length)], i % 2, False))
    return out


def n_params(model) -> int:
    """Parameters that cost FLOPs at every token: all but the embedding and the LM head.

    peftlab runs the LM head only where a label is scored, so per-token work is 2 x this (forward);
    counting the head would flatter peftlab's MFU against the peer, which runs it everywhere.
    """
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    skip = {id(head), id(embed)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def bench_peftlab_train(model, examples, batch_size: int, steps: int) -> dict:
    peft_model = attach_method(model, MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1), seed=0)
    rows = build_rows(examples[: batch_size * steps], LABEL_IDS, gold_only=True)
    gold = [e.label for e in examples[: batch_size * steps]]
    cfg = TrainConfig(epochs=1, lr=5e-4, batch_size=batch_size)
    sync()
    reset_peak()
    # A warm-up epoch on 2 batches (kernels, allocator), then the timed epoch.
    fit(peft_model, Objective(rows[: 2 * batch_size], gold[: 2 * batch_size], 2, 0, "lm"), cfg, progress=False)
    sync()
    start = time.perf_counter()
    history = fit(peft_model, Objective(rows, gold, 2, 0, "lm"), cfg, progress=False)
    sync()
    seconds = time.perf_counter() - start
    tokens = history[0].tokens
    trainable, total = trainable_parameters(peft_model)
    detach_method(peft_model)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gpu_gb": peak_gb(), "trainable_parameters": trainable}


def peer_dataset(examples) -> list[dict]:
    """The peer's rows: prompt + label token, with the loss masked (-100) everywhere but the label."""
    return [{"input_ids": e.prompt_ids + LABEL_IDS[e.label],
             "labels": [-100] * len(e.prompt_ids) + LABEL_IDS[e.label]} for e in examples]


def pad_collate(batch: list[dict]) -> dict:
    """Right-pad a batch to its longest row, as the standard data collators do."""
    width = max(len(b["input_ids"]) for b in batch)

    def pad(rows, value):
        return [row + [value] * (width - len(row)) for row in rows]
    return {"input_ids": torch.tensor(pad([b["input_ids"] for b in batch], 0)),
            "attention_mask": torch.tensor(pad([[1] * len(b["input_ids"]) for b in batch], 0)),
            "labels": torch.tensor(pad([b["labels"] for b in batch], -100))}


def bench_trainer_peer(model, examples, batch_size: int, steps: int) -> dict:
    """transformers.Trainer + peft LoRA as peft's docs show it; padded batches, loss on the label token."""
    import peft
    from transformers import Trainer, TrainingArguments

    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                             task_type="CAUSAL_LM"))
    data = peer_dataset(examples[: batch_size * steps])
    args = TrainingArguments(output_dir="/tmp/peer", per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=5e-4, bf16=True, use_cpu=DEVICE == "cpu", report_to=[], save_strategy="no", logging_steps=50,
                             seed=0, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data[: 2 * batch_size], data_collator=pad_collate)
    trainer.train()  # warm-up
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, data_collator=pad_collate)
    sync()
    reset_peak()
    start = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(d["input_ids"]) for d in data)
    peft_model.unload()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gpu_gb": peak_gb()}


def bench_eval(model, examples, batch_size: int, max_tokens: int) -> dict:
    rows = build_rows(examples, LABEL_IDS)
    score_examples(model, rows[:batch_size], 2, 0, 0, batch_size, max_tokens, progress=False)  # warm-up
    sync()
    reset_peak()
    result = score_examples(model, rows, 2, 0, 0, batch_size, max_tokens, progress=False)
    sync()
    return {"tokens": result.tokens, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
            "peak_gpu_gb": peak_gb()}


def planner_prediction(shape: str, batch_size: int, seq_len: int, eval_batch_size: int,
                       max_batch_tokens: int) -> dict | None:
    try:
        from peftlab.models import planner
    except ImportError:
        return None
    try:
        return planner.plan_from_shape(SHAPES[shape], method="lora", batch_size=batch_size, seq_len=seq_len,
                                       eval_batch_size=eval_batch_size, max_batch_tokens=max_batch_tokens)
    except Exception as exc:  # the planner is optional here; report why it could not answer
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=24)
    parser.add_argument("--eval-examples", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (cpu smoke test)", "torch": torch.__version__, "shape": args.shape,
              "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size}
    t0 = time.perf_counter()
    model = random_model(args.shape)
    n = n_params(model)
    report["parameters_without_embeddings"] = n
    report["init_s"] = time.perf_counter() - t0
    examples = synthetic_examples(max(args.batch_size * args.train_steps, args.eval_examples), args.max_len, 0)
    report["eval"] = bench_eval(model, examples[: args.eval_examples], args.eval_batch_size, args.max_batch_tokens)
    report["eval"]["mfu"] = 2 * n * report["eval"]["tokens_per_s"] / H100_BF16_DENSE
    print(json.dumps(report["eval"]), flush=True)
    report["peftlab_train"] = bench_peftlab_train(model, examples, args.batch_size, args.train_steps)
    # LoRA training: forward 2N + backward through the frozen weights 2N FLOPs a token (no weight grads).
    report["peftlab_train"]["mfu"] = 4 * n * report["peftlab_train"]["tokens_per_s"] / H100_BF16_DENSE
    print(json.dumps(report["peftlab_train"]), flush=True)
    report["trainer_peer"] = bench_trainer_peer(model, examples, args.batch_size, args.train_steps)
    report["trainer_peer"]["mfu"] = 4 * n * report["trainer_peer"]["tokens_per_s"] / H100_BF16_DENSE
    print(json.dumps(report["trainer_peer"]), flush=True)
    report["train_speedup_vs_trainer"] = report["peftlab_train"]["tokens_per_s"] / report["trainer_peer"]["tokens_per_s"]
    report["planner"] = planner_prediction(args.shape, args.batch_size, args.max_len + 60, args.eval_batch_size,
                                           args.max_batch_tokens)
    report["total_s"] = time.perf_counter() - t0
    write_report(report, args.out, f"gpu_{args.shape}.json")


def write_report(report: dict, out: str | None, name_in_out_dir: str) -> None:
    """Print the report, write it to --out, and into $OUT (the device machine's folder that comes back)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name_in_out_dir).write_text(text + "\n")


if __name__ == "__main__":
    main()
