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
import gc
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from peftlab.errors import DISK_FULL_ERRNOS, PeftlabError
from peftlab.experiments.grid import Cell, Sweep, same_run
from peftlab.experiments.store import ResultsStore
from peftlab.models.loading import base_dtype
from peftlab.records import PEAK_SCOPE_CELL, RunFolder
from peftlab.train.checkpoint import checkpoint_precision
from peftlab.repro import reset_peak_memory
from peftlab.train.preemption import Preempted
from peftlab.tracking import group_sweep


INTERRUPTED = "interrupted"  # the reason of a running cell stopped by a signal starts so (store.interrupt)


class BaseModelChanged(RuntimeError):
    """A finished cell left the shared base model different from how it was loaded (a peftlab bug)."""


class StoppedEarly(Exception):
    """Raised inside a cell's run to end it on purpose before its last epoch (a tune trial pruned on a
    worker, tune_parallel.py); the cell ends `stopped` with this reason, not as a bug."""


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
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
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
    from peftlab.tracking import run_tracked

    config = cell.config
    if config.train.resume and RunFolder(Path(config.out)).held_run() is None:
        # `sweep --resume` means "continue what can be continued": cells stand at different stages, so a cell
        # with nothing to resume is a notice and starts from the beginning (a single run's --resume is an error).
        print(f"  nothing to resume for {cell.key}: it starts from the beginning", file=sys.stderr, flush=True)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, resume=False))
    elif config.train.resume and precision_changed(cell, model):
        config = dataclasses.replace(config, overwrite=True, train=dataclasses.replace(config.train, resume=False))
    return run_tracked("train" if cell.trains else "eval", config, model, tokenizer, progress=progress)


def precision_changed(cell: Cell, model) -> bool:
    """A cut-off cell whose checkpoint was trained on a base of another precision than this machine's
    (`model.dtype: auto` is bf16 on one CPU, fp32 on the next; results/inflight.py carries checkpoints
    between them): it is run again from the start, its old folder moved aside, since continuing it would
    mix two precisions in one cell (a single run's --resume refuses instead: train/checkpoint.py)."""
    trained = checkpoint_precision(RunFolder(Path(cell.config.out)).checkpoint)
    here = base_dtype(model)
    if trained is None or trained == here:
        return False
    print(f"  {cell.key} was cut off on a {trained} base and this machine computes in {here}: it starts from the "
          "beginning (its old folder is moved aside), so that no cell mixes two precisions",
          file=sys.stderr, flush=True)
    return True


def plan_sweep(sweep: Sweep, store: ResultsStore, retry_failed: bool, outcome: SweepOutcome) -> list[Cell]:
    """Register the sweep in the store and return the cells still to run, grouped by base model."""
    sweep.cells = with_earlier_keys(sweep.cells, store)
    members = with_earlier_keys(sweep.members, store)
    group_sweep(sweep.cells, sweep.name)  # trackers: one run per cell, grouped by the sweep (peftlab.tracking)
    member_keys = {m.key for m in members}
    left_out = [c.key for c in store.cells(sweep.name) if c.status == "finished" and c.key not in member_keys]
    if left_out:  # a flag on a key that is not a grid key (--lr, --seed) changes every cell of the table
        print(f"note: {len(left_out)} finished cells of sweep {sweep.name} ({', '.join(left_out[:3])}"
              f"{', ...' if len(left_out) > 3 else ''}) are not cells of this run's settings: the sweep's table "
              "lists this run's cells from now on, and those stay in the store (run without the flag to list "
              "them again, or give these settings their own table with sweep.name)", file=sys.stderr, flush=True)
    # The whole table, also when a flag runs one row of it: the report shows the other rows' cells as before.
    store.register_sweep(sweep.name, sweep.source, sweep.command, sweep.grid, _spec_dict(sweep),
                         [(c.key, c.params) for c in members])
    todo = []
    for cell in sweep.cells:
        status = store.status(cell.key)
        if status == "finished" or (status == "failed" and not retry_failed):
            outcome.skipped.append(cell.key)
            continue
        if status is not None:
            clear_unfinished(cell)
        todo.append(cell)
    # Cells of one model run one after another, so that a worker loads each base model once.
    return [cell for _, cells in group_by_model(todo) for cell in cells]


def clear_unfinished(cell: Cell) -> None:
    """A cell cut off or failed before is redone from scratch, not on top of what the last try left.

    With train.resume a cut-off training cell continues from its checkpoint instead.
    """
    if not getattr(cell.config.train, "resume", False):
        shutil.rmtree(cell.config.out, ignore_errors=True)


def run_sweep(sweep: Sweep, store: ResultsStore, progress: bool | None = None, retry_failed: bool = False,
              log: Callable[[str], None] = print, load_model: Callable | None = None,
              run: Callable = run_cell) -> SweepOutcome:
    """Run every cell of `sweep` that the store does not hold as finished, one after another."""
    outcome = SweepOutcome()
    todo = plan_sweep(sweep, store, retry_failed, outcome)
    log(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(outcome.skipped)} already in {store.path}, "
        f"{len(todo)} to run")
    position = cell_positions(sweep)
    executor = CellExecutor(load_model, run, progress)
    try:
        for cell in todo:
            log(f"{position[cell.key]} {cell.label()} ({cell.key})")
            store.start(cell.key, cell.config.to_dict(), cell.config.out)
            try:
                settle(store, cell, executor.execute(cell), outcome, log)  # a bug raises: the cell stays running
            except Preempted as stopped:  # SIGTERM: the cell's checkpoint is saved; the sweep stops here
                store.interrupt(cell.key, f"{INTERRUPTED}: {stopped}")
                raise
    finally:
        executor.release()
    return outcome


