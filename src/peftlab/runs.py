"""One experiment cell end to end: data -> prompt -> model -> train -> evaluate -> run folder.

These are the functions the CLI calls and notebooks import:

    from peftlab import RunConfig, run_eval, run_train, predict
    result = run_train(cfg)            # writes cfg.out and returns the metrics dict

A preloaded `(model, tokenizer)` can be passed in, so that a sweep loads its base model once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from peftlab.config import RunConfig, dump_yaml
from peftlab.data import LabelledSplits, load_splits, select_splits
from peftlab.data.examples import Example
from peftlab.errors import PeftlabError
from peftlab.evaluate.metrics import classification_metrics
from peftlab.evaluate.scoring import ScoreResult, build_rows, score_examples
from peftlab.models import attach_method, load_adapter, load_base_model, position_offset, trainable_parameters
from peftlab.models.loading import resolve_model_source
from peftlab.models.methods import detach_method, peft_type_name, prompt_init_ids
from peftlab.prompts import PromptEncoder, build_prompt_encoder
from peftlab.records import RECORD_FILE, atomic_write_text, prepare_out_dir, write_json, write_jsonl
from peftlab.repro import git_commit, hardware, peak_memory_mb, set_seed, versions
from peftlab.train.loop import default_lr, fit


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
    encoder = build_prompt_encoder(tokenizer, config.prompt, splits.classes, splits.is_imdb)
    return Task(splits=splits, train=train, test=test, encoder=encoder)


def check_data(config: RunConfig, n_train: int | None = None) -> LabelledSplits:
    """Read and sample the data before any heavy work, so that data mistakes fail in seconds."""
    splits = load_splits(config.data)
    select_splits(splits, config.data.n_train if n_train is None else n_train, config.data.n_test,
                  config.data.data_seed)
    return splits


def evaluate_examples(model, tokenizer, encoder: PromptEncoder, examples: list[Example], config: RunConfig,
                      progress: bool = True, desc: str = "evaluating") -> tuple[dict, list[dict], ScoreResult]:
    """Score the examples and return (metrics, predictions, raw scores)."""
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, encoder.label_ids)
    result = score_examples(model, rows, len(encoder.classes), tokenizer.pad_token_id, position_offset(model),
                            config.eval.eval_batch_size, config.eval.max_batch_tokens, progress, desc)
    preds = result.scores.argmax(dim=1).tolist()
    gold = [e.label for e in encoded]
    metrics = classification_metrics(gold, preds, encoder.classes)
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


def write_run(out: Path, config: RunConfig, metrics: dict, predictions: list[dict]) -> None:
    metrics["out"] = str(out)
    atomic_write_text(out / "config.yaml", dump_yaml(config))
    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "metrics.json", metrics)  # last: its presence marks a finished run


def run_eval(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Zero-shot evaluation (or evaluation of `config.adapter`); writes the run folder."""
    start, progress = time.perf_counter(), show_progress(progress)
    out = prepare_out_dir(config.out or default_out("eval"))
    splits = check_data(config, n_train=0)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    task = load_task(config, tokenizer, n_train=0, splits=splits)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    load_s = time.perf_counter() - start
    metrics, predictions, _ = evaluate_examples(model, tokenizer, task.encoder, task.test, config, progress)
    metrics.update(run_record(config, task.encoder, model), command="eval", adapter=config.adapter,
                   timings={"load_s": load_s, "eval_s": metrics["eval_seconds"],
                            "total_s": time.perf_counter() - start},
                   peak_memory_mb=peak_memory_mb(next(model.parameters()).device))
    write_run(out, config, metrics, predictions)
    return metrics


