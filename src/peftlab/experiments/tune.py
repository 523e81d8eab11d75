"""`peftlab tune`: hyper-parameter search on Optuna, crash-safe like a sweep (issue 12).

    # peftlab tune configs/tune/lora.yaml --data ../shared/data/aclImdb_labeled.tar.gz --out runs/tune/lora
    method: {method: lora}
    data: {n_train: 500, n_val: 200}
    train: {epochs: 3}
    search:
      train.lr: loguniform(1e-5, 1e-2)
      method.lora_r: [4, 8, 16]
      method.lora_dropout: uniform(0, 0.3)
    tune: {trials: 16, sampler: tpe, pruner: median, objective: val_accuracy}

The study is Optuna's own RDB storage in one SQLite file, so kill -9 at any moment and the same
command continues it:
- one tune at a time owns a study (an flock on <study file>.lock, dropped by the kernel when the
  process dies), so a trial still RUNNING when the study is opened was cut off: it is marked FAIL
  (without the user attribute `reason` that a real failure has) and redone: its parameters are
  queued (study.enqueue_trial), so the next trial asked runs them, from its run's checkpoint where
  it left one (continue_or_clear), the epochs it had finished reported to the new trial again; Optuna's heartbeat
  (RDBStorage(heartbeat_interval=...)) would fail it too, but it works with study.optimize only,
  not with ask/tell, and it waits for a grace period where the lock already tells;
- the sampler is made afresh before each trial, seeded by (tune.seed, the trials asked before it
  that were not cut off), and a cut-off trial is not in the history TPE reads, so a resumed
  search asks exactly what an unbroken one asks;
- each trial is a cell of the results store (key: experiments.grid.cell_key), finished the moment
  it ends; a trial whose cell is finished (killed before Optuna was told, or a grid cell of the
  same run) is not run again: its stored validation result, epoch by epoch, is replayed to Optuna.
Trials never score the test subset (train.score_test false, train.select_on val); the best
trial's config is run once more with the test subset scored, at the end. Trials run one after
another here, or on Ray workers with --workers (tune_parallel.py); with `track.report_to` each
reports as its own run, grouped by the study.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from peftlab.config import RunConfig, build_config, flatten, load_yaml
from peftlab.errors import PeftlabError
from peftlab.experiments.grid import RayOptions, build_ray_options, cell_folder, cell_key, check_scalars, short_name
from peftlab.experiments.runner import failure_reason
from peftlab.experiments.search_space import TuneSpec, build_tune_spec, parse_search_space
from peftlab.experiments.store import ResultsStore
from peftlab.records import PEAK_SCOPE_CELL, RunFolder
from peftlab.repro import reset_peak_memory
from peftlab.tracking import group_run
from peftlab.train.checkpoint import STATE_FILE, finished_epochs

TRIAL_SETTINGS = {"train.score_test": False, "train.select_on": "val"}  # trials never see the test subset
FINAL_SETTINGS = {"train.score_test": True, "train.select_on": "val"}


@dataclass
class Tune:
    name: str
    source: str
    base: dict            # the run config layer every trial starts from
    space: dict           # dotted key -> optuna distribution
    spec: TuneSpec
    out: Path
    storage: Path
    ray: RayOptions | None = None  # trials in parallel on Ray workers (tune_parallel.py); None: one after another

    @property
    def url(self) -> str:
        return f"sqlite:///{self.storage.resolve()}"

    @property
    def direction(self) -> str:
        return "maximize" if self.spec.objective == "val_accuracy" else "minimize"


def load_tune(path: str | Path, overrides: dict[str, Any] | None = None, out: str | Path | None = None) -> Tune:
    """Read a tune YAML (a run config + `search:` + `tune:`), apply flag overrides, check everything."""
    path = Path(path)
    data = load_yaml(path)
    search_raw, spec = data.pop("search", None), build_tune_spec(data.pop("tune", None), str(path))
    ray = build_ray_options(data.pop("ray", None), path)
    base = flatten(data, str(path))
    check_scalars(base, str(path))
    base.update(overrides or {})
    yaml_out = base.pop("out", None)
    if build_config(base).data.n_val == 0:
        raise PeftlabError(f"{path}: tune chooses on a validation split: set data.n_val (e.g. data: {{n_val: 200}}) "
                           "or data.val_source")
    base.update(TRIAL_SETTINGS)
    space = parse_search_space(search_raw, base, str(path))
    name = spec.study or path.stem
    root = Path(out or yaml_out or Path("runs") / "tune" / name)
    storage = Path(spec.storage) if spec.storage else root / "study.sqlite3"
    return Tune(name=name, source=str(path), base=base, space=space, spec=spec, out=root, storage=storage, ray=ray)


def make_sampler(spec: TuneSpec, position: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler per trial, seeded by its position (the trials asked before it that were not cut off;
    one after another, the trials ended so far): resumed and unbroken searches agree."""
    seed = spec.seed * 100_003 + position
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: TPE counts the trials still running as bad results, so that trials asked while others
    # run (--workers) do not all go to the same promising spot; one after another no other trial is running.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=0)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial spends budget: it ended (completed, pruned, or failed for a recorded reason)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "reason" in trial.user_attrs)


