"""A sweep's cells in parallel on a Ray cluster: one cell per worker, the driver alone writes the store.

    peftlab sweep configs/sweeps/smollm2-lora.yaml --workers 4                 # a local Ray cluster
    peftlab sweep configs/sweeps/llama2-lora.yaml --workers 8 --ray-address auto   # a running cluster

The cells of a grid are independent runs, so they spread over workers without changing any result:
each worker is a Ray actor holding a `CellExecutor` (runner.py), which loads a base model once and
reuses it for the cells of that model it is given, exactly as the serial sweep does. A worker
gets one GPU when the cluster has GPUs, else an equal share of the CPUs (as torch threads).

Only the driver touches the results store: it marks a cell running when it hands it to a worker and
writes the record the worker sends back, so the store keeps its single-writer lock and its
guarantees (a killed driver leaves at most the in-flight cells `running`, redone next time).
A worker that dies in the middle of a cell (its process killed, its node lost) costs that cell one
attempt: the driver starts a new worker and hands the cell to it, up to `max_worker_losses`
times, then records it failed. A bug inside a cell (an exception that is not a failure a sweep
survives) stops the sweep as in a serial sweep, after the other running cells have been recorded.

Run folders (adapters, predictions) are written by the workers under the sweep's `out`: on several
machines that must be a file system all of them share; the store holds every cell's full record.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from peftlab.errors import PeftlabError
from peftlab.experiments.grid import Cell, RayOptions, Sweep
from peftlab.experiments.runner import (CellExecutor, CellResult, SweepOutcome, cell_positions, clear_unfinished,
                                        plan_sweep, run_cell, settle)
from peftlab.experiments.store import ResultsStore


class CellWorker:
    """The Ray actor: a CellExecutor in its own process, with its share of threads."""

    def __init__(self, threads: int, load_model: Callable | None, run: Callable):
        import torch

        torch.set_num_threads(max(1, threads))
        # The driver logs each cell; per-batch progress bars from several workers would interleave.
        self.executor = CellExecutor(load_model, run, progress=False)

    def execute(self, cell: Cell):
        return self.executor.execute(cell)


def import_ray():
    try:
        import ray
    except ImportError:
        raise PeftlabError("parallel sweeps (--workers, ray:) need Ray: pip install 'peftlab[ray]' "
                           "(or run the sweep without --workers)") from None
    return ray


def connect(ray, options: RayOptions) -> bool:
    """Join or start the Ray cluster; True when this call started the connection (and must end it)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=options.address, include_dashboard=False, logging_level="warning")
    except ConnectionError as exc:
        raise PeftlabError(f"cannot reach the Ray cluster at {options.address}: {exc}; start it with "
                           "`ray start --head` or leave out --ray-address for a local one") from None
    return True


def worker_resources(ray, options: RayOptions, workers: int) -> tuple[float, float]:
    """(cpus, gpus) per worker, checked against what the cluster has."""
    total = ray.cluster_resources()
    cpus_total, gpus_total = total.get("CPU", 0), total.get("GPU", 0)
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1 if gpus_total else 0)
    cpus = options.cpus_per_worker if options.cpus_per_worker is not None else max(1, int(cpus_total // workers))
    if gpus > gpus_total or cpus > cpus_total:
        raise PeftlabError(f"a worker asks for {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
                           f"{cpus_total:g} CPUs and {gpus_total:g} GPUs; lower cpus_per_worker/gpus_per_worker")
    return cpus, gpus


def run_sweep_parallel(sweep: Sweep, store: ResultsStore, options: RayOptions, retry_failed: bool = False,
                       log: Callable[[str], None] = print, load_model: Callable | None = None,
                       run: Callable = run_cell) -> SweepOutcome:
    """Run the cells the store does not hold as finished on `options.workers` Ray workers."""
    ray = import_ray()
    outcome = SweepOutcome()
    todo = deque(plan_sweep(sweep, store, retry_failed, outcome))
    workers = min(options.workers, len(todo))
    log(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(outcome.skipped)} already in {store.path}, "
        f"{len(todo)} to run on {workers} Ray workers")
    if not todo:
        return outcome
    started = connect(ray, options)
    actors = []
    try:
        cpus, gpus = worker_resources(ray, options, workers)
        actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(CellWorker)

        def new_worker():
            actor = actor_class.remote(int(cpus), load_model, run)
            actors.append(actor)
            return actor

        _schedule(ray, sweep, store, todo, [new_worker() for _ in range(workers)], new_worker, options,
                  outcome, log)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return outcome


def _schedule(ray, sweep: Sweep, store: ResultsStore, todo: deque, idle: list, new_worker, options: RayOptions,
              outcome: SweepOutcome, log) -> None:
    """Hand cells to idle workers and write each result as it comes back, until every cell is done."""
    position = cell_positions(sweep)
    running: dict = {}                   # object ref -> (worker, cell)
    losses: dict[str, int] = {}
    bug: BaseException | None = None     # the first unexpected error: no new cells after it
    while running or (todo and bug is None):
        while todo and idle and bug is None:
            worker, cell = idle.pop(), todo.popleft()
            log(f"{position[cell.key]} {cell.label()} ({cell.key})")
            store.start(cell.key, cell.config.to_dict(), cell.config.out)
            running[worker.execute.remote(cell)] = (worker, cell)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        worker, cell = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the worker's process or node is gone
            losses[cell.key] = losses.get(cell.key, 0) + 1
            if losses[cell.key] >= options.max_worker_losses:
                reason = f"its Ray worker died {losses[cell.key]} times (last: {_last_line(exc)})"
                settle(store, cell, CellResult("failed", reason=reason), outcome, log, prefix=f"  {cell.key} ")
            else:
                # It stays `running` in the store until a new worker takes it (which counts the attempt).
                log(f"  the worker running {cell.key} died; the cell goes to a new worker")
                clear_unfinished(cell)
                todo.appendleft(cell)
            idle.append(new_worker())
            continue
        except ray.exceptions.RayTaskError as exc:
            bug = bug or exc  # the cell stays `running`: the next sweep redoes it, as in a serial sweep
            log(f"  {cell.key} stopped the sweep with an unexpected error: {_last_line(exc)}")
            idle.append(worker)
            continue
        # A cell that changed its shared base model raises here, as in a serial sweep.
        settle(store, cell, result, outcome, log, prefix=f"  {cell.key} ")
        idle.append(worker)
    if bug is not None:
        raise bug.as_instanceof_cause()


def _last_line(exc: BaseException) -> str:
    """Ray's error text ends with the line that says what happened (the exception, or the death)."""
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__

