"""One experiment cell end to end: data -> prompt -> model -> train -> evaluate -> run folder.

These are the functions the CLI calls and notebooks import:

    from peftlab import RunConfig, run_eval, run_train, predict
    result = run_train(cfg)            # writes cfg.out and returns the metrics dict

A preloaded `(model, tokenizer)` can be passed in, so that a sweep loads its base model once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from peftlab.config import RunConfig, dump_yaml, identity, identity_differences
from peftlab.data import LabelledSplits, load_splits, select_splits
from peftlab.data.sampling import Samples
from peftlab.data.examples import Example, replace_lone_surrogates
from peftlab.data.sources import imdb_classes
from peftlab.distributed import SINGLE, Cluster, join_cluster
from peftlab.errors import PeftlabError, resource_errors
from peftlab.evaluate.calibration import decide, fit_validation_prior
from peftlab.evaluate.metrics import metrics_from_scores
from peftlab.evaluate.paired import correct_bits
from peftlab.evaluate.scoring import ScoreResult, build_rows, read_ids, score_examples
from peftlab.models import attach_method, load_adapter, load_base_model, position_offset, trainable_parameters
from peftlab.models.head import HeadSpec, class_head, head_record
from peftlab.models.loading import base_dtype, resolve_model_source
from peftlab.models.head import refuse_headless_method
from peftlab.models.methods import detach_method, enable_gradient_checkpointing, peft_type_name, prompt_init_ids
from peftlab.prompts import PromptEncoder, build_prompt_encoder
from peftlab.records import ADAPTER_FILE, RunFolder, ScoreJournal, read_adapter_record, sha256_file
from peftlab.repro import git_commit, hardware, peak_memory_mb, set_seed, versions
from peftlab.train.checkpoint import Checkpoints, Position, load_trainable
from peftlab.train.loop import EpochRecord, Objective, fit
from peftlab.train.preemption import Preempted, StopRequest, stop_requests
from peftlab.train.selection import BestEpoch, selected_on_val


@dataclass
class Task:
    """The examples of one run and how they are prompted."""

    splits: LabelledSplits
    train: list[Example]
    val: list[Example]
    test: list[Example]
    encoder: PromptEncoder


@dataclass
class Run:
    """What run_eval and run_train share once their prologue (open_run) is done."""

    config: RunConfig
    command: str
    cluster: Cluster
    folder: RunFolder | None   # None on processes other than rank 0: rank 0 alone writes
    model: object
    tokenizer: object
    task: Task
    progress: bool
    start: float
    stop: StopRequest | None = None  # while training (train.preemption): evaluations stop between batches

    def evaluate(self, model, examples: list[Example], desc: str, journalled: bool = False
                 ) -> tuple[dict, list[dict]]:
        """Score `examples`; `journalled`: keep finished batches in the run folder for a resumed run."""
        journal = self.journal(model, examples, desc) if journalled and self.folder is not None else None
        with resource_errors("evaluating", memory_fix(self.config, training=False)):
            offsets = fit_validation_prior(model, self.tokenizer, self.task.encoder, self.task.val,  # issue 13 hook
                                           self.config.eval) if self.config.eval.calibration == "val" else None
            metrics, predictions, _ = evaluate_examples(model, self.tokenizer, self.task.encoder, examples,
                                                        self.config, progress=self.progress, desc=desc,
                                                        cluster=self.cluster, val_offsets=offsets, journal=journal,
                                                        stop=self.stop)
        return metrics, predictions

    def journal(self, model, examples: list[Example], desc: str) -> ScoreJournal:
        """The journal of this evaluation: reused by --resume only if the same examples are scored by the
        same run with the same weights (the trainable ones, or the adapter file evaluated) on a base of the same
        precision (`model.dtype: auto` differs by machine; trainable weights are fp32 either way)."""
        digest = hashlib.sha256(json.dumps([desc, [e.id for e in examples], identity(self.config)],
                                           default=str).encode("utf-8", "surrogatepass"))
        for name, p in model.named_parameters():
            if p.requires_grad:
                digest.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
        if self.config.adapter:
            digest.update(sha256_file(Path(self.config.adapter) / ADAPTER_FILE).encode())
        return ScoreJournal(self.folder.journal_file(desc), digest.hexdigest(), resume=self.config.train.resume,
                            precision=base_dtype(model))

    def finish(self, metrics: dict, predictions: list[dict]) -> dict:
        """Write predictions and metrics (rank 0), and return the metrics with the run folder in them."""
        metrics["out"] = str(self.folder.path) if self.folder else self.config.out
        if predictions:  # the report's paired tests read them from the store (evaluate/paired.py)
            metrics["correct_bits"] = correct_bits(predictions)
        if self.folder is not None:
            self.folder.finish(metrics, predictions)
        return metrics


def show_progress(progress: bool | None) -> bool:
    """Progress bars unless turned off by the caller or by PEFTLAB_PROGRESS=0."""
    return os.environ.get("PEFTLAB_PROGRESS", "1") != "0" if progress is None else progress


def default_out(command: str) -> Path:
    """runs/<command>-<time>, with -2, -3, ... where runs started in the same second took that name."""
    base = Path("runs") / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return next(p for p in (base, *(base.with_name(f"{base.name}-{n}") for n in range(2, 10**6))) if not p.exists())


def load_task(config: RunConfig, tokenizer, n_train: int | None = None, splits: LabelledSplits | None = None) -> Task:
    """Read the data, pick the seeded balanced samples and build the prompt encoder."""
    splits = splits or load_splits(config.data)
    return make_task(config, tokenizer, splits, sample_task(config, splits, n_train))


def sample_task(config: RunConfig, splits: LabelledSplits, n_train: int | None = None) -> Samples:
    data = config.data
    return select_splits(splits, data.n_train if n_train is None else n_train, data.n_test, data.data_seed,
                         data.n_val)


def make_task(config: RunConfig, tokenizer, splits: LabelledSplits, samples: Samples) -> Task:
    encoder = build_prompt_encoder(tokenizer, config.prompt, splits.classes, splits.is_imdb,  # issue 13 hook: shots
                                   splits.train, config.data.data_seed)
    return Task(splits=splits, train=samples.train, val=samples.val, test=samples.test, encoder=encoder)


def open_run(config: RunConfig, command: str, model, tokenizer, progress: bool | None, n_train: int | None = None
             ) -> Run:
    """The prologue of every run: processes, run folder, data (sampled once, before any heavy work, so that
    data mistakes fail in seconds), config.yaml, the base model and the prompt encoder."""
    start, progress = time.perf_counter(), show_progress(progress)
    cluster = join_cluster(config.model, config.train.strategy)  # one process unless launched on several
    resume = config.train.resume
    folder = (RunFolder.claim(config.out or default_out(command), resume, config.overwrite) if cluster.is_main
              else None)
    splits = load_splits(config.data)
    samples = sample_task(config, splits, n_train)
    if folder is not None:
        folder.write_config(dump_yaml(config), command)
    if model is None:
        model, tokenizer = load_base_model(cluster.model_config(config.model))
    task = make_task(config, tokenizer, splits, samples)
    return Run(config, command, cluster, folder, model, tokenizer, task, progress and cluster.is_main, start)


def evaluate_examples(model, tokenizer, encoder: PromptEncoder, examples: list[Example], config: RunConfig,
                      progress: bool = True, desc: str = "evaluating", cluster: Cluster = SINGLE,
                      val_offsets=None, journal=None, stop=None) -> tuple[dict, list[dict], ScoreResult]:
    """Score the examples and return (metrics, predictions, raw scores); with several processes each
    scores its share and all receive all scores (peftlab.distributed). With a `journal`
    (records.ScoreJournal; one process), finished batches are kept and reused by a resumed evaluation, and
    `stop` (train.preemption.StopRequest) ends it between batches."""
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, read_ids(model, encoder.label_ids))
    n_classes, offset = len(encoder.classes), position_offset(model)
    if journal is not None and not cluster.distributed:
        result = score_examples(model, rows, n_classes, tokenizer.pad_token_id, offset, config.eval.eval_batch_size,
                                config.eval.max_batch_tokens, progress, desc, journal=journal,
                                ids=[e.id for e in encoded], stop=stop)
    else:
        result = cluster.score(lambda part, max_examples, max_tokens: score_examples(
            model, part, n_classes, tokenizer.pad_token_id, offset, max_examples, max_tokens, progress, desc),
            rows, [sum(len(row.seq) + offset for row in r) for r in rows], n_classes, config.eval.eval_batch_size,
            config.eval.max_batch_tokens)
    decided, decision = decide(result.scores, encoder, config.eval, lambda more: score_examples(  # issue 13 hook
        model, more, n_classes, tokenizer.pad_token_id, offset, progress=False).scores, tokenizer, val_offsets)
    preds = decided.argmax(dim=1).tolist()
    gold = [e.label for e in encoded]
    # Accuracy and calibration of the scores the decision is taken on (normalised and calibrated as asked).
    metrics = metrics_from_scores(decided, gold, encoder.classes)
    metrics["decision"] = decision
    metrics.update(eval_seconds=result.seconds, eval_tokens=result.tokens, eval_tokens_per_s=result.tokens_per_s,
                   truncated_share=sum(e.truncated for e in encoded) / max(len(encoded), 1))
    predictions = [
        {"id": e.id, "label": encoder.classes[e.label], "pred": encoder.classes[p], "correct": p == e.label,
         "scores": {c: round(float(s), 6) for c, s in zip(encoder.classes, score_row)}}
        for e, p, score_row in zip(encoded, preds, result.scores.tolist())
    ]
    return metrics, predictions, result


def run_record(config: RunConfig, encoder: PromptEncoder, model) -> dict:
    trainable, total = trainable_parameters(model)
    device = next(model.parameters()).device
    return {"config": config.to_dict(), "prompt": encoder.record(), "seed": config.train.seed,
            "data_seed": config.data.data_seed, "model": {"name": config.model.name,
            "source": resolve_model_source(config.model.name).describe(),
            "dtype": base_dtype(model), "device": str(device)},
            "trainable_parameters": trainable, "total_parameters": total, "versions": versions(),
            "hardware": hardware(), "git_commit": git_commit()}


def memory_fix(config: RunConfig, training: bool) -> str:
    """What to lower when memory runs out, with the values in use."""
    train = (f"lower --batch-size (now {config.train.batch_size}; raise --grad-accum to keep the effective "
             f"batch) or --max-input-tokens (now {config.prompt.max_input_tokens}), " if training else "")
    return (train + f"lower --eval-batch-size (now {config.eval.eval_batch_size}) or --max-batch-tokens (now "
            f"{config.eval.max_batch_tokens}), or use a smaller --model or --dtype bf16"
            + ("; add --resume to continue from the last checkpoint" if training else ""))


def run_eval(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Zero-shot evaluation (or evaluation of `config.adapter`) of the test subset; writes the run folder."""
    refuse_untrained_head(config)
    run = open_run(config, "eval", model, tokenizer, progress, n_train=0)
    model = load_adapter(run.model, config.adapter) if config.adapter else run.model
    check_objective(config, model, run.task.encoder.classes)
    model = run.cluster.prepare_model(model)
    load_s = time.perf_counter() - run.start
    metrics, predictions = run.evaluate(model, run.task.test, "evaluating", journalled=True)
    metrics.update(run_record(config, run.task.encoder, model), command="eval", adapter=config.adapter,
                   evaluated_on="test", timings={"load_s": load_s, "eval_s": metrics["eval_seconds"],
                                                 "total_s": time.perf_counter() - run.start},
                   peak_memory_mb=peak_memory_mb(next(model.parameters()).device), distributed=run.cluster.record())
    return run.finish(metrics, predictions)


