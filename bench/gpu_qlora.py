"""GPU check of the quantised path (QLoRA): a LLaMA-2-7B-shaped base in 4-bit NF4, loaded by peftlab.

    pip download --no-deps -d wheels bitsandbytes                 # here: the wheel (41 MiB) travels along
    pip install --no-deps --no-index wheels/bitsandbytes-*.whl   # on the GPU machine, which has no network
    PYTHONPATH=src python bench/gpu_qlora.py --out $OUT/gpu-qlora.json            # one H100, < 6 minutes

Steps, in one process:
  1. a LLaMA-2-7B-shaped model initialised at random on the GPU (speed and memory do not depend on
     the weights' values) is written in bf16 safetensors, with a small tokenizer, to a local folder;
  2. peftlab's own loader reads it with `--quantization 4bit` (models/loading.py + quantization.py:
     bitsandbytes NF4, double quantisation, bf16 compute), exactly as `peftlab train` would;
  3. LoRA r=8 is attached (peftlab's k-bit preparation), a few training steps run through
     peftlab.train.loop.fit without and with gradient checkpointing, then an evaluation pass;
  4. every measured peak (`torch.cuda.max_memory_allocated`) is printed beside the memory planner's
     prediction for the same request (`peftlab.models.planner.plan_from_shape`), with the error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_bench import LABEL_IDS, SHAPES, n_params, synthetic_examples, write_report  # noqa: E402

from peftlab.config import MethodConfig, ModelConfig, TrainConfig  # noqa: E402
from peftlab.evaluate.scoring import build_rows, score_examples  # noqa: E402
from peftlab.models import attach_method, load_base_model, planner  # noqa: E402
from peftlab.models.methods import detach_method, enable_gradient_checkpointing  # noqa: E402
from peftlab.train.loop import Objective, fit  # noqa: E402

GIB = 2**30


def write_random_model(shape: str, folder: Path, device: str = "cuda") -> None:
    """A random bf16 model folder with a word-level tokenizer whose ids fall inside the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "positive", "negative"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def measured_train(model, examples, batch_size: int, steps: int, checkpointing: bool) -> dict:
    peft_model = attach_method(model, MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1), seed=0)
    if checkpointing:
        enable_gradient_checkpointing(peft_model)
    rows = build_rows(examples[: batch_size * steps], LABEL_IDS, gold_only=True)
    gold = [e.label for e in examples[: batch_size * steps]]
    cfg = TrainConfig(epochs=1, lr=5e-4, batch_size=batch_size)
    fit(peft_model, Objective(rows[:batch_size], gold[:batch_size], 2, 0, "lm"), cfg, progress=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = fit(peft_model, Objective(rows, gold, 2, 0, "lm"), cfg, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"tokens_per_s": history[0].tokens / seconds, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
           "loss": history[0].loss}
    if checkpointing:
        peft_model.base_model.model.gradient_checkpointing_disable()
    detach_method(peft_model)
    return out


def measured_eval(model, examples, batch_size: int, max_tokens: int) -> dict:
    rows = build_rows(examples, LABEL_IDS)
    score_examples(model, rows[:batch_size], 2, 0, 0, batch_size, max_tokens, progress=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = score_examples(model, rows, 2, 0, 0, batch_size, max_tokens, progress=False)
    torch.cuda.synchronize()
    return {"tokens_per_s": result.tokens_per_s, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}


def with_plan(measured: dict, planned_gib: float) -> dict:
    return {**measured, "planned_allocated_gib": planned_gib,
            "planner_error": planned_gib / measured["peak_allocated_gib"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--folder", help="where the random model is written [default: a temporary folder]")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_qlora.py needs a CUDA GPU (bitsandbytes' 4-bit kernels run only there)")
    import bitsandbytes

    t0 = time.perf_counter()
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
              "shape": args.shape, "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp) / args.shape
        write_random_model(args.shape, folder)
        report["write_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        model, _ = load_base_model(ModelConfig(name=str(folder), device="cuda", dtype="bf16", quantization="4bit"))
        report["load_s"] = time.perf_counter() - t0 - report["write_s"]
        report["weights_allocated_gib"] = torch.cuda.memory_allocated() / GIB
        report["loaded_in_4bit"] = bool(getattr(model, "is_loaded_in_4bit", False))
        report["parameters_without_embeddings"] = n_params(model)
    print(json.dumps(report), flush=True)

    examples = synthetic_examples(max(args.batch_size * args.train_steps, args.eval_examples), args.max_len, 0)
    seq_len = args.max_len + 60
    for checkpointing in (False, True):
        plan = planner.plan_from_shape(SHAPES[args.shape], method="lora", quantization="4bit", batch_size=args.batch_size,
                                       seq_len=seq_len, gradient_checkpointing=checkpointing)
        name = "train_4bit_checkpointing" if checkpointing else "train_4bit"
        report[name] = with_plan(measured_train(model, examples, args.batch_size, args.train_steps, checkpointing),
                                 plan["train_allocated_gib"])
        print(json.dumps({name: report[name]}), flush=True)
    plan = planner.plan_from_shape(SHAPES[args.shape], method="lora", quantization="4bit", evaluate_only=True,
                                   adapter=False, seq_len=seq_len, eval_batch_size=args.eval_batch_size,
                                   max_batch_tokens=args.max_batch_tokens)
    report["eval_4bit"] = with_plan(measured_eval(model, examples[: args.eval_examples], args.eval_batch_size,
                                                  args.max_batch_tokens), plan["eval_allocated_gib"])
    report["total_s"] = time.perf_counter() - t0
    write_report(report, args.out, f"gpu-qlora-{args.shape}.json")


if __name__ == "__main__":
    main()
