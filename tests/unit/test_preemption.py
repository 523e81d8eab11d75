"""Graceful preemption: SIGTERM ends training after the step with a checkpoint, a distinct exit status, and a
run marked interrupted; --resume then ends as the unbroken run (issue 14)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from peftlab.config import build_config
from peftlab.records import sha256_file
from peftlab.runs import run_train
from peftlab.train.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAGS = ["--dtype", "fp32", "--n-train", "16", "--n-test", "8", "--max-input-tokens", "32", "--epochs", "2",
         "--batch-size", "2", "--lr", "1e-2", "--lora-dropout", "0.1", "--checkpoint-every", "100",
         "--select-on", "test"]


def outcome(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "per_epoch": [(e["accuracy"], e["train_loss"]) for e in metrics["per_epoch"]],
            "adapter": sha256_file(out / "adapter" / "adapter_model.safetensors"),
            "predictions": (out / "predictions.jsonl").read_text()}


def test_sigterm_checkpoints_exits_75_and_resume_equals_the_unbroken_run(tiny_model_dir, imdb_dir, tmp_path):
    values = {"model.name": str(tiny_model_dir), "data.source": str(imdb_dir), "model.dtype": "fp32",
              "data.n_train": 16, "data.n_test": 8, "prompt.max_input_tokens": 32, "train.epochs": 2,
              "train.batch_size": 2, "train.lr": 1e-2, "method.lora_dropout": 0.1, "train.checkpoint_every": 100,
              "train.select_on": "test"}
    run_train(build_config(values, {"out": str(tmp_path / "unbroken")}))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "peftlab", "train", "--model", str(tiny_model_dir), "--data", str(imdb_dir), *FLAGS,
            "--out", str(out), "--quiet"]
    env = dict(os.environ, PEFTLAB_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # With checkpoints every 100 steps, the first checkpoint is the one at the end of epoch 1: SIGTERM then
    # lands in epoch 2 (8 steps long), and only the signal can make a checkpoint inside it.
    state_file, deadline = out / "checkpoint" / "state.json", time.monotonic() + 180
    while not state_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err.strip().count("\n") == 0 and "stopped by SIGTERM" in err and "--resume" in err
    interrupted = json.loads((out / "interrupted.json").read_text())
    position = json.loads(state_file.read_text())["position"]
    assert interrupted["signal"] == "SIGTERM" and not (out / "metrics.json").exists()
    if interrupted["epoch"] == 2:  # stopped inside epoch 2: the checkpoint is of that very step
        assert (position["epoch"], position["optimizer_steps"]) == (2, interrupted["optimizer_step"])
        assert 0 <= position["batch"] < 8  # 0: the signal came while epoch 1's end was being checkpointed
    metrics = run_train(build_config(values, {"out": str(out), "train.resume": True}))
    assert outcome(out) == outcome(tmp_path / "unbroken")
    assert not (out / "interrupted.json").exists() and metrics["resumed_from"] is not None


@pytest.mark.parametrize("kill_after_batches", [1, 3, 5])
def test_a_killed_evaluation_resumes_from_its_journal_to_the_unbroken_result(tiny_model_dir, imdb_dir, tmp_path,
                                                                             kill_after_batches):
    """SIGKILL once the journal holds k finished batches; --resume scores only the rest, bitwise equal."""
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(imdb_dir), "--dtype", "fp32", "--n-test", "24",
            "--max-input-tokens", "32", "--eval-batch-size", "2", "--quiet"]
    env = dict(os.environ, PEFTLAB_PROGRESS="0", OMP_NUM_THREADS="1")
    unbroken = tmp_path / "unbroken"
    subprocess.run([sys.executable, "-m", "peftlab", *args, "--out", str(unbroken)], env=env, check=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal, deadline = out / "scores-evaluating.partial.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(journal.read_text().splitlines()) >= 1 + kill_after_batches:
                proc.send_signal(signal.SIGKILL)
                break
        except OSError:
            pass
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the evaluation ended before it could be killed"
    kept = len(journal.read_text().splitlines()) - 1
    assert kept >= kill_after_batches and not (out / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "peftlab", *args, "--out", str(out), "--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "predictions.jsonl").read_text() == (unbroken / "predictions.jsonl").read_text()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, unbroken))
    timing = {"eval_seconds", "eval_tokens_per_s", "timings", "out", "peak_memory_mb", "hardware", "config"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert not journal.exists()  # a finished run keeps its scores in predictions.jsonl only


class BatchKilled(BaseException):
    """Stands in for SIGKILL during an evaluation: no `except Exception` handler sees it."""


def count_scored_batches(monkeypatch, die_at: int) -> dict:
    """Count the batches an evaluation scores (`calls["n"]`), raising BatchKilled at batch `die_at` (-1: never)."""
    import peftlab.evaluate.scoring as scoring

    real, calls = scoring.example_scores, {"n": 0, "die_at": die_at}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise BatchKilled
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "example_scores", counted)
    return calls


def test_a_resumed_evaluation_scores_only_the_batches_its_journal_lacks(tiny_model_dir, imdb_dir, tmp_path,
                                                                        monkeypatch):
    from peftlab.runs import run_eval

    values = {"model.name": str(tiny_model_dir), "data.source": str(imdb_dir), "model.dtype": "fp32",
              "data.n_test": 24, "prompt.max_input_tokens": 32, "eval.eval_batch_size": 2}
    unbroken = run_eval(build_config(values, {"out": str(tmp_path / "unbroken")}))
    calls = count_scored_batches(monkeypatch, die_at=4)
    with pytest.raises(BatchKilled):
        run_eval(build_config(values, {"out": str(tmp_path / "run")}))
    calls.update(n=0, die_at=-1)
    resumed = run_eval(build_config(values, {"out": str(tmp_path / "run"), "train.resume": True}))
    assert calls["n"] == 12 - 3  # 24 examples in batches of 2; 3 batches were journalled before the kill
    assert (tmp_path / "run" / "predictions.jsonl").read_text() == (tmp_path / "unbroken" / "predictions.jsonl").read_text()
    assert resumed["accuracy"] == unbroken["accuracy"]
    # A journal of another evaluation (here: other examples) is not used.
    calls.update(n=0, die_at=4)
    with pytest.raises(BatchKilled):
        run_eval(build_config(values, {"out": str(tmp_path / "other")}))
    calls.update(n=0, die_at=-1)
    run_eval(build_config(values, {"out": str(tmp_path / "other"), "train.resume": True, "data.data_seed": 1}))
    assert calls["n"] == 12


def test_a_journal_scored_on_a_base_of_another_precision_is_not_reused(tiny_model_dir, imdb_dir, tmp_path,
                                                                        monkeypatch):
    """`model.dtype: auto` is fp32 here and bf16 on a CPU with native bf16: a journal from the one is not
    mixed into an evaluation on the other (the config, hence the run's identity, is the same)."""
    import peftlab.models.loading as loading
    from peftlab.runs import run_eval

    values = {"model.name": str(tiny_model_dir), "data.source": str(imdb_dir), "model.dtype": "auto",
              "model.device": "cpu", "data.n_test": 24, "prompt.max_input_tokens": 32, "eval.eval_batch_size": 2,
              "out": str(tmp_path / "run")}
    calls = count_scored_batches(monkeypatch, die_at=4)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(BatchKilled):
        run_eval(build_config(values))
    # A journal from before the precision field (its header without it) is taken as it is, as before.
    [journal] = (tmp_path / "run").glob("scores-*.partial.jsonl")
    header, *batches = journal.read_text().splitlines()
    assert json.loads(header)["precision"] == "float32"
    shutil.copytree(tmp_path / "run", tmp_path / "old")
    (tmp_path / "old" / journal.name).write_text("\n".join(
        [json.dumps({"fingerprint": json.loads(header)["fingerprint"]}), *batches]) + "\n")
    calls.update(n=0, die_at=-1)
    run_eval(build_config(values, {"train.resume": True, "out": str(tmp_path / "old")}))
    assert calls["n"] == 12 - 3
    calls.update(n=0)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    resumed = run_eval(build_config(values, {"train.resume": True}))
    assert calls["n"] == 12  # every batch scored again, in bf16
    assert resumed["model"]["dtype"] == "bfloat16"


def test_sigterm_stops_a_sweep_marks_its_cell_interrupted_and_resume_finishes_it(tiny_model_dir, imdb_dir, tmp_path):
    import yaml

    from peftlab.experiments.store import ResultsStore
    from peftlab.report.tables import build_tables

    config = {"model": {"name": str(tiny_model_dir), "dtype": "fp32"},
              "data": {"source": str(imdb_dir), "n_test": 8}, "prompt": {"max_input_tokens": 32},
              "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "select_on": "test"},
              "grid": {"data.n_train": [16, 12]}}
    path, store = tmp_path / "s.yaml", tmp_path / "s.sqlite"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "peftlab", "sweep", str(path), "--store", str(store), "--out", str(tmp_path / "cells"),
            "--quiet"]
    env = dict(os.environ, PEFTLAB_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob("cells/*/checkpoint/state.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err.decode()
    with ResultsStore(store) as reader:
        [cell] = [c for c in reader.cells() if c.status != "pending"]
        assert cell.status == "running" and cell.reason.startswith("interrupted: stopped by SIGTERM")
        texts = [e.text() for t in build_tables(reader) for e in t.entries.values()]
    assert "interrupted" in texts and "not run" in texts  # the report says so
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with ResultsStore(store) as reader:
        cells = reader.cells()
    assert [c.status for c in cells] == ["finished", "finished"] and cells[0].record["resumed_from"] is not None


@pytest.mark.parametrize("split, after_batches", [("test", 2), ("val", 1)])
def test_sigterm_during_an_epochs_evaluation_stops_between_batches_and_resume_scores_only_the_rest(
        tiny_model_dir, imdb_dir, tmp_path, monkeypatch, split, after_batches):
    """A long per-epoch evaluation (2000 test reviews: ~7 minutes on one CPU thread) is not waited for: the
    signal stops it after the current batch, the trained epoch is checkpointed, and --resume scores only
    the batches the journal lacks, ending as the unbroken run."""
    import peftlab.evaluate.scoring as scoring
    from peftlab.train.preemption import Preempted

    values = {"model.name": str(tiny_model_dir), "data.source": str(imdb_dir), "model.dtype": "fp32",
              "data.n_train": 8, "data.n_val": 4, "data.n_test": 12, "prompt.max_input_tokens": 32,
              "train.epochs": 2, "train.batch_size": 2, "train.lr": 1e-2, "train.checkpoint_every": 100,
              "train.select_on": "test", "eval.eval_batch_size": 2}
    unbroken = tmp_path / "unbroken"
    run_train(build_config(values, {"out": str(unbroken)}))
    real, calls, signalled = scoring.example_scores, [], []

    def counted(*args, **kwargs):  # evaluation batches only: training calls the scorer through train.loop
        calls.append(desc_now[0])
        if desc_now[0] == f"{split} epoch 1" and calls.count(desc_now[0]) == after_batches and not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # lands in stop_requests' handler: a flag, not an exit
        return real(*args, **kwargs)

    real_score, desc_now = scoring.score_examples, [None]

    def score_examples(*args, **kwargs):
        desc_now[0] = kwargs.get("desc", args[8] if len(args) > 8 else None)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(scoring, "example_scores", counted)
    monkeypatch.setattr(scoring, "score_examples", score_examples)
    import peftlab.runs as runs
    monkeypatch.setattr(runs, "score_examples", score_examples, raising=False)
    out = tmp_path / "run"
    with pytest.raises(Preempted, match="stopped by SIGTERM at epoch 1"):
        run_train(build_config(values, {"out": str(out)}))
    batches = {"test": 6, "val": 2}[split]
    assert calls.count(f"{split} epoch 1") == after_batches < batches  # stopped after that batch, not at the end
    assert "test epoch 2" not in calls
    position = json.loads((out / "checkpoint" / "state.json").read_text())["position"]
    assert (position["epoch"], position["batch"]) == (1, 4)  # epoch 1's 4 batches trained, its evaluation not done
    assert json.loads((out / "interrupted.json").read_text())["signal"] == "SIGTERM"
    calls.clear()
    run_train(build_config(values, {"out": str(out), "train.resume": True}))
    assert calls.count(f"{split} epoch 1") == batches - after_batches  # the journal kept the rest
    assert outcome(out) == outcome(unbroken)