def run_train(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None,
              on_epoch: Callable[[int, dict], None] | None = None,
              on_step: Callable[[int, float, float], None] | None = None) -> dict:
    """Train a fresh adapter, evaluate after every epoch, keep the chosen epoch; writes the run folder.

    `train.select_on` chooses the epoch: on the validation split (the test subset is then scored once,
    with the chosen adapter), on the test subset after every epoch (the study's protocol), or the last.
    `on_epoch(epoch, {"epoch", "train_loss", "val", "test"})` is called after each epoch's evaluation;
    what it raises (e.g. optuna.TrialPruned) ends the run, with the adapter removed from `model`.
    `on_step(step, loss, lr)` goes to `fit` (experiment tracking, peftlab.tracking).
    The run checkpoints itself into <out>/checkpoint; with `train.resume` a killed run continues
    from there (and a finished one is returned as it is).
    """
    check_trainable(config)
    if config.train.resume and (finished := finished_run(Path(config.out or ""), config)) is not None:
        return finished
    run = open_run(config, "train", model, tokenizer, progress)
    if not run.task.train:
        raise PeftlabError("the training sample is empty: there is nothing to train on; give --n-train")
    peft_model, (trainable, total) = attach_trainee(run)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    best = BestEpoch(config.train.select_on)
    checkpoints = Checkpoints(run.folder.checkpoint if run.folder else Path(config.out or "."),
                              config.train.checkpoint_every, config, sample_sha256(run.task), state=best,
                              precision=base_dtype(peft_model))
    resumed = config.train.resume and checkpoints.load()
    load_s = time.perf_counter() - run.start
    objective = training_objective(run, peft_model)
    if run.progress:
        position = Position(**checkpoints.loaded["position"]) if resumed else None
        print(plan_line(run, peft_model, objective, position), file=sys.stderr, flush=True)
    try:
        with resource_errors("training", memory_fix(config, training=True)), stop_requests() as stop:
            run.stop = stop
            history = fit(peft_model, objective, config.train,
                          epoch_evaluator(run, peft_model, best, params, on_epoch), run.progress,
                          None if run.cluster.distributed else checkpoints, cluster=run.cluster, on_step=on_step,
                          stop=stop)
        run.stop = None  # the final test pass: SIGTERM kills again, its journal keeps the finished batches
        metrics, predictions, adapter_sha256 = chosen_result(run, peft_model, best, params)
    except Preempted as stopped:
        if run.folder is not None:
            run.folder.mark_interrupted({"signal": stopped.signal_name, "epoch": stopped.epoch,
                                         "optimizer_step": stopped.step, "resume": "--resume"})
        raise
    finally:
        if run.cluster.strategy != "fsdp":  # a sharded model stays sharded: its process ends with the run
            detach_method(peft_model)  # the caller's base model comes back untouched, e.g. for the next cell
    metrics.update(run_record(config, run.task.encoder, peft_model), trainable_parameters=trainable,
                   total_parameters=total, adapter_sha256=adapter_sha256,
                   resumed_from={k: checkpoints.loaded["position"][k] for k in ("epoch", "batch")} if resumed else None,
                   **training_summary(run, history, best, load_s, metrics.get("eval_seconds")),
                   peak_memory_mb=peak_memory_mb(next(peft_model.parameters()).device),
                   distributed=run.cluster.record())
    return run.finish(metrics, predictions)


