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

The workers, the losses and the errors are a `WorkerPool`'s; `peftlab tune --workers` runs its trials'
cells on one too (tune_parallel.py).
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
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

        from peftlab.cli import quiet_libraries

        torch.set_num_threads(max(1, threads))
        # The driver logs each cell; per-batch progress bars and library notices (Ray forwards a worker's
        # output to the driver's) from several workers would interleave.
        quiet_libraries()
        self.executor = CellExecutor(load_model, run, progress=False)

    def execute(self, cell: Cell):
        return self.executor.execute(cell)


def import_ray():
    try:
        import ray
    except ImportError:
        raise PeftlabError("--workers and a ray: section need Ray: pip install 'peftlab[ray]' "
                           "(or run without --workers)") from None
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


def check_device(device: str, options: RayOptions, source: str) -> None:
    """Refuse a model.device no Ray worker can use: a worker sees only the GPUs Ray gives it, from cuda:0 up
    (Ray sets CUDA_VISIBLE_DEVICES), and none with gpus_per_worker 0."""
    if device.split(":")[0] != "cuda":
        return
    if options.gpus_per_worker == 0:
        raise PeftlabError(f"{source}: model.device={device} with ray gpus_per_worker=0 cannot work: the workers see "
                           "no GPU; give each worker a GPU or set model.device: cpu")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= max(1, int(options.gpus_per_worker or 1)):
        raise PeftlabError(f"{source}: model.device={device} cannot work on Ray workers (--workers): each worker sees "
                           "only the GPU Ray gives it, as cuda:0; set model.device: cuda (or auto)")


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


@dataclass
class Ended:
    """What became of a cell handed to a worker: its result, its worker's death, or a bug."""

    cell: Cell
    result: CellResult | None = None  # it ran; or its workers died max_worker_losses times: a failed result
    lost: str | None = None           # its worker died (Ray's last line): it goes to a new worker
    bug: BaseException | None = None  # an unexpected error in the cell (a RayTaskError)


class WorkerPool:
    """Ray workers that run cells: an idle one takes a cell, a dead one is replaced, a cell's losses counted.

    The parallel sweep (below) and the parallel tune (tune_parallel.py) schedule their cells on one; the
    caller alone writes the results store.
    """

    def __init__(self, ray, options: RayOptions, workers: int, load_model: Callable | None, run: Callable):
        self.ray, self.options = ray, options
        cpus, gpus = worker_resources(ray, options, workers)
        self._actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(CellWorker)
        self._args = (int(cpus), load_model, run)
        self.actors: list = []
        self.idle = [self._new_worker() for _ in range(workers)]
        self.running: dict = {}             # object ref -> (worker, cell)
        self.losses: dict[str, int] = {}    # cell key -> workers that died running it

    def _new_worker(self):
        actor = self._actor_class.remote(*self._args)
        self.actors.append(actor)
        return actor

    def submit(self, cell: Cell) -> None:
        """Hand `cell` to an idle worker (the caller has marked it running in the store)."""
        worker = self.idle.pop()
        self.running[worker.execute.remote(cell)] = (worker, cell)

    def wait(self, also: list = ()):
        """The next cell to end, as an `Ended`; or the first ref of `also` that is ready before any cell ends."""
        (ref,), _ = self.ray.wait(list(self.running) + list(also), num_returns=1)
        if ref not in self.running:
            return ref
        worker, cell = self.running.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:  # the worker's process or node is gone
            self.idle.append(self._new_worker())
            losses = self.losses[cell.key] = self.losses.get(cell.key, 0) + 1
            if losses >= self.options.max_worker_losses:
                reason = f"its Ray worker died {losses} times (last: {_last_line(exc)})"
                return Ended(cell, result=CellResult("failed", reason=reason))
            return Ended(cell, lost=_last_line(exc))
        except self.ray.exceptions.RayTaskError as exc:
            self.idle.append(worker)
            return Ended(cell, bug=exc)
        self.idle.append(worker)
        return Ended(cell, result=result)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def ray_cluster(options: RayOptions):
    """Ray, connected to the cluster of `options`: joined, or started here and shut down on leaving."""
    ray = import_ray()
    started = connect(ray, options)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_sweep_parallel(sweep: Sweep, store: ResultsStore, options: RayOptions, retry_failed: bool = False,
                       log: Callable[[str], None] = print, load_model: Callable | None = None,
                       run: Callable = run_cell) -> SweepOutcome:
    """Run the cells the store does not hold as finished on `options.workers` Ray workers."""
    for cell in sweep.cells:
        check_device(cell.config.model.device, options, sweep.source or sweep.name)
    outcome = SweepOutcome()
    todo = deque(plan_sweep(sweep, store, retry_failed, outcome))
    workers = min(options.workers, len(todo))
    log(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(outcome.skipped)} already in {store.path}, "
        f"{len(todo)} to run on {workers} Ray workers")
    if not todo:
        return outcome
    with ray_cluster(options) as ray, WorkerPool(ray, options, workers, load_model, run) as pool:
        _schedule(sweep, store, todo, pool, outcome, log)
    return outcome


def _schedule(sweep: Sweep, store: ResultsStore, todo: deque, pool: WorkerPool, outcome: SweepOutcome, log) -> None:
    """Hand cells to idle workers and write each result as it comes back, until every cell is done."""
    position = cell_positions(sweep)
    bug: BaseException | None = None     # the first unexpected error: no new cells after it
    while pool.running or (todo and bug is None):
        while todo and pool.idle and bug is None:
            cell = todo.popleft()
            log(f"{position[cell.key]} {cell.label()} ({cell.key})")
            store.start(cell.key, cell.config.to_dict(), cell.config.out)
            pool.submit(cell)
        ended = pool.wait()
        cell = ended.cell
        if ended.lost is not None:
            # It stays `running` in the store until a new worker takes it (which counts the attempt).
            log(f"  the worker running {cell.key} died; the cell goes to a new worker")
            clear_unfinished(cell)
            todo.appendleft(cell)
        elif ended.bug is not None:
            bug = bug or ended.bug  # the cell stays `running`: the next sweep redoes it, as in a serial sweep
            log(f"  {cell.key} stopped the sweep with an unexpected error: {_last_line(ended.bug)}")
        else:
            # A cell that changed its shared base model raises here, as in a serial sweep.
            settle(store, cell, ended.result, outcome, log, prefix=f"  {cell.key} ")
    if bug is not None:
        raise bug.as_instanceof_cause()


def _last_line(exc: BaseException) -> str:
    """Ray's error text ends with the line that says what happened (the exception, or the death)."""
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__

