"""One experiment cell end to end: data -> prompt -> model -> train -> evaluate -> run folder.

These are the functions the CLI calls and notebooks import:

    from peftlab import RunConfig, run_eval, run_train, predict
    result = run_train(cfg)            # writes cfg.out and returns the metrics dict

A preloaded `(model, tokenizer)` can be passed in, so that a sweep loads its base model once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from peftlab.config import RunConfig, dump_yaml
from peftlab.data import LabelledSplits, load_splits, select_splits
from peftlab.data.examples import Example, replace_lone_surrogates
from peftlab.data.sources import imdb_classes
from peftlab.distributed import SINGLE, Cluster, join_cluster
from peftlab.errors import DiskFull, PeftlabError, resource_errors
from peftlab.evaluate.calibration import decide
from peftlab.evaluate.metrics import classification_metrics
from peftlab.evaluate.scoring import ScoreResult, build_rows, score_examples
from peftlab.models import attach_method, load_adapter, load_base_model, position_offset, trainable_parameters
from peftlab.models.loading import resolve_model_source
from peftlab.models.methods import detach_method, enable_gradient_checkpointing, peft_type_name, prompt_init_ids
from peftlab.prompts import PromptEncoder, build_prompt_encoder
from peftlab.records import (
    RECORD_FILE,
    atomic_write_text,
    fsync_dir,
    prepare_out_dir,
    read_adapter_record,
    sha256_file,
    write_json,
    write_jsonl,
)
from peftlab.repro import git_commit, hardware, peak_memory_mb, set_seed, versions
from peftlab.train.checkpoint import Checkpoints, differences, load_trainable, trainable_state
from peftlab.train.loop import fit

CHECKPOINT_DIR = "checkpoint"
ADAPTER_FILE = "adapter_model.safetensors"
# Settings that do not change what a run computes: a resumed or rerun run may differ in them.
NOT_IN_FINGERPRINT = ("out", "train.resume", "train.checkpoint_every")


@dataclass
class Task:
    """The examples of one run and how they are prompted."""

    splits: LabelledSplits
    train: list[Example]
    test: list[Example]
    encoder: PromptEncoder


def show_progress(progress: bool | None) -> bool:
    """Progress bars unless turned off by the caller or by PEFTLAB_PROGRESS=0."""
    return os.environ.get("PEFTLAB_PROGRESS", "1") != "0" if progress is None else progress


def default_out(command: str) -> Path:
    return Path("runs") / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_task(config: RunConfig, tokenizer, n_train: int | None = None, splits: LabelledSplits | None = None) -> Task:
    """Read the data, pick the seeded balanced samples and build the prompt encoder."""
    splits = splits or load_splits(config.data)
    train, test = select_splits(splits, config.data.n_train if n_train is None else n_train,
                                config.data.n_test, config.data.data_seed)
    encoder = build_prompt_encoder(tokenizer, config.prompt, splits.classes, splits.is_imdb,  # issue 13 hook: shots
                                   splits.train, config.data.data_seed)
    return Task(splits=splits, train=train, test=test, encoder=encoder)


def check_data(config: RunConfig, n_train: int | None = None) -> LabelledSplits:
    """Read and sample the data before any heavy work, so that data mistakes fail in seconds."""
    splits = load_splits(config.data)
    select_splits(splits, config.data.n_train if n_train is None else n_train, config.data.n_test,
                  config.data.data_seed)
    return splits


def evaluate_examples(model, tokenizer, encoder: PromptEncoder, examples: list[Example], config: RunConfig,
                      progress: bool = True, desc: str = "evaluating", cluster: Cluster = SINGLE,
                      val_offsets=None) -> tuple[dict, list[dict], ScoreResult]:
    """Score the examples and return (metrics, predictions, raw scores); with several processes each
    scores its share and all receive all scores (peftlab.distributed)."""
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, encoder.label_ids)
    n_classes, offset = len(encoder.classes), position_offset(model)
    result = cluster.score(lambda part, max_examples, max_tokens: score_examples(
        model, part, n_classes, tokenizer.pad_token_id, offset, max_examples, max_tokens, progress, desc),
        rows, [sum(len(row.seq) + offset for row in r) for r in rows], n_classes, config.eval.eval_batch_size,
        config.eval.max_batch_tokens)
    decided, decision = decide(result.scores, encoder, config.eval, lambda more: score_examples(  # issue 13 hook
        model, more, n_classes, tokenizer.pad_token_id, offset, progress=False).scores, tokenizer, val_offsets)
    preds = decided.argmax(dim=1).tolist()
    gold = [e.label for e in encoded]
    metrics = classification_metrics(gold, preds, encoder.classes)
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
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(device)},
            "trainable_parameters": trainable, "total_parameters": total, "versions": versions(),
            "hardware": hardware(), "git_commit": git_commit()}


def write_config(out: Path, config: RunConfig, command: str) -> None:
    """config.yaml, headed by the command that reruns it; written first, so a killed run says what it was."""
    header = f"# peftlab {command} --config config.yaml   (or: peftlab rerun <this folder>)\n"
    atomic_write_text(out / "config.yaml", header + dump_yaml(config))


def write_run(out: Path, config: RunConfig, metrics: dict, predictions: list[dict], command: str) -> None:
    metrics["out"] = str(out)
    write_config(out, config, command)
    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "metrics.json", metrics)  # last: its presence marks a finished run


def memory_fix(config: RunConfig, training: bool) -> str:
    """What to lower when memory runs out, with the values in use."""
    train = (f"lower --batch-size (now {config.train.batch_size}; raise --grad-accum to keep the effective "
             f"batch) or --max-input-tokens (now {config.prompt.max_input_tokens}), " if training else "")
    return (train + f"lower --eval-batch-size (now {config.eval.eval_batch_size}) or --max-batch-tokens (now "
            f"{config.eval.max_batch_tokens}), or use a smaller --model or --dtype bf16"
            + ("; add --resume to continue from the last checkpoint" if training else ""))


def run_eval(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Zero-shot evaluation (or evaluation of `config.adapter`); writes the run folder."""
    start, progress = time.perf_counter(), show_progress(progress)
    cluster = join_cluster(config.model, config.train.strategy)  # one process unless launched on several
    progress = progress and cluster.is_main
    out = prepare_out_dir(config.out or default_out("eval")) if cluster.is_main else None  # rank 0 writes
    splits = check_data(config, n_train=0)
    if cluster.is_main:
        write_config(out, config, "eval")
    if model is None:
        model, tokenizer = load_base_model(cluster.model_config(config.model))
    task = load_task(config, tokenizer, n_train=0, splits=splits)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    model = cluster.prepare_model(model)
    load_s = time.perf_counter() - start
    with resource_errors("evaluating", memory_fix(config, training=False)):
        metrics, predictions, _ = evaluate_examples(model, tokenizer, task.encoder, task.test, config, progress,
                                                    cluster=cluster)
    metrics.update(run_record(config, task.encoder, model), command="eval", adapter=config.adapter,
                   timings={"load_s": load_s, "eval_s": metrics["eval_seconds"],
                            "total_s": time.perf_counter() - start},
                   peak_memory_mb=peak_memory_mb(next(model.parameters()).device), distributed=cluster.record())
    if cluster.is_main:
        write_run(out, config, metrics, predictions, "eval")
    metrics["out"] = str(out or config.out)
    return metrics