def check_trainable(config: RunConfig) -> None:
    """Mistakes a training run can see in its config alone, before any heavy work."""
    name = peft_type_name(config.method.method)  # an unknown method fails here
    if config.train.objective == "head":
        refuse_headless_method(name)
    if config.data.n_train == 0:
        raise PeftlabError("data.n_train is 0: there is nothing to train on; give --n-train")
    if config.train.resume and join_cluster(config.model, config.train.strategy).distributed:
        raise PeftlabError("--resume of a run on several processes is not supported yet; rerun it from the start")


def refuse_untrained_head(config: RunConfig) -> None:
    """train.objective=head without a trained adapter: its head would be random."""
    if config.train.objective == "head" and not config.adapter:
        raise PeftlabError("train.objective=head without --adapter would score with an untrained, random head; "
                           "train one first (peftlab train --objective head ...) and pass its adapter/ folder with "
                           "--adapter, or use train.objective=label-words for zero-shot")


def check_objective(config: RunConfig, model, classes: list[str]) -> None:
    """The adapter decides the objective (a head is in its weights or not); a config saying otherwise is refused,
    and so is a head whose outputs are not the data's classes, in their order."""
    head = class_head(model)
    if config.adapter and (head is not None) != (config.train.objective == "head"):
        has = "a classification head" if head is not None else "no classification head (label words)"
        raise PeftlabError(f"adapter {config.adapter} has {has}, and train.objective={config.train.objective} says "
                           f"otherwise; drop --objective (the adapter's peftlab.json sets it) or give --objective "
                           f"{'head' if head is not None else 'label-words'}")
    if head is None:
        return
    head_config = model.get_base_model().config
    names = [head_config.id2label[i] for i in range(head_config.num_labels)]
    generic = names == [f"LABEL_{i}" for i in range(len(names))]  # a head saved without its class names
    if len(names) != len(classes) or not (generic or names == list(classes)):
        raise PeftlabError(f"adapter {config.adapter}'s head answers with {len(names)} classes {names}, and the data has "
                           f"{len(classes)}, {list(classes)}; evaluate it on data of its own classes (or train a head for these)")


