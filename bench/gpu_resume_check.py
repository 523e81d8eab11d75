"""GPU check: is a resumed training run bitwise equal to an unbroken one, and are two unbroken runs?

    PYTHONPATH=src python bench/gpu_resume_check.py --devices cuda --out bench/results/gpu-resume-check.json

On the CPU both hold (tests/unit/test_checkpoint.py). On a GPU, kernels that add with atomics (the
backward of index_add/scatter/embedding, some cuBLAS and attention kernels) may sum in a different
order on every run, so neither is promised there; this script measures what happens, per dtype and
method, with a small random LLaMA (no download) on the tiny aclImdb of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import peftlab.train.loop as loop  # noqa: E402
from conftest import build_tiny_tokenizer, write_aclimdb  # noqa: E402
from peftlab.config import build_config  # noqa: E402
from peftlab.records import sha256_file  # noqa: E402
from peftlab.runs import run_train  # noqa: E402


class Killed(BaseException):
    pass


def model_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def run(values: dict, kill_at: int | None = None) -> None:
    real, calls = loop.batch_loss, {"n": 0}

    def batch_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed()
        return real(*args, **kwargs)

    loop.batch_loss = batch_loss
    try:
        run_train(build_config(values))
    finally:
        loop.batch_loss = real


def check(root: Path, model: Path, data: Path, device: str, dtype: str, method: str) -> dict:
    base = {"model.name": str(model), "model.device": device, "model.dtype": dtype, "data.source": str(data),
            "data.n_train": 16, "data.n_test": 8, "prompt.max_input_tokens": 48, "train.epochs": 2,
            "train.batch_size": 4, "train.checkpoint_every": 2, "method.method": method,
            "train.lr": 1e-2 if method == "lora" else 3e-2}
    tag = f"{device}-{dtype}-{method}"
    outs = {name: root / f"{tag}-{name}" for name in ("a", "b", "resumed")}
    start = time.perf_counter()
    run({**base, "out": str(outs["a"])})
    run({**base, "out": str(outs["b"])})
    try:
        run({**base, "out": str(outs["resumed"])}, kill_at=3)  # epoch 1, after the checkpoint of step 2
    except Killed:
        pass
    run({**base, "out": str(outs["resumed"]), "train.resume": True})
    sha = {n: sha256_file(o / "adapter" / "adapter_model.safetensors") for n, o in outs.items()}
    metrics = {n: json.loads((o / "metrics.json").read_text()) for n, o in outs.items()}
    loss = {n: [e["train_loss"] for e in m["per_epoch"]] for n, m in metrics.items()}
    return {"device": device, "dtype": dtype, "method": method,
            "two_unbroken_runs_bitwise_equal": sha["a"] == sha["b"],
            "resumed_equals_unbroken_bitwise": sha["resumed"] == sha["a"],
            "train_loss": loss, "accuracy": {n: m["accuracy"] for n, m in metrics.items()},
            "resumed_from": metrics["resumed"]["resumed_from"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped without a GPU")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    model, data = model_dir(root), write_aclimdb(root / "imdb")
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    results = [check(root, model, data, d, dt, m) for d in devices for dt in ("fp32", "bf16")
               for m in ("lora", "prompt-tuning")]
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
