"""Experiment tracking for real: runs of the tiny model read back from TensorBoard event files and an
MLflow SQLite store (no mocks); wandb (offline) and trackio where their libraries are installed."""

import hashlib
import json
import os
import sqlite3
import sys

import pytest
import torch
import yaml

from peftlab.cli import main
from peftlab.config import build_config
from peftlab.errors import PeftlabError
from peftlab.experiments import ResultsStore, load_sweep, run_sweep
from peftlab.experiments.grid import cell_key
from peftlab.tracking import run_tracked

EPOCHS, N_TRAIN, N_VAL, BATCH, LR = 2, 16, 8, 4, 1e-2
STEPS = EPOCHS * N_TRAIN // BATCH


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns of the working directory


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is the fast choice on a busy machine
    yield
    torch.set_num_threads(threads)


def layer(tiny_model_dir, imdb_dir, out, **extra):
    values = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
              "data.n_train": N_TRAIN, "data.n_val": N_VAL, "data.n_test": 12, "prompt.max_input_tokens": 40,
              "train.epochs": EPOCHS, "train.batch_size": BATCH, "train.lr": LR, "method.lora_r": 4,
              "out": str(out)}
    values.update(extra)
    return values


def scheduled_lr(step: int) -> float:
    """transformers' linear schedule, by hand: warm-up over int(0.1 * STEPS) steps, then linear to 0."""
    warmup, s = int(0.1 * STEPS), step - 1  # optimiser step k runs with the rate set after k-1 steps
    return LR * s / warmup if s < warmup else LR * max(0.0, (STEPS - s) / (STEPS - warmup))


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, imdb_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # MLflow's default artifact root is ./mlruns of the working directory
    config = build_config(layer(tiny_model_dir, imdb_dir, root / "run", **{
        "track.report_to": "tensorboard,mlflow", "track.mlflow_uri": uri, "track.project": "tiny-test"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    metrics = run_tracked("train", config, progress=False)
    torch.set_num_threads(threads)
    os.chdir(cwd)
    return metrics, root / "run", uri


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def test_tensorboard_event_files_hold_steps_epochs_final_metrics_and_config(tracked_run):
    metrics, out, _ = tracked_run
    scalars, events = tensorboard_scalars(out / "tensorboard")
    loss, lr = scalars["train/loss"], scalars["train/learning_rate"]
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)) == [s for s, _ in lr]
    assert [v for _, v in lr] == pytest.approx([scheduled_lr(k) for k in range(1, STEPS + 1)], rel=1e-6)
    # Equal batches, no accumulation: each epoch's mean step loss is the epoch loss fit counted itself.
    per_epoch = len(loss) // EPOCHS
    for e, record in enumerate(metrics["per_epoch"]):
        steps = [v for _, v in loss[e * per_epoch:(e + 1) * per_epoch]]
        assert sum(steps) / len(steps) == pytest.approx(record["train_loss"], rel=1e-5)
    # Epochs are chosen on the validation split, so each epoch logs val metrics; test is scored once, at the end.
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx([r["val_accuracy"] for r in metrics["per_epoch"]])
    assert [s for s, _ in scalars["val/accuracy"]] == [per_epoch * e for e in range(1, EPOCHS + 1)]
    assert "test/accuracy" not in scalars
    assert scalars["final/accuracy"] == [(STEPS, pytest.approx(metrics["accuracy"]))]
    assert scalars["final/best_epoch"][0][1] == metrics["best_epoch"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in text.splitlines()))["method"]["lora_r"] == 4