def cell_positions(sweep: Sweep) -> dict[str, str]:
    return {c.key: f"[{i}/{len(sweep.cells)}]" for i, c in enumerate(sweep.cells, start=1)}


@dataclass
class CellResult:
    """What running one cell gave. Plain data: a Ray worker sends it back to the driver."""

    status: str                  # finished | failed | stopped (StoppedEarly) | changed (finished, but it
                                 # changed the shared base)
    record: dict | None = None
    reason: str | None = None
    base_changed: bool = False   # the base differs from how it was loaded (reloaded before the next cell)
    model_loaded: bool = False   # the cell loaded its base model first


def settle(store: ResultsStore, cell: Cell, result: CellResult, outcome: SweepOutcome, log, prefix: str = "  "
           ) -> None:
    """Write a cell's result to the store (committed at once: a later crash cannot lose it)."""
    outcome.model_loads += result.model_loaded
    if result.status == "finished":
        store.finish(cell.key, result.record)
        outcome.ran.append(cell.key)
        record = result.record
        epoch = f", best epoch {record['best_epoch']}" if "best_epoch" in record else ""
        log(f"{prefix}accuracy {record['accuracy']:.2%}{epoch} -> {cell.config.out}")
        return
    store.fail(cell.key, result.reason)
    if result.status == "changed":
        raise BaseModelChanged(f"cell {cell.key} ({cell.label()}) changed the shared base model; "
                               "its result and every later one would be wrong")
    outcome.failed.append((cell.key, result.reason))
    log(f"{prefix}failed: {result.reason}")
    if result.base_changed:
        log(f"{prefix}left the base model changed: it is loaded again")


class CellExecutor:
    """Runs cells on the base model it holds, loading it only when a cell needs another model.

    The serial sweep has one; every worker of a parallel sweep (experiments/parallel.py) has its own.
    After each cell a fingerprint of the base must equal the one taken after loading.
    """

    def __init__(self, load_model: Callable | None = None, run: Callable = run_cell, progress: bool | None = None):
        if load_model is None:
            from peftlab.models import load_base_model as load_model
        self.load_model, self.run, self.progress = load_model, run, progress
        self.model_key: str | None = None
        self.model = self.tokenizer = self.fingerprint = None
        self.load_failures: dict[str, str] = {}  # a model that failed to load is not tried again

    def execute(self, cell: Cell) -> CellResult:
        key = model_key(cell)
        loaded = key != self.model_key
        if key in self.load_failures:
            return CellResult("failed", reason=f"loading the model: {self.load_failures[key]}")
        if loaded:
            self.release()
            try:
                self.model, self.tokenizer = self.load_model(cell.config.model)
            except BaseException as exc:
                reason = failure_reason(exc)
                if reason is None:
                    raise
                self.load_failures[key] = reason
                return CellResult("failed", reason=f"loading the model: {reason}")
            self.model_key, self.fingerprint = key, base_fingerprint(self.model)
        # peak_memory_mb is then this cell's peak, not the sweep's; at_start is what it counts on top of
        at_start = reset_peak_memory(next(self.model.parameters()).device)
        start = time.perf_counter()
        try:
            record = self.run(cell, self.model, self.tokenizer, self.progress)
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, StoppedEarly) else failure_reason(exc)
            if reason is None:
                raise  # a bug, Ctrl-C or kill: the cell stays `running` and the next sweep redoes it
            changed = self._base_changed()
            if changed:
                self.release()
            elif "memory" in reason.lower():
                _free()  # give the next cell what the failed one held
            status = "stopped" if isinstance(exc, StoppedEarly) else "failed"
            return CellResult(status, reason=reason, base_changed=changed, model_loaded=loaded)
        if self._base_changed():
            self.release()
            return CellResult("changed", reason="the cell changed the shared base model (a peftlab bug)",
                              base_changed=True, model_loaded=loaded)
        record = json.loads(json.dumps(record, default=str))  # what the store holds is plain JSON
        record["cell"] = {"key": cell.key, "params": cell.params, "wall_s": time.perf_counter() - start,
                          "host": socket.gethostname(), "pid": os.getpid()}
        record["peak_memory_scope"] = PEAK_SCOPE_CELL  # reset before the cell: the report trusts it as the cell's own
        record["memory_at_cell_start_mb"] = at_start
        return CellResult("finished", record=record, model_loaded=loaded)

    def _base_changed(self) -> bool:
        return base_fingerprint(self.model) != self.fingerprint

    def release(self) -> None:
        """Drop the base model held (before another is loaded, and at the end)."""
        if self.model is not None:
            self.model = self.tokenizer = self.fingerprint = self.model_key = None
            _free()


def model_key(cell: Cell) -> str:
    return json.dumps(cell.config.to_dict()["model"], sort_keys=True)


def group_by_model(cells: list[Cell]) -> list[tuple[object, list[Cell]]]:
    """Cells grouped by their model section, groups in order of first appearance."""
    groups: dict[str, tuple[object, list[Cell]]] = {}
    for cell in cells:
        groups.setdefault(model_key(cell), (cell.config.model, []))[1].append(cell)
    return list(groups.values())


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _spec_dict(sweep: Sweep) -> dict:
    return dataclasses.asdict(sweep.spec)
