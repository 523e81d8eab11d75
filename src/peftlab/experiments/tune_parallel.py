"""`peftlab tune --workers N`: the trials of a search on Ray workers, the driver alone writing (issue 12).

    peftlab tune configs/tune/smollm2-lora.yaml --workers 4                        # a local Ray cluster
    peftlab tune configs/tune/smollm2-lora.yaml --workers 8 --ray-address auto     # a running cluster

Each trial is a cell run by the parallel sweep's machinery (parallel.WorkerPool: one CellExecutor per
worker, the base model loaded once per worker, a lost worker replaced). The driver asks Optuna for a
trial whenever a worker is free, so up to N trials run at once, and it alone writes both files:

- the results store, as in the parallel sweep (its lock, one writer);
- the study (Optuna's RDB storage in SQLite). A worker's per-epoch validation value goes to the driver
  through a small Ray actor (EpochReports) and the worker waits for the answer: the driver reports it
  to the trial and asks the pruner. We chose this over letting workers open the study themselves:
  SQLite with several writing processes risks "database is locked" and, across machines on a shared
  file system, broken locking (Optuna advises against SQLite for distributed runs), and the study's
  lock then means the same in parallel as one after another; a round trip per epoch costs nothing
  beside an epoch.

What holds as one after another: a trial equal to a finished cell is not run again (its stored epochs are
replayed to Optuna); a trial equal to a cell in flight waits for it and takes its result; budget counts
ended trials. A worker that dies in a trial costs the cell one attempt: the same Optuna trial (still
RUNNING, its reported epochs kept) goes to a new worker, and after ray.max_worker_losses deaths it is a
failure with a reason (counted). A driver killed (kill -9) leaves its trials RUNNING: the next tune marks
them cut off (not counted) and queues their parameters again (open_study), so each is redone once.
The best trial's test run (best-run/) is one more cell for a worker at the end.

Reproducibility. The sampler is seeded per trial by (tune.seed, its position: the trials asked before it
that were not cut off), as one after another. With N workers, N trials are asked before any ends, and
TPE's constant liar (make_sampler) counts running trials as bad results so that they spread out. Given
the same parameters, a trial's value is that of a serial run (each run is a pure function of its
config). The random sampler draws the same parameters at each position in every run, and so does TPE
for the first tune.startup_trials positions; after them TPE, and whether the pruner stops a trial,
depend on which trials had ended or reported when it was asked or reported, that is on timing: a
parallel search may choose other trials and another best trial than a serial one or a rerun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna

from peftlab.config import build_config
from peftlab.errors import PeftlabError
from peftlab.experiments.grid import Cell, RayOptions, cell_key
from peftlab.experiments.parallel import Ended, WorkerPool, _last_line, check_device, ray_cluster
from peftlab.experiments.runner import BaseModelChanged, CellResult, StoppedEarly
from peftlab.experiments.store import ResultsStore
from peftlab.experiments.tune import (Tune, TuneOutcome, ask_trial, conclude, ended_trials, finished_record,
                                      continue_or_clear, lock_study, objective_metric, open_study, replay, tell_trial,
                                      train_trial)


class EpochReports:
    """A Ray actor between the workers and the driver: a worker's epoch report waits here for the driver's
    answer (prune or go on); the driver collects the reports with `take` while it waits for cells to end."""

    def __init__(self):
        self.pending: list[tuple[int, str, int, float]] = []   # (ticket, cell key, epoch, value)
        self.answers: dict[int, asyncio.Future] = {}
        self.arrived = asyncio.Event()
        self.tickets = 0

    async def report(self, key: str, epoch: int, value: float) -> bool:
        self.tickets += 1
        answer = self.answers[self.tickets] = asyncio.get_running_loop().create_future()
        self.pending.append((self.tickets, key, epoch, value))
        self.arrived.set()
        return await answer

    async def take(self) -> list[tuple[int, str, int, float]]:
        await self.arrived.wait()
        self.arrived.clear()
        taken, self.pending = self.pending, []
        return taken

    async def answer(self, ticket: int, prune: bool) -> None:
        future = self.answers.pop(ticket, None)
        if future is not None and not future.done():  # a worker that died waiting has no one to answer
            future.set_result(prune)


@dataclass
class WorkerTrial:
    """What a worker runs for a cell of the search (CellExecutor's `run`): `train` with each epoch's validation
    value sent to the driver, whose answer may stop the run (pruned)."""

    reports: Any                      # the EpochReports actor
    metric: str                       # accuracy | nll
    train: Callable = train_trial     # (config, model, tokenizer, progress, on_epoch) -> record

    def __call__(self, cell: Cell, model, tokenizer, progress: bool | None) -> dict:
        import ray

        def report(epoch: int, record: dict) -> None:
            if ray.get(self.reports.report.remote(cell.key, epoch, float(record["val"][self.metric]))):
                raise StoppedEarly(f"pruned after epoch {epoch}")

        return self.train(cell.config, model, tokenizer, progress, report)


@dataclass
class Flight:
    """A cell handed out and not yet ended: a trial's (asked, not told) or the best trial's test run (trial None)."""

    trial: optuna.Trial | None
    cell: Cell
    heading: str
    reported: set = field(default_factory=set)   # epochs told to Optuna (a redo after a lost worker repeats them)


class ParallelSearch:
    """The driver: asks trials while workers are free, answers epoch reports, writes each ending."""

    def __init__(self, tune: Tune, store: ResultsStore, study: optuna.Study, options: RayOptions,
                 log: Callable[[str], None], load_model: Callable | None, train: Callable):
        self.tune, self.store, self.study, self.options, self.log = tune, store, study, options, log
        self.load_model, self.train = load_model, train
        self.metric = objective_metric(tune.spec.objective)
        self.flights: dict[str, Flight] = {}   # cell key -> the flight a worker runs
        self.waiting: list[Flight] = []        # trials equal to a cell in flight: they take its result
        self.bug: BaseException | None = None  # the first unexpected error: no new trials after it
        self.final: CellResult | None = None
        self.stack = ExitStack()
        self.pool: WorkerPool | None = None    # started when the first cell must run
        self.workers = 1

    def search(self) -> None:
        """Run trials until the budget has ended (or a bug stopped the asking and the running ones ended)."""
        budget = self.tune.spec.trials
        ended = ended_trials(self.study)
        self.workers = max(1, min(self.options.workers, budget - ended))
        self.log(f"tune {self.tune.name}: {ended} of {budget} trials ended in {self.tune.storage}"
                 + (f"; {budget - ended} to run on {self.workers} Ray workers" if ended < budget else ""))
        while True:
            # Up to `workers` trials in flight: with N workers, N trials are asked before any ends.
            while self.bug is None and (flying := self.in_flight()) < self.workers and \
                    (ended := ended_trials(self.study)) + flying < budget:
                self.ask(ended + flying)
            if not self.flights:
                break
            self.step()
        self.raise_bug()

    def in_flight(self) -> int:
        return sum(f.trial is not None for f in self.flights.values()) + len(self.waiting)

    def ask(self, position: int) -> None:
        trial, config, heading = ask_trial(self.study, self.tune, position)
        reused = finished_record(self.store, config)
        if reused is not None:
            replay(trial, reused, self.tune.spec.objective)
            tell_trial(self.study, trial, self.tune, heading, self.log, record=reused, reused=True)
            return
        flight = Flight(trial, Cell(cell_key(config), trial.params, config), heading)
        if flight.cell.key in self.flights:  # the same run as a trial in flight (TPE may ask it twice)
            self.waiting.append(flight)
            self.log(f"{heading}: the same run as a trial in flight; it takes that trial's result")
            return
        self.start(flight)

    def start(self, flight: Flight) -> None:
        """Mark the cell running in the store (an attempt more) and hand it to a free worker."""
        pool = self.open_pool()
        # a cut-off or lost try goes on from its checkpoint where it left one; a pruned one is redone afresh
        flight.cell = cell = dataclasses.replace(flight.cell, config=continue_or_clear(self.store, flight.cell.key,
                                                                                        flight.cell.config))
        self.store.start(cell.key, cell.config.to_dict(), cell.config.out)
        self.flights[cell.key] = flight
        pool.submit(cell)
        self.log(f"{flight.heading}: started ({cell.key})")

    def open_pool(self) -> WorkerPool:
        if self.pool is None:
            ray = self.stack.enter_context(ray_cluster(self.options))
            # num_cpus=0: the mailbox takes no worker's share of the cluster.
            self.reports = ray.remote(num_cpus=0)(EpochReports).remote()
            self.stack.callback(ray.kill, self.reports)
            self.pool = self.stack.enter_context(WorkerPool(ray, self.options, self.workers, self.load_model,
                                                            WorkerTrial(self.reports, self.metric, self.train)))
            self.taking = self.reports.take.remote()
        return self.pool

    def step(self) -> None:
        """Wait for a cell to end or an epoch to be reported, and handle it."""
        got = self.pool.wait([self.taking])
        if not isinstance(got, Ended):
            self.answer(self.pool.ray.get(got))
            self.taking = self.reports.take.remote()
            return
        flight = self.flights.pop(got.cell.key)
        if got.lost is not None:
            self.log(f"{flight.heading}: its Ray worker died ({got.lost}); the trial goes to a new worker")
            self.start(flight)
            return
        twins = [w for w in self.waiting if w.cell.key == got.cell.key]
        self.waiting = [w for w in self.waiting if w.cell.key != got.cell.key]
        if got.bug is not None:
            # Its trial (and twins) stay RUNNING and its cell `running`: the next tune redoes them, as serially.
            self.bug = self.bug or got.bug
            self.log(f"{flight.heading}: stopped the search with an unexpected error: {_last_line(got.bug)}")
            return
        self.settle(flight, got.result)
        for twin in twins:
            if got.result.status == "finished":
                replay(twin.trial, got.result.record, self.tune.spec.objective)
                tell_trial(self.study, twin.trial, self.tune, twin.heading, self.log, record=got.result.record,
                           reused=True)
            elif self.bug is None:
                self.start(twin)  # as one after another: a trial equal to a pruned or failed cell runs again

    def answer(self, reports: list[tuple[int, str, int, float]]) -> None:
        """Report each epoch's value to its trial and answer whether the pruner stops it (as run_trial does)."""
        for ticket, key, epoch, value in reports:
            flight, prune = self.flights.get(key), False
            if flight is not None and flight.trial is not None:
                if epoch not in flight.reported:
                    flight.trial.report(value, epoch)
                    flight.reported.add(epoch)
                prune = flight.trial.should_prune()
            self.reports.answer.remote(ticket, prune)

    def settle(self, flight: Flight, result: CellResult) -> None:
        """Write how a cell ended to the store, then tell Optuna (a kill between the two: the trial is redone
        and finds its finished cell)."""
        key = flight.cell.key
        if result.status == "finished":
            self.store.finish(key, result.record)
        else:
            self.store.fail(key, result.reason)
        if result.base_changed:
            self.log(f"  {key} left the base model changed: it is loaded again")
        if flight.trial is None:
            self.final = result
        elif result.status == "finished":
            tell_trial(self.study, flight.trial, self.tune, flight.heading, self.log, record=result.record)
        elif result.status == "stopped":
            tell_trial(self.study, flight.trial, self.tune, flight.heading, self.log, pruned=True)
        else:
            tell_trial(self.study, flight.trial, self.tune, flight.heading, self.log, reason=result.reason)
        if result.status == "changed":
            self.bug = self.bug or BaseModelChanged(f"trial cell {key} changed the shared base model; its result "
                                                    "and every later one would be wrong")

    def run_final(self, config, params: dict) -> dict:
        """The best trial's config with the test subset scored, on a worker."""
        key = cell_key(config)
        self.start(Flight(None, Cell(key, params, config), "best trial's config, test subset scored"))
        while key in self.flights:
            self.step()
        self.raise_bug()
        if self.final.status != "finished":
            raise PeftlabError(f"the test run {config.out} failed: {self.final.reason}")
        return self.final.record

    def raise_bug(self) -> None:
        if self.bug is not None:
            raise self.bug.as_instanceof_cause() if hasattr(self.bug, "as_instanceof_cause") else self.bug


def run_tune_parallel(tune: Tune, store: ResultsStore, options: RayOptions, log: Callable[[str], None] = print,
                      load_model: Callable | None = None, train: Callable = train_trial) -> TuneOutcome:
    """run_tune with the trials on `options.workers` Ray workers: the search to its budget, then the best config
    with the test subset."""
    check_device(build_config(tune.base).model.device, options, tune.source)
    fd = lock_study(tune.storage)
    try:
        study = open_study(tune, log)
        search = ParallelSearch(tune, store, study, options, log, load_model, train)
        with search.stack:
            search.search()
            return conclude(tune, study, store, search.run_final)
    finally:
        os.close(fd)


__all__ = ["run_tune_parallel"]
