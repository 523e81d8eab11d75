"""The training loop: one loop for every peft method (GUIDE rule 3).

Loss is the cross entropy of the gold label word after the prompt, never of the prompt itself:
`lm` over the whole vocabulary (what a causal-LM fine-tune on the answer token does), or
`classes` over the label words only. Batches are grouped by length so that padding is rare,
and the rows are tokenised once before the first epoch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftlab.config import TrainConfig
from peftlab.errors import PeftlabError
from peftlab.evaluate.scoring import Row, example_length, example_scores


class TrainingDiverged(PeftlabError):
    """The loss became NaN or infinite: the cell stops instead of training on garbage."""


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    tokens: int
    metrics: dict = field(default_factory=dict)


def default_lr(method: str) -> float:
    # LoRA: the study's 5e-4. Prompt learning needs far larger steps (Lester et al. 2021 used 0.3);
    # 3e-2 is what we measured to learn on SmolLM2 (see README, prompt tuning).
    return 5e-4 if method == "lora" else 3e-2 if method in ("prompt-tuning", "p-tuning", "prefix-tuning") else 1e-3


def train_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within chunks of 50 batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def batch_loss(model, batch: list[list[Row]], gold: torch.Tensor, n_classes: int, pad_id: int, offset: int,
               loss: str) -> torch.Tensor:
    scores = example_scores(model, batch, n_classes, pad_id, offset)
    if loss == "classes":
        return torch.nn.functional.cross_entropy(scores, gold.to(scores.device))
    return -scores.gather(1, gold.to(scores.device)[:, None]).mean()


def fit(model, rows: list[list[Row]], gold: list[int], n_classes: int, pad_id: int, offset: int,
        config: TrainConfig, lr: float, on_epoch_end: Callable[[int], dict] | None = None,
        progress: bool = True) -> list[EpochRecord]:
    """Train the trainable parameters of `model`; evaluate through `on_epoch_end` after each epoch."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError("the model has no trainable parameters; choose a peft method with --method")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(rows) / config.batch_size) / config.grad_accum)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    lengths = [example_length(r) for r in rows]
    gold_t = torch.tensor(gold)
    rng = random.Random(config.seed)  # batch order: part of the run's seed
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = train_batches(lengths, config.batch_size, rng)
        start, tokens, loss_sum, seen = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not progress, leave=False)
        for step, batch in enumerate(bar, start=1):
            loss = batch_loss(model, [rows[i] for i in batch], gold_t[batch], n_classes, pad_id, offset, config.loss)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"training diverged at epoch {epoch}, batch {step}: the loss is "
                                       f"{loss.item()}; lower --lr (now {lr:g}) or check the data")
            (loss / config.grad_accum).backward()
            if step % config.grad_accum == 0 or step == len(batches):
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += sum(len(row.seq) + offset for i in batch for row in rows[i])
            loss_sum += loss.item() * len(batch)
            seen += len(batch)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.close()
        record = EpochRecord(epoch=epoch, loss=loss_sum / max(seen, 1), seconds=time.perf_counter() - start,
                             tokens=tokens)
        if on_epoch_end is not None:
            record.metrics = on_epoch_end(epoch)
        history.append(record)
    return history