def run_train(config: RunConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Train a fresh adapter, evaluate after every epoch, keep the best epoch; writes the run folder."""
    start, progress = time.perf_counter(), show_progress(progress)
    peft_type_name(config.method.method)  # an unknown method fails before any heavy work
    if config.data.n_train == 0:
        raise PeftlabError("data.n_train is 0: there is nothing to train on; give --n-train")
    out = prepare_out_dir(config.out or default_out("train"))
    splits = check_data(config)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    task = load_task(config, tokenizer, splits=splits)
    set_seed(config.train.seed)
    init_ids = prompt_init_ids(config.method, tokenizer, task.encoder.instruction, task.encoder.label_ids)
    peft_model = attach_method(model, config.method, init_ids, config.train.seed)
    load_s = time.perf_counter() - start

    encoded = task.encoder.encode(task.train, tokenizer)
    rows = build_rows(encoded, task.encoder.label_ids, gold_only=config.train.loss == "lm")
    gold = [e.label for e in encoded]
    lr = config.train.lr or default_lr(config.method.method)
    best: dict = {}

    def on_epoch_end(epoch: int) -> dict:
        metrics, predictions, _ = evaluate_examples(peft_model, tokenizer, task.encoder, task.test, config,
                                                    progress, desc=f"eval epoch {epoch}")
        if not best or metrics["accuracy"] > best["metrics"]["accuracy"]:
            best.update(epoch=epoch, metrics=metrics, predictions=predictions)
            save_adapter(peft_model, out / "adapter", config, task.encoder)
        return metrics

    try:
        history = fit(peft_model, rows, gold, len(task.encoder.classes), tokenizer.pad_token_id,
                      position_offset(peft_model), config.train, lr, on_epoch_end, progress)
    finally:
        detach_method(peft_model)  # the caller's base model comes back untouched, e.g. for the next cell
    metrics = dict(best["metrics"])
    train_s = sum(h.seconds for h in history)
    train_tokens = sum(h.tokens for h in history)
    metrics.update(run_record(config, task.encoder, peft_model), command="train", lr=lr, best_epoch=best["epoch"],
                   per_epoch=[{"epoch": h.epoch, "accuracy": h.metrics["accuracy"], "ci95": h.metrics["ci95"],
                               "train_loss": h.loss, "train_seconds": h.seconds,
                               "train_tokens_per_s": h.tokens / h.seconds if h.seconds else 0.0,
                               "eval_seconds": h.metrics["eval_seconds"]} for h in history],
                   n_train=len(task.train), train_tokens=train_tokens,
                   train_tokens_per_s=train_tokens / train_s if train_s else 0.0,
                   timings={"load_s": load_s, "train_s": train_s,
                            "eval_s": sum(h.metrics["eval_seconds"] for h in history),
                            "total_s": time.perf_counter() - start},
                   peak_memory_mb=peak_memory_mb(next(peft_model.parameters()).device))
    write_run(out, config, metrics, best["predictions"])
    return metrics


def save_adapter(peft_model, folder: Path, config: RunConfig, encoder: PromptEncoder) -> None:
    """The adapter in plain peft format, plus peftlab's record of how it was trained and prompted."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    write_json(folder / RECORD_FILE, {"config": config.to_dict(), "prompt": encoder.record(),
                                      "versions": versions()})


def predict(texts: list[str], config: RunConfig, model=None, tokenizer=None, classes: list[str] | None = None,
            is_imdb: bool = True) -> list[dict]:
    """Classify raw texts with the base model or `config.adapter`; one dict per text."""
    if not texts:
        raise PeftlabError("no texts to classify: give them as arguments, with --file, or on stdin")
    if model is None:
        model, tokenizer = load_base_model(config.model)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    classes = classes or list(config.prompt.label_words or {"negative": 0, "positive": 1})
    encoder = build_prompt_encoder(tokenizer, config.prompt, classes, is_imdb)
    examples = [Example(id=str(i), text=t if t.strip() else " ", label=classes[0]) for i, t in enumerate(texts)]
    encoded = encoder.encode(examples, tokenizer)
    rows = build_rows(encoded, encoder.label_ids)
    result = score_examples(model, rows, len(classes), tokenizer.pad_token_id, position_offset(model),
                            config.eval.eval_batch_size, config.eval.max_batch_tokens, progress=False)
    probs = torch.softmax(result.scores, dim=1)
    return [{"text": t, "pred": classes[int(s.argmax())], "prob": round(float(p.max()), 6),
             "scores": {c: round(float(v), 6) for c, v in zip(classes, s.tolist())}}
            for t, s, p in zip(texts, result.scores, probs)]
