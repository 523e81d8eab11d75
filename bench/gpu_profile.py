"""Where a LoRA training step's time goes on a GPU: peftlab's loop against the Trainer peer.

    PYTHONPATH=src python bench/gpu_profile.py --shape llama2-7b --steps 4

Profiles a few steps of each (after a warm-up) with torch.profiler and prints the top operators by
GPU time and by host time, and the wall time per step, so the gap between the two can be located.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import LABEL_IDS, random_model, synthetic_examples, sync  # noqa: E402

from peftlab.config import MethodConfig, TrainConfig  # noqa: E402
from peftlab.evaluate.scoring import build_rows  # noqa: E402
from peftlab.models import attach_method  # noqa: E402
from peftlab.models.methods import detach_method  # noqa: E402
from peftlab.train.loop import Objective, fit  # noqa: E402


def profile(label: str, run, rows: int = 12) -> None:
    run()  # warm-up
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - start
    print(f"===== {label}: {wall:.3f} s wall")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = random_model(args.shape)
    examples = synthetic_examples(args.batch_size * args.steps, 512, 0)
    peft_model = attach_method(model, MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1), seed=0)
    rows = build_rows(examples, LABEL_IDS, gold_only=True)
    gold = [e.label for e in examples]
    cfg = TrainConfig(epochs=1, lr=5e-4, batch_size=args.batch_size)
    profile("peftlab fit", lambda: fit(peft_model, Objective(rows, gold, 2, 0, "lm"), cfg, progress=False))
    base = detach_method(peft_model)

    import peft
    from transformers import Trainer, TrainingArguments
    from gpu_bench import pad_collate, peer_dataset

    peer = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM"))
    data = peer_dataset(examples)

    targs = TrainingArguments(output_dir="/tmp/peer", per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                              learning_rate=5e-4, bf16=True, report_to=[], save_strategy="no", seed=0,
                              remove_unused_columns=False, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=peer, args=targs, train_dataset=data, data_collator=pad_collate)
    profile("Trainer + peft", trainer.train)


if __name__ == "__main__":
    main()