def run_train(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Train a fresh adapter, evaluate after every epoch, keep the best epoch; writes the run folder.

    The run checkpoints itself into <out>/checkpoint; with `train.resume` a killed run continues
    from there (and a finished one is returned as it is).
    """
    start, progress = time.perf_counter(), show_progress(progress)
    peft_type_name(config.method.method)  # an unknown method fails before any heavy work
    if config.data.n_train == 0:
        raise PeftlabError("data.n_train is 0: there is nothing to train on; give --n-train")
    cluster = join_cluster(config.model, config.train.strategy)  # one process unless launched on several
    if cluster.distributed and config.train.resume:
        raise PeftlabError("--resume of a run on several processes is not supported yet; rerun it from the start")
    progress = progress and cluster.is_main
    out = (prepare_out_dir(config.out or default_out("train")) if cluster.is_main  # rank 0 alone writes
           else Path(config.out or default_out("train")).expanduser())
    if config.train.resume and (finished := finished_run(out, config)) is not None:
        return finished
    splits = check_data(config)
    if cluster.is_main:
        write_config(out, config, "train")
    if model is None:
        model, tokenizer = load_base_model(cluster.model_config(config.model))
    task = load_task(config, tokenizer, splits=splits)
    set_seed(config.train.seed)
    init_ids = prompt_init_ids(config.method, tokenizer, task.encoder.instruction, task.encoder.label_ids)
    peft_model = attach_method(model, config.method, init_ids, config.train.seed)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    peft_model = cluster.prepare_model(peft_model)  # fsdp: shard the frozen base across the processes
    trainable, total = trainable_parameters(peft_model)  # counted now: detach_method removes the adapter
    load_s = time.perf_counter() - start

    encoded = task.encoder.encode(task.train, tokenizer)
    rows = build_rows(encoded, task.encoder.label_ids, gold_only=config.train.loss == "lm")
    gold = [e.label for e in encoded]
    lr = config.train.lr  # resolved per method by RunConfig.__post_init__
    run_fingerprint = fingerprint(config, task.train)
    checkpoints = Checkpoints(out / CHECKPOINT_DIR, config.train.checkpoint_every, run_fingerprint)
    resumed = config.train.resume and checkpoints.load()
    best = checkpoints.extra  # the best epoch so far: epoch, metrics, predictions (saved with each checkpoint)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if best and adapter_epoch(out / "adapter") != best["epoch"]:
        # Killed between saving a new best adapter and the checkpoint that records it: put the
        # recorded best back (fit then restores the latest weights from the checkpoint).
        load_trainable(params, checkpoints.extra_tensors)
        save_adapter(peft_model, out / "adapter", config, task.encoder, best["epoch"])

    def on_epoch_end(epoch: int) -> dict:
        metrics, predictions, _ = evaluate_examples(peft_model, tokenizer, task.encoder, task.test, config,
                                                    progress, desc=f"eval epoch {epoch}", cluster=cluster)
        if not best or metrics["accuracy"] > best["metrics"]["accuracy"]:
            best.update(epoch=epoch, metrics=metrics, predictions=predictions)
            checkpoints.extra_tensors = trainable_state(params)
            if cluster.is_main:
                save_adapter(peft_model, out / "adapter", config, task.encoder, epoch)
        return metrics

    try:
        with resource_errors("training", memory_fix(config, training=True)):
            history = fit(peft_model, rows, gold, len(task.encoder.classes), tokenizer.pad_token_id,
                          position_offset(peft_model), config.train, lr, on_epoch_end, progress,
                          None if cluster.distributed else checkpoints, cluster=cluster)
    finally:
        if cluster.strategy != "fsdp":  # a sharded model stays sharded: its process ends with the run
            detach_method(peft_model)  # the caller's base model comes back untouched, e.g. for the next cell
    metrics = dict(best["metrics"])
    train_s = sum(h.seconds for h in history)
    train_tokens = sum(h.tokens for h in history)
    metrics.update(run_record(config, task.encoder, peft_model), trainable_parameters=trainable,
                   total_parameters=total, command="train", lr=lr, best_epoch=best["epoch"],
                   per_epoch=[{"epoch": h.epoch, "accuracy": h.metrics["accuracy"], "ci95": h.metrics["ci95"],
                               "train_loss": h.loss, "train_seconds": h.seconds,
                               "train_tokens_per_s": h.tokens / h.seconds if h.seconds else 0.0,
                               "eval_seconds": h.metrics["eval_seconds"]} for h in history],
                   n_train=len(task.train), train_ids_sha256=run_fingerprint["train_ids_sha256"],
                   train_tokens=train_tokens,
                   train_tokens_per_s=train_tokens / train_s if train_s else 0.0,
                   adapter_sha256=sha256_file(out / "adapter" / ADAPTER_FILE) if cluster.is_main else None,
                   resumed_from={k: checkpoints.loaded["position"][k] for k in ("epoch", "batch")} if resumed else None,
                   timings={"load_s": load_s, "train_s": train_s,
                            "eval_s": sum(h.metrics["eval_seconds"] for h in history),
                            "total_s": time.perf_counter() - start},
                   peak_memory_mb=peak_memory_mb(next(peft_model.parameters()).device), distributed=cluster.record())
    if cluster.is_main:
        write_run(out, config, metrics, best["predictions"], "train")
        checkpoints.remove()  # after metrics.json: a kill in between leaves a finished run, which resume returns
    metrics["out"] = str(out)
    return metrics


def fingerprint(config: RunConfig, train: list[Example]) -> dict:
    """What a training run computes: its config (less NOT_IN_FINGERPRINT) and its training sample."""
    ids = "\n".join(ex.id for ex in train).encode("utf-8", "surrogatepass")
    return {"config": comparable_config(config.to_dict()), "train_ids_sha256": hashlib.sha256(ids).hexdigest()}


def comparable_config(config: dict) -> dict:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in NOT_IN_FINGERPRINT:
        section, _, name = key.rpartition(".")
        (config.get(section, {}) if section else config).pop(name, None)
    return config


def finished_run(out: Path, config: RunConfig) -> dict | None:
    """The metrics of a finished run of this config in `out` (for --resume), None if there is none."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # half-finished or damaged: train again (the checkpoint, if any, is used)
    if metrics.get("command") != "train":
        return None
    differs = differences(comparable_config(metrics.get("config", {})), comparable_config(config.to_dict()))
    if differs:
        raise PeftlabError(f"--out {out} holds a finished run of another config (it differs in "
                           f"{', '.join(differs[:5])}); choose another --out")
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # a kill after metrics.json can leave one behind
    return metrics


def adapter_epoch(folder: Path) -> int | None:
    try:
        record = read_adapter_record(folder)
    except PeftlabError:
        return None
    return record.get("epoch") if record else None


def save_adapter(peft_model, folder: Path, config: RunConfig, encoder: PromptEncoder, epoch: int | None = None
                 ) -> None:
    """The adapter in plain peft format, plus peftlab's record of how it was trained and prompted.

    Written to a temporary folder first, then moved file by file with os.replace (weights first,
    the record last), so that a kill or a full disk never leaves half a file in `folder`.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".adapter-"))
    try:
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if "No space left" not in str(exc):
                raise
            raise DiskFull(f"disk full while saving the adapter to {folder}: free space on that disk or choose "
                           "another --out; files written before are intact") from None
        write_json(tmp / RECORD_FILE, {"config": config.to_dict(), "prompt": encoder.record(), "epoch": epoch,
                                       "versions": versions()})
        folder.mkdir(exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: (n == RECORD_FILE, n != ADAPTER_FILE)):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def predict(texts: list[str], config: RunConfig, model=None, tokenizer=None, classes: list[str] | None = None,
            is_imdb: bool = True) -> list[dict]:
    """Classify raw texts with the base model or `config.adapter`; one dict per text."""
    if not texts:
        raise PeftlabError("no texts to classify: give them as arguments, with --file, or on stdin")
    if model is None:
        model, tokenizer = load_base_model(config.model)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    classes = classes or list(config.prompt.label_words or imdb_classes(config.data.labels))  # issue 13: rating-4
    encoder = build_prompt_encoder(tokenizer, config.prompt, classes, is_imdb)
    # Untrusted text: lone surrogates (from JSON escapes) cannot be tokenised or printed as UTF-8.
    texts = [replace_lone_surrogates(str(t)) for t in texts]
    examples = [Example(id=str(i), text=t if t.strip() else " ", label=classes[0]) for i, t in enumerate(texts)]
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, encoder.label_ids)
    result = score_examples(model, rows, len(classes), tokenizer.pad_token_id, position_offset(model),
                            config.eval.eval_batch_size, config.eval.max_batch_tokens, progress=False)
    offset = position_offset(model)
    decided, _ = decide(result.scores, encoder, config.eval, lambda more: score_examples(  # issue 13 hook
        model, more, len(classes), tokenizer.pad_token_id, offset, progress=False).scores, tokenizer)
    probs = torch.softmax(decided, dim=1)  # over the classes, after normalisation and calibration
    return [{"text": t, "pred": classes[int(p.argmax())], "prob": round(float(p.max()), 6),
             "scores": {c: round(float(v), 6) for c, v in zip(classes, s.tolist())}}
            for t, s, p in zip(texts, result.scores, probs)]
