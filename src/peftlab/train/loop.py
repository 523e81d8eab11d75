"""The training loop: one loop for every peft method (their differences live in models/methods.py).

Loss is the cross entropy of the gold label word after the prompt, never of the prompt itself:
`lm` over the whole vocabulary (what a causal-LM fine-tune on the answer token does), or
`classes` over the label words only. Batches are grouped by length so that padding is rare,
and the rows are tokenised once before the first epoch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from peftlab.config import TrainConfig
from peftlab.distributed import SINGLE, Cluster
from peftlab.errors import PeftlabError
from peftlab.evaluate.scoring import (EvaluationStopped, Row, example_length, example_scores, prefix_cache,
                                      shareable_prefix)
from peftlab.models.methods import position_offset
from peftlab.train.checkpoint import Checkpoints, Position
from peftlab.train.preemption import Preempted, StopRequest


class TrainingDiverged(PeftlabError):
    """The loss became NaN or infinite: the cell stops instead of training on garbage."""


@dataclass
class Objective:
    """What training minimises: the tokenised rows, their gold classes, and the loss over them.

    `loss` is `lm` (cross entropy of the gold label word over the whole vocabulary) or `classes` (over
    the label words only); `pad_id` pads the batches.
    """

    rows: list[list[Row]]
    labels: list[int]
    n_classes: int
    pad_id: int
    loss: str


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    tokens: int
    metrics: dict = field(default_factory=dict)


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
               loss: str, prefix_ids: list[int] | None = None) -> torch.Tensor:
    # The prompt prefix every row shares runs once per batch, not once per row (its cache keeps the graph).
    prefix = prefix_cache(model, prefix_ids) if prefix_ids else None
    scores = example_scores(model, batch, n_classes, pad_id, offset, prefix)
    if loss == "classes":
        return torch.nn.functional.cross_entropy(scores, gold.to(scores.device))
    return -scores.gather(1, gold.to(scores.device)[:, None]).mean()


def check_loss(pending: torch.Tensor, pos: Position, checked: int, step: int, epoch: int, lr: float) -> int:
    """Move the loss summed since batch `checked` into `pos`, or stop if it is not finite."""
    window = pending.item()
    if not math.isfinite(window):
        where = f"batch {step}" if step == checked + 1 else f"batches {checked + 1}-{step}"
        raise TrainingDiverged(f"training diverged at epoch {epoch}, {where}: the loss is {window}; "
                               f"lower --lr (now {lr:g}) or check the data")
    pos.loss_sum += window
    pending.zero_()
    return step


ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def has_dropout(model) -> bool:
    """Whether training draws dropout masks anywhere: adapter or base dropout modules, or attention dropout."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, name, 0) or 0) > 0 for name in ATTENTION_DROPOUT_FIELDS)


def training_prefix(model, rows: list[list[Row]], offset: int, config: TrainConfig, cluster: Cluster
                    ) -> list[int] | None:
    """The prompt prefix all training rows share, to run once per batch; None where that is not exact.

    Only without dropout: one pass over the prefix would draw one dropout mask for the whole batch
    instead of one per example, a different regulariser (on a tiny model, LoRA d=0.1 learned worse
    with it). Not with gradient checkpointing (transformers turns the cache off under it), FSDP (a second
    forward per step would gather the sharded weights twice) or prefix tuning (scoring.shareable_prefix).
    """
    if config.gradient_checkpointing or cluster.strategy == "fsdp" or has_dropout(model):
        return None
    return shareable_prefix(model, rows, offset)


