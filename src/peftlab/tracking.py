"""Experiment tracking: a run reported to TensorBoard, MLflow, wandb or trackio (`track.report_to`).

What HF Trainer's `report_to` logs, through each tracker's own library: the resolved config (as
parameters and as config.yaml), the loss and learning rate after every optimiser step, every
epoch's metrics, the final metrics and the adapter folder as an artifact (MLflow, wandb and trackio;
TensorBoard keeps no artifacts: its event files lie beside the adapter in the run folder).

    peftlab train --report-to tensorboard,mlflow --mlflow-uri sqlite:///mlflow.db --out runs/lora

Steps are optimiser steps; epoch and final metrics are logged at the step they were reached. A sweep
reports one run per cell, grouped by the sweep's name (`track.group`, set by experiments/runner.py);
`peftlab tune` one run per trial (and one for the best config's final run), grouped by the study's name:
TensorBoard sees them as the runs under the sweep's or search's folder, MLflow tags them `peftlab.sweep`,
wandb and trackio put them in one group. Only the main process of a distributed run reports.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable

from peftlab.config import RunConfig, dump_yaml
from peftlab.errors import PeftlabError


@dataclasses.dataclass
class RunInfo:
    """What every tracker is told about the run it records."""

    name: str
    group: str | None
    project: str
    config: RunConfig
    out: Path

    def params(self) -> dict[str, str]:
        """The config as flat dotted keys, e.g. {'method.lora_r': '8'}."""
        out = {}
        for key, value in self.config.to_dict().items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out.update({f"{key}.{sub}" if sub else key: str(v) for sub, v in items})
        return out


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a metrics dict, nested dicts as `a/b`; lists, strings and booleans left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoard:
    """Event files in <out>/tensorboard; `tensorboard --logdir` on a sweep's folder shows every cell."""

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.out / "tensorboard"))
        self.params = run.params()
        # Indented: TensorBoard renders text as markdown, and YAML keeps its layout in a code block.
        self.writer.add_text("config", "\n".join("    " + line for line in dump_yaml(run.config).splitlines()))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def final(self, metrics: dict[str, float], step: int) -> None:
        self.log({f"final/{k}": v for k, v in metrics.items()}, step)
        # The HParams tab: the config beside the result, comparable across the cells of a sweep.
        keep = ("accuracy", "macro_f1", "best_epoch")
        self.writer.add_hparams(self.params, {f"hparams/{k}": v for k, v in metrics.items() if k in keep},
                                run_name=".", global_step=step)

    def artifact(self, folder: Path) -> None:
        pass  # TensorBoard has no artifacts; the adapter lies beside the event files

    def finish(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    """A run in the experiment `track.project` of the store at `track.mlflow_uri` ($MLFLOW_TRACKING_URI)."""

    def __init__(self, run: RunInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(run.config.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        tags = {"peftlab.sweep": run.group} if run.group else {}
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in run.params().items()]  # MLflow's limit on a value
        for start in range(0, len(params), 100):  # and on the parameters of one batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, dump_yaml(run.config), "config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def final(self, metrics: dict[str, float], step: int) -> None:
        self.log({f"final/{k}": v for k, v in metrics.items()}, step)

    def artifact(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), "adapter")

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Wandb:
    """A wandb run in `track.project`; online or offline as wandb is set up ($WANDB_MODE=offline)."""

    def __init__(self, run: RunInfo):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=run.project, name=run.name, group=run.group, dir=str(run.out),
                              config=run.config.to_dict(), reinit="finish_previous")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def final(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def artifact(self, folder: Path) -> None:
        artifact = self.wandb.Artifact(f"adapter-{self.run.id}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    """A trackio run (local SQLite under $TRACKIO_DIR, a Hugging Face Space if trackio is set up so)."""

    def __init__(self, run: RunInfo):
        import trackio

        self.trackio = trackio
        trackio.init(project=run.project, name=run.name, group=run.group, config=run.config.to_dict())

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def final(self, metrics: dict[str, float], step: int) -> None:
        self.log({f"final/{k}": v for k, v in metrics.items()}, step)

    def artifact(self, folder: Path) -> None:
        self.trackio.log_artifact(folder, name="adapter", type="model")

    def finish(self, failed: bool) -> None:
        self.trackio.finish()


# Tracker name -> (class, the module it needs, the pip extra that installs it).
TRACKERS = {"tensorboard": (TensorBoard, "tensorboard", "tensorboard"), "mlflow": (MLflow, "mlflow", "mlflow"),
            "wandb": (Wandb, "wandb", "wandb"), "trackio": (Trackio, "trackio", "trackio")}


def check_installed(names: list[str]) -> None:
    """One line naming the pip extra for a tracker whose library is missing, before any heavy work."""
    import importlib.util

    for name in names:
        _, module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise PeftlabError(f"--report-to {name} needs the {module} package: pip install 'peftlab[{extra}]'")


class Trackers:
    """The trackers of one run; each value goes to all of them."""

    def __init__(self, run: RunInfo, names: list[str]):
        check_installed(names)
        self.trackers, self.step = [], 0
        try:
            for name in names:
                self.trackers.append(TRACKERS[name][0](run))
        except BaseException:
            self.finish(failed=True)
            raise

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.step = step
        self._each(lambda t: t.log({"train/loss": loss, "train/learning_rate": lr}, step))

    def on_epoch(self, epoch: int, record: dict) -> None:
        values = {"epoch": float(epoch), "train/epoch_loss": record["train_loss"]}
        for split in ("val", "test"):
            if record.get(split):
                values.update(scalars(record[split], f"{split}/"))
        self._each(lambda t: t.log(values, self.step))

    def final(self, metrics: dict, adapter: Path | None) -> None:
        values = scalars({k: v for k, v in metrics.items() if k not in ("per_epoch", "correct_bits")})
        if metrics.get("evaluated_on") == "val":  # a tune trial never scores the test subset: say what was scored
            values = {f"val/{k}": v for k, v in values.items()}
        self._each(lambda t: t.final(values, self.step))
        if adapter is not None and adapter.is_dir():
            self._each(lambda t: t.artifact(adapter))

    def finish(self, failed: bool) -> None:
        for tracker in self.trackers:
            tracker.finish(failed)

    def _each(self, call: Callable) -> None:
        for tracker in self.trackers:
            call(tracker)


def run_tracked(command: str, config: RunConfig, model=None, tokenizer=None, progress: bool | None = None,
                on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """`run_train` or `run_eval` of `config`, reported to the trackers in `config.track.report_to`.

    `on_epoch` (training only) is called after the trackers have logged the epoch, so a caller that stops
    the run there (a pruned tune trial) leaves the epoch in the trackers.
    """
    from peftlab import runs

    run = runs.run_train if command == "train" else runs.run_eval
    names = config.track.report_to or []
    if not names or os.environ.get("RANK", "0") != "0":
        extra = {"on_epoch": on_epoch} if command == "train" and on_epoch is not None else {}
        return run(config, model, tokenizer, progress=progress, **extra)
    if config.out is None:  # the trackers need the folder before the run makes it
        config = dataclasses.replace(config, out=str(runs.default_out(command)))
    out = Path(config.out).expanduser()
    info = RunInfo(name=config.track.run_name or out.name, group=config.track.group, project=config.track.project,
                   config=config, out=out)
    trackers = Trackers(info, names)
    failed = True
    try:
        if command == "train":
            def epoch_end(epoch: int, record: dict) -> None:
                trackers.on_epoch(epoch, record)
                if on_epoch is not None:
                    on_epoch(epoch, record)

            metrics = run(config, model, tokenizer, progress=progress, on_epoch=epoch_end, on_step=trackers.on_step)
        else:
            metrics = run(config, model, tokenizer, progress=progress)
        trackers.final(metrics, out / "adapter" if command == "train" else None)
        failed = False
    finally:
        trackers.finish(failed)
    return metrics


def group_sweep(cells: list, sweep_name: str) -> None:
    """Each cell of a sweep reports as its own run in the group named after the sweep; a missing tracker
    library fails the sweep before its first cell."""
    for cell in cells:
        group_run(cell.config, sweep_name)


def group_run(config: RunConfig, group: str) -> None:
    """`config` reports in `group` (unless it names its own); a missing tracker library fails here, before
    any run of a sweep or search starts."""
    config.track.group = config.track.group or group
    check_installed(config.track.report_to or [])
