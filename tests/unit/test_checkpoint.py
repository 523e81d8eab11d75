"""Checkpoint and resume: a run killed anywhere and resumed ends bitwise equal to an unbroken one (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peftlab.runs as runs
import peftlab.train.loop as loop
from peftlab.config import build_config
from peftlab.errors import PeftlabError
from peftlab.records import RunFolder, sha256_file
from peftlab.runs import run_train
from peftlab.train.checkpoint import Checkpoints


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: no `except Exception` handler sees it."""


def layer(tiny_model_dir, imdb_dir, out, **extra):
    # Dropout on, so a wrong torch RNG state after resume would change the weights.
    values = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
              "data.n_train": 16, "data.n_test": 8, "prompt.max_input_tokens": 32, "train.epochs": 2,
              "train.batch_size": 2, "train.lr": 1e-2, "method.lora_dropout": 0.1, "train.checkpoint_every": 3,
              "train.select_on": "test", "out": str(out)}
    values.update(extra)
    return values


def outcome(out: Path) -> dict:
    """What must be equal between an unbroken and a resumed run (timings and resume notes may differ)."""
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "best_epoch": metrics["best_epoch"],
            "per_epoch": [(e["accuracy"], e["train_loss"]) for e in metrics["per_epoch"]],
            "adapter_sha256": sha256_file(out / "adapter" / "adapter_model.safetensors"),
            "recorded_sha256": metrics["adapter_sha256"],
            "predictions": (out / "predictions.jsonl").read_text()}


@pytest.fixture(scope="module")
def unbroken(tiny_model_dir, imdb_dir, tmp_path_factory):
    results = {}
    for name, extra in (("accum1", {}), ("accum2", {"train.grad_accum": 2, "train.checkpoint_every": 0})):
        out = tmp_path_factory.mktemp("unbroken") / name
        run_train(build_config(layer(tiny_model_dir, imdb_dir, out, **extra)))
        assert not (out / "checkpoint").exists()  # a finished run keeps no checkpoint
        results[name] = outcome(out)
    return results


def kill_at_batch(monkeypatch, n: int):
    """Raise Killed when the training loop asks for its n-th batch loss; returns the call counter."""
    real, calls = loop.batch_loss, {"n": 0}

    def batch_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed(f"killed at batch {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", batch_loss)
    return calls


# 16 examples in batches of 2: 8 batches an epoch, 16 in all; checkpoints every 3 optimiser steps.
@pytest.mark.parametrize("variant, kill_batch, resumed_at", [
    ("accum1", 5, (1, 3)),    # epoch 1, after the checkpoint of step 3: resumes mid-epoch
    ("accum1", 8, (1, 6)),    # the last batch of epoch 1: resumes from step 6, then evaluates epoch 1
    ("accum1", 14, (2, 4)),   # epoch 2 (optimiser step 12 is its batch 4)
    ("accum2", 11, (2, 0)),   # grad_accum 2, checkpoints only at epoch ends: resumes at the start of epoch 2
])
def test_a_killed_and_resumed_run_equals_the_unbroken_run(variant, kill_batch, resumed_at, unbroken, tiny_model_dir,
                                                          imdb_dir, tmp_path, monkeypatch):
    extra = {"train.grad_accum": 2, "train.checkpoint_every": 0} if variant == "accum2" else {}
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run", **extra)
    with monkeypatch.context() as m:
        kill_at_batch(m, kill_batch)
        with pytest.raises(Killed):
            run_train(build_config(values))
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()
    with monkeypatch.context() as m:
        calls = kill_at_batch(m, 10**9)  # only counts the batches the resumed run computes
        metrics = run_train(build_config(values, {"train.resume": True}))
    assert metrics["resumed_from"] == {"epoch": resumed_at[0], "batch": resumed_at[1]}
    assert calls["n"] == 16 - (resumed_at[0] - 1) * 8 - resumed_at[1]  # it did not start over
    assert outcome(tmp_path / "run") == unbroken[variant]
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("kill_batch, done_epochs", [(5, 3 / 8), (14, 1 + 4 / 8)])
def test_a_resumed_runs_plan_counts_only_what_is_left(kill_batch, done_epochs, tiny_model_dir, imdb_dir, tmp_path,
                                                      monkeypatch):
    import peftlab.experiments.estimate as estimate

    plans = []

    def run_plan(model, train_tokens, scored_tokens, examples, **kwargs):
        plans.append((train_tokens, scored_tokens, examples))
        return "plan: recorded"

    monkeypatch.setattr(estimate, "run_plan", run_plan)
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at_batch(m, kill_batch)
        with pytest.raises(Killed):
            run_train(build_config(values), progress=True)
    metrics = run_train(build_config(values, {"train.resume": True}), progress=True)
    (full_train, full_scored, _), (left_train, left_scored, examples) = plans
    # The training loop's own count of the tokens it trained on, over both epochs.
    assert full_train == metrics["train_tokens"]
    assert left_train == round(metrics["train_tokens"] / 2 * (2 - done_epochs))
    epoch, batch = metrics["resumed_from"]["epoch"], metrics["resumed_from"]["batch"]
    assert examples.startswith(f"resumed at epoch {epoch}, batch {batch}/8, ")
    # select_on=test scores the validation split and the test subset after each epoch: an epoch already
    # evaluated (epoch 1, when killed in epoch 2) is not counted again.
    evaluated = int(done_epochs)
    assert abs(left_scored - full_scored * (2 - evaluated) / 2) <= 1