def fit(model, objective: Objective, config: TrainConfig, on_epoch_end: Callable[[EpochRecord], dict] | None = None,
        progress: bool = True, checkpoints: Checkpoints | None = None, cluster: Cluster = SINGLE,
        share_prefix: bool = True, on_step: Callable[[int, float, float], None] | None = None,
        stop: StopRequest | None = None) -> list[EpochRecord]:
    """Train the trainable parameters of `model` on `objective`; evaluate through `on_epoch_end` after each epoch.

    With `checkpoints`, the whole state is saved every `checkpoint_every` optimiser steps and after
    each epoch; if `checkpoints` has loaded a checkpoint, training continues from it and ends as the
    uninterrupted run would (bitwise on CPU). With several processes (`cluster`), each batch is split
    across them and the adapter's gradients are summed (peftlab.distributed). With `share_prefix`, the
    prompt prefix all rows share is computed once per batch where that is exact (`training_prefix`).
    `on_step(optimizer_step, loss, lr)` is called after each optimiser step with the mean loss of the
    examples since the last call (read only where the loop reads it anyway: every batch on a CPU).
    With `stop` (train.preemption), a signal ends training after the current optimiser step or epoch end,
    with a checkpoint saved, by raising Preempted.
    """
    from tqdm.auto import tqdm

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise PeftlabError("the model has no trainable parameters; choose a peft method with --method")
    rows, offset = objective.rows, position_offset(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(rows) / config.batch_size) / config.grad_accum)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    lengths = [example_length(r) for r in rows]
    gold_t = torch.tensor(objective.labels)
    device = next(iter(params.values())).device
    check_every = 1 if device.type == "cpu" else 8
    prefix_ids = training_prefix(model, rows, offset, config, cluster) if share_prefix else None
    rng = random.Random(config.seed)  # batch order: part of the run's seed
    pos = Position()
    if checkpoints is not None and checkpoints.loaded:
        pos = checkpoints.restore(params, optimizer, scheduler, rng)
    history = [EpochRecord(**h) for h in pos.history]
    for epoch in range(pos.epoch, config.epochs + 1):
        model.train()
        pos.order_rng = rng.getstate()  # a resumed run deals this epoch's batches again from here
        batches = train_batches(lengths, config.batch_size, rng)
        start = time.perf_counter() - pos.seconds
        bar = tqdm(total=len(batches), initial=pos.batch, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False)
        pending, checked = torch.zeros((), dtype=torch.float64, device=device), pos.batch
        logged = (pos.loss_sum, pos.seen)  # the running sums when on_step was last called
        for step in range(pos.batch + 1, len(batches) + 1):
            batch, share = cluster.shard_batch(batches[step - 1])  # this process's part: all of it alone
            counted = len(batch) if share else 0                   # a 0-share stand-in counts nothing
            loss = batch_loss(model, [rows[i] for i in batch], gold_t[batch], objective.n_classes, objective.pad_id,
                              offset, objective.loss, prefix_ids)
            (loss * share / config.grad_accum).backward()
            pending += loss.detach().double() * counted
            pos.batch, pos.seen = step, pos.seen + counted
            pos.tokens += sum(len(row.seq) + offset for i in batch for row in rows[i]) if counted else 0
            optimizer_step = step % config.grad_accum == 0 or step == len(batches)
            # Reading the loss waits for the device. On a CPU that is free, so every batch is checked; on
            # a GPU every `check_every` batches, so the host queues the next batch's work meanwhile. Either
            # way a non-finite loss stops the run before a checkpoint or an evaluation can keep its result.
            if step % check_every == 0 or step == len(batches):
                checked = check_loss(pending, pos, checked, step, epoch, config.lr)
                pos.seconds = time.perf_counter() - start
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{pos.loss_sum / max(pos.seen, 1):.4f}",
                                tok_s=f"{pos.tokens / pos.seconds:.0f}")
            if optimizer_step:
                lr = optimizer.param_groups[0]["lr"]
                cluster.all_reduce_gradients(params.values())
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pos.optimizer_steps += 1
                if on_step is not None and checked == step:
                    on_step(pos.optimizer_steps, (pos.loss_sum - logged[0]) / max(pos.seen - logged[1], 1), lr)
                    logged = (pos.loss_sum, pos.seen)
                # Only between optimiser steps: accumulated gradients are not part of a checkpoint.
                stopping = stop is not None and stop.signal is not None and step < len(batches)
                if checkpoints is not None and (checkpoints.due(pos) or stopping) and step < len(batches):
                    checked = check_loss(pending, pos, checked, step, epoch, config.lr)
                    pos.seconds = time.perf_counter() - start
                    checkpoints.save(pos, params, optimizer, scheduler)
                if stopping:
                    raise Preempted(stop.signal, epoch, pos.optimizer_steps)
        bar.close()
        loss_sum, seen, tokens = cluster.sum(pos.loss_sum, pos.seen, pos.tokens)  # over all processes
        record = EpochRecord(epoch=epoch, loss=loss_sum / max(seen, 1), seconds=pos.seconds, tokens=int(tokens))
        if on_epoch_end is not None:
            try:
                record.metrics = on_epoch_end(record)
            except EvaluationStopped as stopped:
                # The epoch is trained; its checkpoint says so (batch = the last), and a resumed run goes
                # straight to this evaluation, whose finished batches the journal keeps.
                if checkpoints is None:
                    raise
                checkpoints.save(pos, params, optimizer, scheduler)
                raise Preempted(stopped.signal_name, epoch, pos.optimizer_steps) from None
        history.append(record)
        pos = Position(epoch=epoch + 1, optimizer_steps=pos.optimizer_steps, order_rng=rng.getstate(),
                       history=[asdict(h) for h in history])
        if checkpoints is not None:
            checkpoints.save(pos, params, optimizer, scheduler)
        if stop is not None and stop.signal is not None and epoch < config.epochs:
            raise Preempted(stop.signal, epoch + 1, pos.optimizer_steps)
    return history