def attach_trainee(run: Run):
    """A fresh, seeded adapter on the base model, ready to train; and its (trainable, total) parameters."""
    set_seed(run.config.train.seed)
    encoder = run.task.encoder
    init_ids = prompt_init_ids(run.config.method, run.tokenizer, encoder.instruction, encoder.label_ids)
    head = HeadSpec(encoder.classes, run.tokenizer.pad_token_id) if run.config.train.objective == "head" else None
    peft_model = attach_method(run.model, run.config.method, init_ids, run.config.train.seed, head)
    if run.config.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    peft_model = run.cluster.prepare_model(peft_model)  # fsdp: shard the frozen base across the processes
    return peft_model, trainable_parameters(peft_model)  # counted now: detach_method removes the adapter


def training_objective(run: Run, peft_model) -> Objective:
    encoded = run.task.encoder.encode(run.task.train, run.tokenizer)
    rows = build_rows(encoded, read_ids(peft_model, run.task.encoder.label_ids), gold_only=run.config.train.loss == "lm")
    return Objective(rows=rows, labels=[e.label for e in encoded], n_classes=len(run.task.encoder.classes),
                     pad_id=run.tokenizer.pad_token_id, loss=run.config.train.loss)


def plan_line(run: Run, peft_model, objective: Objective, position: Position | None = None) -> str:
    """What the run will do and about how long it takes here (experiments.estimate.run_plan); for a run resumed
    from `position`, only what is left of it (a cell resumed late in its second epoch is minutes, not hours)."""
    from peftlab.experiments.estimate import run_plan, scored_examples

    cfg = run.config.train
    offset = position_offset(peft_model)
    tokens = [sum(len(row.seq) + offset for row in rows) for rows in objective.rows]
    mean = sum(tokens) / max(len(tokens), 1)
    epochs_left, evaluated, resumed = float(cfg.epochs), 0, ""
    if position is not None:
        batches = math.ceil(len(tokens) / cfg.batch_size)
        done = min(position.epoch - 1 + position.batch / max(batches, 1), cfg.epochs)
        epochs_left, evaluated = cfg.epochs - done, len(position.history)
        at = (f"epoch {position.epoch}, batch {position.batch}/{batches}" if position.epoch <= cfg.epochs
              else "training done")
        resumed = f"resumed at {at}, "
    scored = scored_examples(run.config, len(run.task.test), trains=True, n_val=len(run.task.val),
                             evaluated_epochs=evaluated)
    test = (f"{len(run.task.test)} test" if cfg.score_test
            else f"test not scored ({len(run.task.test)} drawn)")  # a tune trial, a learning-rate search cell
    examples = (f"{resumed}{len(run.task.train)} training examples x {cfg.epochs} epochs, "
                f"{len(run.task.val)} validation, {test} (epoch chosen: {cfg.select_on})")
    return run_plan(peft_model, round(sum(tokens) * epochs_left), round(scored * mean), examples,
                    tokens_per_row=round(mean), batch_size=cfg.batch_size,
                    gradient_checkpointing=cfg.gradient_checkpointing, left=position is not None)


