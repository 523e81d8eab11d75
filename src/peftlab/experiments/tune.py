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
  (without the user attribute `reason` that a real failure has) and redone; Optuna's heartbeat
  (RDBStorage(heartbeat_interval=...)) would do this too, but it works with study.optimize only,
  not with ask/tell, and it waits for a grace period where the lock already tells;
- the sampler is made afresh before each trial, seeded by (tune.seed, trials ended so far), and
  a cut-off trial is not in the history TPE reads, so the redone trial draws the parameters the
  cut-off one drew, and a resumed search asks exactly what an unbroken one asks;
- each trial is a cell of the results store (key: experiments.grid.cell_key), finished the moment
  it ends; a trial whose cell is finished (killed before Optuna was told, or a grid cell of the
  same run) is not run again: its stored validation result, epoch by epoch, is replayed to Optuna.
Trials never score the test subset (train.score_test false, train.select_on val); the best
trial's config is run once more with the test subset scored, at the end. Trials run one after
another (no --workers yet); with `track.report_to` each reports as its own run, grouped by the study.
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
from optuna.trial import TrialState

from peftlab.config import RunConfig, build_config, flatten, load_yaml
from peftlab.errors import PeftlabError
from peftlab.experiments.grid import cell_folder, cell_key, check_scalars, short_name
from peftlab.experiments.runner import failure_reason
from peftlab.experiments.search_space import TuneSpec, build_tune_spec, parse_search_space
from peftlab.experiments.store import ResultsStore
from peftlab.tracking import group_run

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
    return Tune(name=name, source=str(path), base=base, space=space, spec=spec, out=root, storage=storage)


def make_sampler(spec: TuneSpec, ended: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler per trial, seeded by the trials ended so far: resumed and unbroken searches agree."""
    seed = spec.seed * 100_003 + ended
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


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
    """Create or load the study; trials left RUNNING by a dead process are marked FAIL (cut off)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=tune.name, storage=tune.url, direction=tune.direction,
                                load_if_exists=True, pruner=make_pruner(tune.spec))
    if study.direction.name.lower() != tune.direction:
        raise PeftlabError(f"study {tune.name} in {tune.storage} was made for the other objective direction; "
                           "keep tune.objective as it was, or give another --out")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)  # no "reason" attribute: cut off, not counted
        log(f"trial {trial.number} was cut off by a kill: redone")
    return study


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
    return float(record["val"]["accuracy" if objective == "val_accuracy" else "nll"])


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
        from peftlab.tracking import run_tracked

        key = cell_key(config)
        if self.model is None:
            from peftlab.models import load_base_model

            self.model, self.tokenizer = (self.load_model or load_base_model)(config.model)
        if self.store.status(key) is not None:
            shutil.rmtree(config.out, ignore_errors=True)  # a cut-off or pruned try is redone from scratch
        self.store.start(key, config.to_dict(), config.out)
        epochs: list[dict] = []

        def record_epoch(epoch: int, record: dict) -> None:
            epochs.append({"epoch": epoch, "val": _small(record["val"])})
            if on_epoch is not None:
                on_epoch(epoch, record)

        try:
            record = run_tracked("train", config, self.model, self.tokenizer, progress=self.progress,
                                 on_epoch=record_epoch)
        except optuna.TrialPruned:
            self.store.fail(key, f"pruned after epoch {epochs[-1]['epoch'] if epochs else 0}")
            raise
        except BaseException as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise  # a bug or a kill: the cell stays running and the trial RUNNING; a rerun redoes both
            self.store.fail(key, reason)
            raise TrialFailed(reason) from exc
        record = json.loads(json.dumps(record, default=str))
        record["val_per_epoch"] = epochs
        self.store.finish(key, record)
        return record


class TrialFailed(Exception):
    """A trial failed for a reason a search survives (a diverged loss, out of memory, bad data)."""


def _small(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics.get(k) for k in ("accuracy", "nll", "ece", "brier", "n")}


def run_trial(study: optuna.Study, runner: TrialRunner, number: int, log: Callable[[str], None]) -> None:
    """Ask, run (or reuse) and tell one trial."""
    tune = runner.tune
    study.sampler = make_sampler(tune.spec, number)
    trial = study.ask(tune.space)
    config = trial_config(tune, trial.params)
    label = ", ".join(f"{short_name(k)}={_fmt(v)}" for k, v in trial.params.items())
    metric = "accuracy" if tune.spec.objective == "val_accuracy" else "nll"
    reused = finished_record(runner.store, config)

    def report(epoch: int, record: dict) -> None:
        trial.report(float(record["val"][metric]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()

    trial.set_user_attr("cell_key", cell_key(config))
    try:
        if reused is not None:
            for row in reused.get("val_per_epoch", []):  # what Optuna saw of it before, for the pruner
                trial.report(float(row["val"][metric]), row["epoch"])
            record = reused
        else:
            record = runner.run(config, report)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        log(f"[trial {number + 1}/{tune.spec.trials}] {label}: pruned")
        return
    except TrialFailed as exc:
        trial.set_user_attr("reason", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        log(f"[trial {number + 1}/{tune.spec.trials}] {label}: failed: {exc}")
        return
    value = objective_value(record, tune.spec.objective)
    study.tell(trial, value)
    log(f"[trial {number + 1}/{tune.spec.trials}] {label}: val {metric} {value:.4f}"
        + (" (stored result reused)" if reused is not None else ""))


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
        while (ended := sum(counts(t) for t in study.get_trials(deepcopy=False))) < tune.spec.trials:
            run_trial(study, runner, ended, log)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise PeftlabError(f"study {tune.name}: no trial completed (all pruned or failed); see {tune.storage}")
        best = study.best_trial
        final = trial_config(tune, best.params, FINAL_SETTINGS)
        final.out = str(tune.out / "best-run")
        record = finished_record(store, final) or runner.run(final)
        from peftlab.experiments.tune_output import write_outputs

        paths = write_outputs(tune, study, final, record)
        return TuneOutcome(best.params, best.value, record, paths)
    finally:
        os.close(fd)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["Tune", "TuneOutcome", "load_tune", "run_tune"]