def ended_trials(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def lock_study(storage: Path) -> int:
    """An exclusive flock on <study>.lock for this process's life (the kernel drops it at any death)."""
    storage.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{storage}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PeftlabError(f"the study {storage} is being searched by another peftlab tune; wait for it to end "
                           "(watch it with optuna-dashboard) or give another --out") from None
    return fd


def open_study(tune: Tune, log: Callable[[str], None]) -> optuna.Study:
    """Create or load the study; trials left RUNNING by a dead process are marked FAIL (cut off) and queued again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=tune.name, storage=tune.url, direction=tune.direction,
                                load_if_exists=True, pruner=make_pruner(tune.spec))
    if study.direction.name.lower() != tune.direction:
        raise PeftlabError(f"study {tune.name} in {tune.storage} was made for the other objective direction; "
                           "keep tune.objective as it was, or give another --out")
    queued = {t.user_attrs.get("redo_of") for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Queued first, then failed: a kill between the two leaves it RUNNING and queued, and the check
        # above keeps the next open from queuing it twice.
        if trial.number not in queued and fits(tune.space, trial.params):
            study.enqueue_trial(trial.params, user_attrs={"redo_of": trial.number})
        study.tell(trial.number, state=TrialState.FAIL)  # no "reason" attribute: cut off, not counted
        log(f"trial {trial.number} was cut off by a kill: redone")
    return study


def fits(space: dict, params: dict) -> bool:
    """Whether parameters drawn earlier lie in the search space (the YAML may have changed since)."""
    if set(params) != set(space):
        return False
    return all(value in space[key].choices if isinstance(space[key], CategoricalDistribution)
               else space[key].low <= value <= space[key].high for key, value in params.items())


def trial_config(tune: Tune, params: dict, settings: dict = TRIAL_SETTINGS) -> RunConfig:
    config = build_config(tune.base, params, settings)
    config.out = str(tune.out / "trials" / cell_folder(cell_key(config), params))
    group_run(config, tune.name)  # trackers: one run per trial, grouped by the study (peftlab.tracking)
    return config


def finished_record(store: ResultsStore, config: RunConfig) -> dict | None:
    """A finished cell of this run: the trial's own key, or a grid cell equal but for score_test."""
    for candidate in (config, dataclasses.replace(config, train=dataclasses.replace(config.train, score_test=True))):
        cell = store.cell(cell_key(candidate))
        if cell is not None and cell.status == "finished" and (cell.record or {}).get("val"):
            return cell.record
    return None


def objective_value(record: dict, objective: str) -> float:
    return float(record["val"][objective_metric(objective)])


def objective_metric(objective: str) -> str:
    """The validation metric an objective reads: accuracy or nll."""
    return "accuracy" if objective == "val_accuracy" else "nll"


def train_trial(config: RunConfig, model, tokenizer, progress: bool | None, on_epoch=None) -> dict:
    """Train a trial's run on a loaded base; its record gains `val_per_epoch` (what the pruner was told,
    replayed to Optuna when a later trial reuses the cell). Runs in the tune, or on a Ray worker."""
    from peftlab.tracking import run_tracked

    epochs: list[dict] = []

    def record_epoch(epoch: int, record: dict) -> None:
        epochs.append({"epoch": epoch, "val": _small(record["val"])})
        if on_epoch is not None:
            on_epoch(epoch, record)  # may raise to stop the run (pruned)

    if config.train.resume:  # a cut-off try goes on from its checkpoint: its finished epochs are told again
        for done in finished_epochs(RunFolder(Path(config.out)).checkpoint):
            metrics = done.get("metrics") or {}
            record_epoch(done["epoch"], {"epoch": done["epoch"], "train_loss": done["loss"],
                                         "val": metrics.get("val"), "test": metrics.get("test")})
    record = run_tracked("train", config, model, tokenizer, progress=progress, on_epoch=record_epoch)
    record = json.loads(json.dumps(record, default=str))
    record["val_per_epoch"] = epochs
    return record


@dataclass
class TrialRunner:
    """Runs trials on one base model, loaded at the first trial that needs it."""

    tune: Tune
    store: ResultsStore
    progress: bool | None = None
    load_model: Callable | None = None
    model: Any = None
    tokenizer: Any = None

    def run(self, config: RunConfig, on_epoch=None) -> dict:
        """Run a cell (or return its finished record) and commit it to the store."""
        key = cell_key(config)
        if self.model is None:
            from peftlab.models import load_base_model

            self.model, self.tokenizer = (self.load_model or load_base_model)(config.model)
        config = continue_or_clear(self.store, key, config)
        self.store.start(key, config.to_dict(), config.out)
        # each trial's record holds its own peak, as a sweep's cells do (runner.py)
        at_start = reset_peak_memory(next(self.model.parameters()).device)
        try:
            record = train_trial(config, self.model, self.tokenizer, self.progress, on_epoch)
        except optuna.TrialPruned as exc:
            self.store.fail(key, str(exc))
            raise
        except BaseException as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise  # a bug or a kill: the cell stays running and the trial RUNNING; a rerun redoes both
            self.store.fail(key, reason)
            raise TrialFailed(reason) from exc
        record["peak_memory_scope"] = PEAK_SCOPE_CELL  # reset before the trial, as in a sweep
        record["memory_at_cell_start_mb"] = at_start
        self.store.finish(key, record)
        return record


def continue_or_clear(store: ResultsStore, key: str, config: RunConfig) -> RunConfig:
    """How a trial's cell starts after an earlier try: a try cut off by a kill or a stop (its cell still
    `running`) that left a checkpoint goes on from it (train.resume; train_trial tells the new trial the
    epochs it finished, as the unbroken run told them), so a tune stopped every few hours loses no training;
    a pruned or failed try, or one cut off before its first checkpoint, is redone from scratch."""
    status = store.status(key)
    if status == "running" and (RunFolder(Path(config.out)).checkpoint / STATE_FILE).is_file():
        return dataclasses.replace(config, train=dataclasses.replace(config.train, resume=True))
    if status is not None:
        shutil.rmtree(config.out, ignore_errors=True)
    return config


class TrialFailed(Exception):
    """A trial failed for a reason a search survives (a diverged loss, out of memory, bad data)."""


def _small(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics.get(k) for k in ("accuracy", "nll", "ece", "brier", "n")}


def ask_trial(study: optuna.Study, tune: Tune, position: int) -> tuple[optuna.Trial, RunConfig, str]:
    """Ask the trial at `position` (see make_sampler): the trial, its run config and its log heading."""
    study.sampler = make_sampler(tune.spec, position)
    trial = study.ask(tune.space)
    config = trial_config(tune, trial.params)
    trial.set_user_attr("cell_key", cell_key(config))
    label = ", ".join(f"{short_name(k)}={_fmt(v)}" for k, v in trial.params.items())
    return trial, config, f"[trial {position + 1}/{tune.spec.trials}] {label}"


def replay(trial: optuna.Trial, record: dict, objective: str) -> None:
    """Report a stored run's epochs to a trial that reuses it: what Optuna saw of it before, for the pruner."""
    for row in record.get("val_per_epoch", []):
        trial.report(float(row["val"][objective_metric(objective)]), row["epoch"])


def tell_trial(study: optuna.Study, trial: optuna.Trial, tune: Tune, heading: str, log: Callable[[str], None],
               record: dict | None = None, pruned: bool = False, reason: str | None = None,
               reused: bool = False) -> None:
    """Tell Optuna how a trial ended (its record's value, pruned, or failed for `reason`) and log one line."""
    if pruned:
        study.tell(trial, state=TrialState.PRUNED)
        log(f"{heading}: pruned")
    elif reason is not None:
        trial.set_user_attr("reason", reason)  # a failure with a reason counts (counts()); a cut-off one has none
        study.tell(trial, state=TrialState.FAIL)
        log(f"{heading}: failed: {reason}")
    else:
        value = objective_value(record, tune.spec.objective)
        study.tell(trial, value)
        log(f"{heading}: val {objective_metric(tune.spec.objective)} {value:.4f}"
            + (" (stored result reused)" if reused else ""))


def run_trial(study: optuna.Study, runner: TrialRunner, position: int, log: Callable[[str], None]) -> None:
    """Ask, run (or reuse) and tell one trial."""
    tune = runner.tune
    trial, config, heading = ask_trial(study, tune, position)
    metric = objective_metric(tune.spec.objective)
    reused = finished_record(runner.store, config)

    def report(epoch: int, record: dict) -> None:
        trial.report(float(record["val"][metric]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    try:
        if reused is not None:
            replay(trial, reused, tune.spec.objective)
            record = reused
        else:
            record = runner.run(config, report)
    except optuna.TrialPruned:
        tell_trial(study, trial, tune, heading, log, pruned=True)
        return
    except TrialFailed as exc:
        tell_trial(study, trial, tune, heading, log, reason=str(exc))
        return
    tell_trial(study, trial, tune, heading, log, record=record, reused=reused is not None)


@dataclass
class TuneOutcome:
    best_params: dict
    best_value: float
    test: dict            # the final run's metrics (test subset scored)
    paths: dict


def run_tune(tune: Tune, store: ResultsStore, progress: bool | None = None, log: Callable[[str], None] = print,
             load_model: Callable | None = None) -> TuneOutcome:
    """Run the search to its budget (continuing a killed one), then the best config with the test subset."""
    fd = lock_study(tune.storage)
    try:
        study = open_study(tune, log)
        runner = TrialRunner(tune, store, progress, load_model)
        while (ended := ended_trials(study)) < tune.spec.trials:
            run_trial(study, runner, ended, log)  # one after another, a trial's position is the trials ended

        def run_final(config: RunConfig, params: dict) -> dict:
            try:
                return runner.run(config)
            except TrialFailed as exc:
                raise PeftlabError(f"the test run {config.out} failed: {exc}") from None

        return conclude(tune, study, store, run_final)
    finally:
        os.close(fd)


def chosen_trial(study: optuna.Study, tune: Tune, store: ResultsStore) -> optuna.trial.FrozenTrial:
    """The trial the search chooses: the best objective value; among trials tied on it, the better other
    validation metric of its run (log-loss under an accuracy objective, accuracy under a log-loss one), then
    the earlier trial. Ties are common: 200 validation reviews measure accuracy in steps of 0.5 points (the
    LoRA search on SmolLM2 had 3 of its first 4 trials at 89.0 %), and Optuna's best_trial takes the first."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best_value = (max if tune.direction == "maximize" else min)(t.value for t in completed)
    tied = [t for t in completed if t.value == best_value]
    other = "nll" if tune.spec.objective == "val_accuracy" else "accuracy"

    def order(trial: optuna.trial.FrozenTrial) -> tuple[float, int]:
        cell = store.cell(trial.user_attrs.get("cell_key", ""))
        value = ((cell.record or {}).get("val") or {}).get(other) if cell is not None else None
        if value is None:
            return float("inf"), trial.number
        return (value if other == "nll" else -value), trial.number

    return min(tied, key=order)


def conclude(tune: Tune, study: optuna.Study, store: ResultsStore,
             run_final: Callable[[RunConfig, dict], dict]) -> TuneOutcome:
    """Run the best trial's config once with the test subset scored (unless the store holds that run), and
    write the outputs."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise PeftlabError(f"study {tune.name}: no trial completed (all pruned or failed); see {tune.storage}")
    best = chosen_trial(study, tune, store)
    final = trial_config(tune, best.params, FINAL_SETTINGS)
    final.out = str(tune.out / "best-run")
    record = finished_record(store, final) or run_final(final, best.params)
    baseline = None
    if tune.spec.baseline:  # the search's worth: the untuned config on the same test examples
        untuned = trial_config(tune, {}, FINAL_SETTINGS)
        untuned.out = str(tune.out / "baseline-run")
        baseline = record if cell_key(untuned) == cell_key(final) else (
            finished_record(store, untuned) or run_final(untuned, {}))
    from peftlab.experiments.tune_output import write_outputs

    paths = write_outputs(tune, study, best, final, record, baseline)
    return TuneOutcome(best.params, best.value, record, paths)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["Tune", "TuneOutcome", "load_tune", "run_tune"]
