"""Running a sweep: each base model loaded once, a fresh adapter per cell, every cell recorded.

Cells are grouped by their model section; a group's base model is loaded once and every cell of
the group trains its own adapter on it (`run_train` removes the adapter again). After each cell
a fingerprint of the base (parameter names, shapes, dtypes, trainability and a strided sample of
every tensor) must equal the one taken after loading: a cell that leaks into the base would make
every later cell wrong, so that stops the sweep with a traceback.

A cell ends `finished` (its record in the store at once) or `failed` with the reason, for the
failures a sweep should survive: a user mistake or bad data (PeftlabError), a diverged loss
(TrainingDiverged), out of memory, a full disk. Anything else is a bug: the traceback is kept
and the cell stays `running`, so the next sweep redoes it, as it redoes a cell cut off by kill -9.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftlab.errors import PeftlabError
from peftlab.experiments.grid import Cell, Sweep, same_run
from peftlab.experiments.store import ResultsStore


class BaseModelChanged(RuntimeError):
    """A finished cell left the shared base model different from how it was loaded (a peftlab bug)."""


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)       # keys finished by this call
    skipped: list[str] = field(default_factory=list)   # finished earlier (or failed, without retry_failed)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    model_loads: int = 0


def failure_reason(exc: BaseException) -> str | None:
    """The one-line reason for a failure a sweep records and survives; None for anything else."""
    if isinstance(exc, PeftlabError):  # includes TrainingDiverged, and OutOfMemory/DiskFull from runs.py
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc}"
    return None


def base_fingerprint(model) -> str:
    """A cheap checksum of the base: structure of every parameter, and a strided sample of its values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{param.requires_grad};".encode())
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 2048)].float().cpu()  # ~2k values: ms even for 70B
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def with_earlier_keys(cells: list[Cell], store: ResultsStore) -> list[Cell]:
    """Cells that a store holds as finished under an older key take that key (see grid.same_run)."""
    unknown = {c.key for c in cells if store.status(c.key) is None}
    finished = store.finished_configs() if unknown else []
    out = []
    for cell in cells:
        if cell.key in unknown:
            earlier = next((key for key, config in finished if same_run(config, cell.config)), None)
            cell = dataclasses.replace(cell, key=earlier) if earlier else cell
        out.append(cell)
    return out


def run_cell(cell: Cell, model, tokenizer, progress: bool | None) -> dict:
    """Zero-shot evaluation for n_train=0, else training; returns the run's metrics record."""
    from peftlab.runs import run_eval, run_train

    run = run_train if cell.trains else run_eval
    return run(cell.config, model, tokenizer, progress=progress)


def run_sweep(sweep: Sweep, store: ResultsStore, progress: bool | None = None, retry_failed: bool = False,
              log: Callable[[str], None] = print, load_model: Callable | None = None,
              run: Callable = run_cell) -> SweepOutcome:
    """Run every cell of `sweep` that the store does not hold as finished; see the module docstring."""
    from peftlab.models import load_base_model

    load_model = load_model or load_base_model
    outcome = SweepOutcome()
    sweep.cells = with_earlier_keys(sweep.cells, store)
    store.register_sweep(sweep.name, sweep.source, sweep.command, sweep.grid, _spec_dict(sweep),
                         [(c.key, c.params) for c in sweep.cells])
    todo = []
    for cell in sweep.cells:
        status = store.status(cell.key)
        if status == "finished" or (status == "failed" and not retry_failed):
            outcome.skipped.append(cell.key)
            continue
        if status is not None and not getattr(cell.config.train, "resume", False):
            # Cut off or failed before: redo it from scratch, not on top of what the last try left.
            # (With train.resume a cut-off training cell continues from its checkpoint instead.)
            shutil.rmtree(cell.config.out, ignore_errors=True)
        todo.append(cell)
    log(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(outcome.skipped)} already in {store.path}, "
        f"{len(todo)} to run")
    position = {c.key: f"[{i}/{len(sweep.cells)}]" for i, c in enumerate(sweep.cells, start=1)}
    for model_config, cells in group_by_model(todo):
        _run_group(model_config, cells, store, outcome, load_model, run, progress, log, position)
        _free()  # the group's base model goes before the next one is loaded
    return outcome


def _run_group(model_config, cells: list[Cell], store: ResultsStore, outcome: SweepOutcome, load_model, run,
               progress, log, position: dict) -> None:
    """The cells of one base model: load it once, run each cell on it, check it after each."""
    model = tokenizer = fingerprint = None
    for i, cell in enumerate(cells):
        if model is None:
            try:
                model, tokenizer = load_model(model_config)
            except BaseException as exc:
                reason = failure_reason(exc)
                if reason is None:
                    raise
                log(f"cannot load {model_config.name}: {reason}; its {len(cells) - i} cells fail")
                for rest in cells[i:]:
                    store.start(rest.key, rest.config.to_dict(), rest.config.out)
                    store.fail(rest.key, f"loading the model: {reason}")
                    outcome.failed.append((rest.key, reason))
                return
            outcome.model_loads += 1
            fingerprint = base_fingerprint(model)
        log(f"{position[cell.key]} {cell.label()} ({cell.key})")
        record = _run_one(cell, model, tokenizer, store, outcome, progress, run, log)
        changed = base_fingerprint(model) != fingerprint
        if record is not None and changed:
            store.fail(cell.key, "the cell changed the shared base model (a peftlab bug)")
            raise BaseModelChanged(f"cell {cell.key} ({cell.label()}) changed the shared base model; "
                                   "its result and every later one would be wrong")
        if record is not None:
            store.finish(cell.key, record)  # committed at once: a later crash cannot lose it
            outcome.ran.append(cell.key)
            epoch = f", best epoch {record['best_epoch']}" if "best_epoch" in record else ""
            log(f"  accuracy {record['accuracy']:.2%}{epoch} -> {cell.config.out}")
        elif changed:
            log("  the failed cell left the base model changed: loading it again")
            model = tokenizer = None
            _free()


def _run_one(cell: Cell, model, tokenizer, store: ResultsStore, outcome: SweepOutcome, progress, run, log
             ) -> dict | None:
    """Run one cell; its record, or None after recording a failure the sweep survives."""
    store.start(cell.key, cell.config.to_dict(), cell.config.out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_memory_mb is then this cell's peak, not the sweep's
    start = time.perf_counter()
    try:
        record = run(cell, model, tokenizer, progress)
    except BaseException as exc:
        reason = failure_reason(exc)
        if reason is None:
            raise  # a bug, Ctrl-C or kill: the cell stays `running` and the next sweep redoes it
        store.fail(cell.key, reason)
        outcome.failed.append((cell.key, reason))
        log(f"  failed: {reason}")
        if "memory" in reason.lower():
            _free()  # give the next cell what the failed one held
        return None
    record = json.loads(json.dumps(record, default=str))  # what the store holds is plain JSON
    record["cell"] = {"key": cell.key, "params": cell.params, "wall_s": time.perf_counter() - start}
    return record


def group_by_model(cells: list[Cell]) -> list[tuple[object, list[Cell]]]:
    """Cells grouped by their model section, groups in order of first appearance."""
    groups: dict[str, tuple[object, list[Cell]]] = {}
    for cell in cells:
        key = json.dumps(cell.config.to_dict()["model"], sort_keys=True)
        groups.setdefault(key, (cell.config.model, []))[1].append(cell)
    return list(groups.values())


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _spec_dict(sweep: Sweep) -> dict:
    return dataclasses.asdict(sweep.spec)