def test_mlflow_store_holds_params_metrics_config_and_the_adapter(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    metrics, out, uri = tracked_run
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tiny-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.lora_r"] == "4" and run.data.params["data.n_train"] == str(N_TRAIN)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    tb_loss, _ = tensorboard_scalars(out / "tensorboard")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in tb_loss["train/loss"]]
    accuracy = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/accuracy"))
    assert [v for _, v in accuracy] == pytest.approx([r["val_accuracy"] for r in metrics["per_epoch"]])
    assert run.data.metrics["final/accuracy"] == pytest.approx(metrics["accuracy"])
    folder = client.download_artifacts(run.info.run_id, "", str(tmp_path))
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(adapter).hexdigest() == metrics["adapter_sha256"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["track"]["report_to"] == ["tensorboard", "mlflow"]
    assert folder


def test_a_sweep_reports_one_run_per_cell_grouped_by_its_name(tiny_model_dir, imdb_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"model": {"name": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"source": str(imdb_dir), "n_train": 8, "n_test": 8}, "prompt": {"max_input_tokens": 40},
            "method": {"method": "lora", "lora_r": 4}, "train": {"epochs": 1, "batch_size": 4},
            "track": {"report_to": ["mlflow", "tensorboard"], "mlflow_uri": uri},
            "grid": {"data.n_train": [0, 8], "train.seed": [0]}}  # a zero-shot cell and a training cell
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    sweep = load_sweep(tmp_path / "tiny.yaml", out=tmp_path / "out")
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        outcome = run_sweep(sweep, store, log=lambda _: None)
    assert len(outcome.ran) == 2 and not outcome.failed
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("peftlab").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(c.config.out.split("/")[-1] for c in sweep.cells)
    assert {r.data.tags["peftlab.sweep"] for r in runs} == {"tiny"}
    assert sorted("train/loss" in r.data.metrics for r in runs) == [False, True]  # only the training cell steps
    assert all("final/accuracy" in r.data.metrics for r in runs)
    assert sorted(p.parent.name for p in (tmp_path / "out").glob("*/tensorboard")) == sorted(
        c.config.out.split("/")[-1] for c in sweep.cells)  # `tensorboard --logdir out` shows both cells


def test_tracking_settings_do_not_change_the_cell_key_or_the_run_identity(tiny_model_dir, imdb_dir, tmp_path):
    from peftlab.config import identity_differences, run_key

    plain = build_config(layer(tiny_model_dir, imdb_dir, tmp_path))
    tracked = build_config(layer(tiny_model_dir, imdb_dir, tmp_path, **{
        "track.report_to": "mlflow", "track.group": "g", "track.project": "p", "track.run_name": "r",
        "track.mlflow_uri": "sqlite:///x.db"}))
    assert cell_key(plain) == cell_key(tracked) == run_key(plain)  # finished cells are not redone
    assert identity_differences(plain.to_dict(), tracked) == []    # --resume accepts the run
    assert cell_key(plain) != cell_key(build_config(layer(tiny_model_dir, imdb_dir, tmp_path, **{"train.lr": 2e-2})))


def test_report_to_values_are_checked(tiny_model_dir, imdb_dir, tmp_path):
    with pytest.raises(PeftlabError, match="track.report_to='comet' is not one of"):
        build_config({"track.report_to": "comet"})
    assert build_config({"track.report_to": "none"}).track.report_to is None
    assert build_config({"track.report_to": "TensorBoard, none,mlflow"}).track.report_to == ["tensorboard", "mlflow"]


def test_a_missing_tracker_library_is_one_line_naming_the_extra(tiny_model_dir, imdb_dir, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(imdb_dir), "--report-to", "wandb",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("peftlab: error: --report-to wandb needs the wandb package: "
                                 "pip install 'peftlab[wandb]'")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_wandb_offline_run_records_its_summary_and_adapter(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'peftlab[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = build_config(layer(tiny_model_dir, imdb_dir, tmp_path / "run", **{"track.report_to": "wandb",
                                                                               "train.epochs": 1}))
    metrics = run_tracked("train", config, progress=False)
    [log] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb 0.31 keeps an offline run as one protobuf log for `wandb sync` and ships no reader for it:
    # the names of what was logged are looked for in it (weaker than the TensorBoard/MLflow read-backs).
    data = log.read_bytes()
    assert metrics["accuracy"] >= 0 and b"final/accuracy" in data and b"train/learning_rate" in data
    assert b"adapter_model.safetensors" in data  # the adapter artifact's manifest


def test_trackio_local_run_records_steps_and_final_metrics(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    pytest.importorskip("trackio", reason="trackio is not installed (pip install 'peftlab[trackio]')")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    config = build_config(layer(tiny_model_dir, imdb_dir, tmp_path / "run", **{
        "track.report_to": "trackio", "train.epochs": 1, "track.project": "tiny-trackio"}))
    metrics = run_tracked("train", config, progress=False)
    [db] = (tmp_path / "trackio").rglob("tiny-trackio*.db")
    rows = sqlite3.connect(db).execute("SELECT step, metrics FROM metrics").fetchall()
    logged = [(step, json.loads(text)) for step, text in rows]
    assert [s for s, m in logged if "train/loss" in m] == list(range(1, N_TRAIN // BATCH + 1))
    assert [m["final/accuracy"] for _, m in logged if "final/accuracy" in m] == [pytest.approx(metrics["accuracy"])]


def test_a_tune_reports_one_run_per_trial_and_the_best_run_grouped_by_the_study(tiny_model_dir, imdb_dir, tmp_path):
    pytest.importorskip("optuna")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"model": {"name": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
            "data": {"source": str(imdb_dir), "n_train": 8, "n_val": 8, "n_test": 8},
            "prompt": {"max_input_tokens": 24}, "method": {"method": "lora"},
            "train": {"epochs": 2, "batch_size": 4},
            "track": {"report_to": ["mlflow", "tensorboard"], "mlflow_uri": uri},
            "search": {"train.lr": "loguniform(1e-4, 5e-2)"},
            "tune": {"trials": 3, "startup_trials": 1, "pruner": "none"}}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    assert main(["tune", str(tmp_path / "tune.yaml"), "--out", str(tmp_path / "search"), "--quiet"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("peftlab").experiment_id])
    trials = sorted(p.name for p in (tmp_path / "search" / "trials").iterdir())
    assert sorted(r.info.run_name for r in runs) == sorted(trials + ["best-run"])
    assert {r.data.tags["peftlab.sweep"] for r in runs} == {"tune"}
    # Each trial's validation accuracy per epoch is what the trial's own metrics.json recorded.
    for run in runs:
        metrics = json.loads((tmp_path / "search" / ("best-run" if run.info.run_name == "best-run" else
                                                     f"trials/{run.info.run_name}") / "metrics.json").read_text())
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.value for m in history] == pytest.approx([e["val_accuracy"] for e in metrics["per_epoch"]])
        best = run.info.run_name == "best-run"  # the test subset is scored for the best config only
        assert ("final/accuracy" in run.data.metrics) is best
        final = run.data.metrics["final/accuracy" if best else "final/val/accuracy"]
        assert final == pytest.approx(metrics["accuracy"]) and metrics["evaluated_on"] == ("test" if best else "val")
    assert sorted(p.parent.name for p in (tmp_path / "search").glob("*/*/tensorboard")) == trials