def epoch_evaluator(run: Run, peft_model, best: BestEpoch, params: dict, on_epoch) -> Callable[[EpochRecord], dict]:
    """fit's end-of-epoch step: score the validation split (and the test subset when it chooses), keep the
    chosen epoch, print one line, and call the caller's `on_epoch`."""
    select_on = run.config.train.select_on

    def on_epoch_end(record: EpochRecord) -> dict:
        evaluations, predictions = {}, None
        # Journalled, so that a stop request (or a kill) during a long test pass loses no finished batch.
        if run.task.val:
            evaluations["val"], _ = run.evaluate(peft_model, run.task.val, f"val epoch {record.epoch}", journalled=True)
        if select_on == "test":
            evaluations["test"], predictions = run.evaluate(peft_model, run.task.test, f"test epoch {record.epoch}",
                                                            journalled=True)
        best.consider(record.epoch, evaluations, params, predictions)
        if run.progress:
            print(epoch_line(record, evaluations, run.config.train.epochs), file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(record.epoch, {"epoch": record.epoch, "train_loss": record.loss, "val": evaluations.get("val"),
                                    "test": evaluations.get("test")})
        return evaluations

    return on_epoch_end


def epoch_line(record: EpochRecord, evaluations: dict, epochs: int) -> str:
    """`epoch 1/2: train loss 0.4123 (512 tok/s), val accuracy 81.50% (76.1-85.8)`."""
    speed = f" ({record.tokens / record.seconds:.0f} tok/s)" if record.seconds else ""
    parts = [f"epoch {record.epoch}/{epochs}: train loss {record.loss:.4f}{speed}"]
    for split in ("val", "test"):
        if split in evaluations:
            m = evaluations[split]
            parts.append(f"{split} accuracy {m['accuracy']:.2%} ({m['ci95'][0]:.1%}-{m['ci95'][1]:.1%})")
    return ", ".join(parts)


def chosen_result(run: Run, peft_model, best: BestEpoch, params: dict) -> tuple[dict, list[dict], str | None]:
    """Put the chosen epoch's weights back, save them as the adapter, and score the test subset once
    (unless the test subset chose the epoch, whose scores are kept, or test scoring is off)."""
    if best.weights:
        load_trainable(params, best.weights)
    sha = None
    if run.folder is not None:
        record = {"config": run.config.to_dict(), "prompt": run.task.encoder.record(), "epoch": best.epoch,
                  "versions": versions()}
        if (head := head_record(peft_model)) is not None:
            record["head"] = head  # what plain AutoModelForSequenceClassification + peft need (README)
        sha = run.folder.save_adapter(peft_model, record)
    if best.select_on == "test":
        return dict(best.record["test"], evaluated_on="test"), best.predictions, sha
    if not run.config.train.score_test:  # validation only (tune trials): the test subset is never looked at
        return dict(best.record["val"], evaluated_on="val"), [], sha
    metrics, predictions = run.evaluate(peft_model, run.task.test, "test", journalled=True)
    return dict(metrics, evaluated_on="test"), predictions, sha


def training_summary(run: Run, history: list[EpochRecord], best: BestEpoch, load_s: float,
                     result_eval_s: float | None = None) -> dict:
    """The training part of metrics.json: protocol, chosen epoch, per-epoch history, sizes, timings.
    `result_eval_s`: the scoring seconds of the result's metrics (chosen_result), a pass of its own only where
    the test subset was scored after training. timings.eval_s is all the run's scoring: every epoch's passes and
    that final test pass (`final_test_s`, also kept on its own; records before it lacked that pass,
    report.tables.scoring_seconds adds it back)."""
    per_epoch = [epoch_summary(h) for h in history]
    train_s, train_tokens = sum(h.seconds for h in history), sum(h.tokens for h in history)
    test_in_epochs = sum(1 for h in history if "test" in h.metrics)
    final_test = run.config.train.select_on != "test" and run.config.train.score_test
    final_test_s = float(result_eval_s or 0.0) if final_test else 0.0
    eval_s = sum(h["eval_seconds"] for h in per_epoch) + final_test_s
    return {"command": "train", "lr": run.config.train.lr, "selected_on": best.select_on, "best_epoch": best.epoch,
            "val": best.record.get("val"), "selected_on_val": selected_on_val(per_epoch),
            "test_evaluations": test_in_epochs + final_test, "per_epoch": per_epoch,
            "n_train": len(run.task.train), "n_val": len(run.task.val),
            "train_ids_sha256": ids_sha256(run.task.train), "train_tokens": train_tokens,
            "train_tokens_per_s": train_tokens / train_s if train_s else 0.0,
            "timings": {"load_s": load_s, "train_s": train_s, "eval_s": eval_s, "final_test_s": final_test_s,
                        "total_s": time.perf_counter() - run.start}}


def epoch_summary(h: EpochRecord) -> dict:
    entry = {"epoch": h.epoch, "train_loss": h.loss, "train_seconds": h.seconds,
             "train_tokens_per_s": h.tokens / h.seconds if h.seconds else 0.0,
             "eval_seconds": sum(m["eval_seconds"] for m in h.metrics.values())}
    for split, prefix in (("test", ""), ("val", "val_")):
        if split in h.metrics:
            entry.update({f"{prefix}accuracy": h.metrics[split]["accuracy"], f"{prefix}ci95": h.metrics[split]["ci95"]})
    return entry


def ids_sha256(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(ex.id for ex in examples).encode("utf-8", "surrogatepass")).hexdigest()


def sample_sha256(samples: Task | Samples) -> str:
    """What a run trains on and chooses its epoch with (a checkpoint of other examples is another run)."""
    return ids_sha256(samples.train) + ("/" + ids_sha256(samples.val) if samples.val else "")


def finished_run(out: Path, config: RunConfig) -> dict | None:
    """The metrics of a finished training run of this config in `out` (for --resume), None if there is none."""
    folder = RunFolder(out)
    metrics = folder.finished_metrics()
    if metrics is None or metrics.get("command") != "train":
        return None  # none, half-finished or damaged: train again (the checkpoint, if any, is used)
    differs = identity_differences(metrics.get("config", {}), config)
    if differs:
        raise PeftlabError(f"--out {out} holds a finished run of another config (it differs in "
                           f"{', '.join(differs[:5])}); choose another --out")
    shutil.rmtree(folder.checkpoint, ignore_errors=True)  # a kill after metrics.json can leave one behind
    return metrics


def predict(texts: list[str], config: RunConfig, model=None, tokenizer=None, classes: list[str] | None = None,
            is_imdb: bool = True) -> list[dict]:
    """Classify raw texts with the base model or `config.adapter`; one dict per text."""
    if not texts:
        raise PeftlabError("no texts to classify: give them as arguments, with --file, or on stdin")
    if model is None:
        model, tokenizer = load_base_model(config.model)
    record = read_adapter_record(config.adapter) if config.adapter else None
    refuse_untrained_head(config)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    classes = classes or (record["prompt"]["classes"] if record else None) or \
        list(config.prompt.label_words or imdb_classes(config.data.labels))  # issue 13: rating-4
    check_objective(config, model, classes)
    encoder = build_prompt_encoder(tokenizer, config.prompt, classes, is_imdb)
    # Untrusted text: lone surrogates (from JSON escapes) cannot be tokenised or printed as UTF-8.
    texts = [replace_lone_surrogates(str(t)) for t in texts]
    examples = [Example(id=str(i), text=t if t.strip() else " ", label=classes[0]) for i, t in enumerate(texts)]
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, read_ids(model, encoder.label_ids))
    result = score_examples(model, rows, len(classes), tokenizer.pad_token_id, position_offset(model),
                            config.eval.eval_batch_size, config.eval.max_batch_tokens, progress=False)
    offset = position_offset(model)
    decided, _ = decide(result.scores, encoder, config.eval, lambda more: score_examples(  # issue 13 hook
        model, more, len(classes), tokenizer.pad_token_id, offset, progress=False).scores, tokenizer)
    probs = torch.softmax(decided, dim=1)  # over the classes, after normalisation and calibration
    return [{"text": t, "pred": classes[int(p.argmax())], "prob": round(float(p.max()), 6),
             "scores": {c: round(float(v), 6) for c, v in zip(classes, s.tolist())}}
            for t, s, p in zip(texts, result.scores, probs)]