def test_a_kill_while_writing_the_results_resumes_to_the_same_results(unbroken, tiny_model_dir, imdb_dir, tmp_path,
                                                                     monkeypatch):
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run")

    def finish(*args, **kwargs):
        raise Killed("killed while writing")

    with monkeypatch.context() as m:
        m.setattr(RunFolder, "finish", finish)
        with pytest.raises(Killed):
            run_train(build_config(values))
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["position"]["epoch"] == 3  # training was over
    run_train(build_config(values, {"train.resume": True}))
    assert outcome(tmp_path / "run") == unbroken["accum1"]
    # Resuming a finished run returns it without training again.
    again = run_train(build_config(values, {"train.resume": True}))
    assert again["adapter_sha256"] == unbroken["accum1"]["adapter_sha256"]


def test_the_chosen_epoch_survives_a_kill_at_an_epoch_end(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    # Accuracy is made to rise from epoch 1 to 2 in the first try, which is killed while saving epoch 2's
    # checkpoint, and to fall on the resumed epoch 2 (as GPU nondeterminism might): the choice recorded in
    # the checkpoint (epoch 1, with its weights) must come back, equal to an unbroken run that chose epoch 1.
    real_eval = runs.evaluate_examples
    fall = {"on": True}

    def rising(*args, **kwargs):
        metrics, predictions, result = real_eval(*args, **kwargs)
        epoch = int(kwargs["desc"].rsplit(" ", 1)[1])
        metrics["accuracy"] = 0.0 if (fall["on"] and epoch == 2) else epoch / 10
        return metrics, predictions, result

    monkeypatch.setattr(runs, "evaluate_examples", rising)
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run", **{"train.checkpoint_every": 0})
    chose_first = run_train(build_config(values, {"out": str(tmp_path / "unbroken")}))
    assert chose_first["best_epoch"] == 1
    fall["on"] = False
    real_save, saves = Checkpoints.save, {"n": 0}

    def save_then_die(self, position, *args):
        saves["n"] += 1
        if position.epoch == 3:  # the checkpoint after epoch 2, which chose epoch 2 this time
            raise Killed("killed while saving the checkpoint of epoch 2")
        real_save(self, position, *args)

    with monkeypatch.context() as m:
        m.setattr(Checkpoints, "save", save_then_die)
        with pytest.raises(Killed):
            run_train(build_config(values))
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["extra"]["epoch"] == 1 and not (tmp_path / "run" / "adapter").exists()
    fall["on"] = True
    metrics = run_train(build_config(values, {"train.resume": True}))
    assert metrics["best_epoch"] == 1
    assert json.loads((tmp_path / "run" / "adapter" / "peftlab.json").read_text())["epoch"] == 1
    assert metrics["adapter_sha256"] == chose_first["adapter_sha256"]
    assert sha256_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors") == chose_first["adapter_sha256"]


def test_resume_refuses_a_checkpoint_of_another_config(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at_batch(m, 5)
        with pytest.raises(Killed):
            run_train(build_config(values))
    with pytest.raises(PeftlabError, match="belongs to another run .*train.lr"):
        run_train(build_config(values, {"train.resume": True, "train.lr": 2e-2}))
    # Checkpoint frequency is not part of what a run computes: changing it is allowed.
    run_train(build_config(values, {"train.resume": True, "train.checkpoint_every": 1}))


def test_resume_refuses_a_checkpoint_trained_on_a_base_of_another_precision(unbroken, tiny_model_dir, imdb_dir,
                                                                            tmp_path, monkeypatch):
    """`model.dtype: auto` resolves by machine: the same config is fp32 on a CPU without native bf16, bf16 on
    one with it. A run cut off on the first is refused on the second, and still resumes where it was made."""
    import peftlab.models.loading as loading

    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run", **{"model.dtype": "auto", "model.device": "cpu"})
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    with monkeypatch.context() as m:
        kill_at_batch(m, 5)
        with pytest.raises(Killed):
            run_train(build_config(values))
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    with pytest.raises(PeftlabError, match=r"trained on a float32 base, .* computes in bfloat16 \(model.dtype=auto: "
                                           r"auto depends on the machine\).*--overwrite"):
        run_train(build_config(values, {"train.resume": True}))
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    metrics = run_train(build_config(values, {"train.resume": True}))  # the refusal lost nothing
    assert metrics["resumed_from"] == {"epoch": 1, "batch": 3}
    assert outcome(tmp_path / "run") == unbroken["accum1"]


def test_a_damaged_checkpoint_is_refused_with_its_fix(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    values = layer(tiny_model_dir, imdb_dir, tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at_batch(m, 5)
        with pytest.raises(Killed):
            run_train(build_config(values))
    [tensors] = (tmp_path / "run" / "checkpoint").glob("tensors-*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(PeftlabError, match="is damaged .*sha256.*delete the folder"):
        run_train(build_config(values, {"train.resume": True}))


# `peftlab train` in a fresh interpreter that cannot finish on its own: the write of metrics.json (the
# finished marker, the last file of a run) touches $HOLD and waits there to be killed. So the SIGKILL always
# lands: mid-training once the checkpoint has passed epoch 1 batch 6, or, on a parent too slow to see that, at
# the last moment before the run would have been finished.
HELD_TRAIN = """
import os, sys, time
from pathlib import Path
import peftlab.records as records
real = records.atomic_write_bytes
def held(path, data):
    if Path(path).name == "metrics.json":
        Path(os.environ["HOLD"]).touch()
        time.sleep(600)
    real(path, data)
records.atomic_write_bytes = held
from peftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_of_a_training_process_then_resume(unbroken, tiny_model_dir, imdb_dir, tmp_path):
    """A real SIGKILL: the process dies between two instructions, whatever it was writing."""
    out, hold = tmp_path / "run", tmp_path / "held"
    args = [sys.executable, "-c", HELD_TRAIN, "train", "--model", str(tiny_model_dir), "--dtype", "fp32",
            "--data", str(imdb_dir), "--n-train", "16", "--n-test", "8", "--max-input-tokens", "32",
            "--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--lora-dropout", "0.1",
            "--checkpoint-every", "3", "--select-on", "test", "--out", str(out), "--quiet"]
    env = dict(os.environ, PEFTLAB_PROGRESS="0", OMP_NUM_THREADS="1", HOLD=str(hold))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            position = json.loads(state_file.read_text())["position"]
        except (OSError, ValueError):  # not there yet (a torn read is impossible: it is replaced atomically)
            position = None
        if (position and (position["epoch"], position["batch"]) >= (1, 6)) or hold.exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    else:
        proc.kill()
        proc.wait(timeout=60)
        pytest.fail(f"the run ended (status {proc.returncode}) or hung before it could be killed: "
                    f"{proc.stderr.read().decode()[-2000:]}")
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "metrics.json").exists()
    values = layer(tiny_model_dir, imdb_dir, out, **{"train.resume": True})
    run_train(build_config(values))
    assert outcome(out) == unbroken["accum1"]
