"""Resource faults: out of memory and a full disk become one-line PeftlabErrors naming the fix, and
nothing written before them is damaged (injected with monkeypatching)."""

import errno
import json
import os

import pytest
import torch

import peftlab.records as records
import peftlab.runs as runs
import peftlab.train.loop as loop
from peftlab.cli import main
from peftlab.config import build_config
from peftlab.errors import DiskFull, OutOfMemory, PeftlabError
from peftlab.records import sha256_file
from peftlab.runs import run_train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def values(tiny_model_dir, imdb_dir, out, **extra):
    layer = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
             "data.n_train": 8, "data.n_test": 8, "prompt.max_input_tokens": 32, "train.epochs": 2,
             "train.batch_size": 2, "train.lr": 1e-2, "train.checkpoint_every": 2, "out": str(out)}
    layer.update(extra)
    return layer


def fail_at_batch(monkeypatch, n: int, exc: BaseException):
    real, calls = loop.batch_loss, {"n": 0}

    def batch_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", batch_loss)
    return calls


class HalfWritten:
    """A file whose disk fills up halfway through the first write."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def fill_disk_on(monkeypatch, name_part: str):
    """ENOSPC for atomic writes whose target name contains `name_part`."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{fd}")
        fh = real(fd, *args, **kwargs)
        return HalfWritten(fh) if name_part in os.path.basename(path) else fh

    monkeypatch.setattr(records.os, "fdopen", fdopen)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 MemoryError(),
                                 RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 100000000000 bytes")],
                         ids=["cuda", "host", "cpu-allocator"])
def test_out_of_memory_in_training_names_the_fix_and_keeps_the_checkpoint(exc, tiny_model_dir, imdb_dir, tmp_path,
                                                                          monkeypatch):
    config = build_config(values(tiny_model_dir, imdb_dir, tmp_path / "run"))
    with monkeypatch.context() as m:
        fail_at_batch(m, 6, exc)  # epoch 2, batch 2: after the epoch-1 checkpoint
        with pytest.raises(OutOfMemory, match=r"out of memory while training: lower --batch-size \(now 2; .*"
                                              r"--eval-batch-size \(now 16\).*add --resume"):
            run_train(config)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["position"]["epoch"] == 2
    assert not (tmp_path / "run" / "metrics.json").exists()
    # Once memory is there again, --resume finishes the run as if nothing had happened.
    resumed = run_train(build_config(values(tiny_model_dir, imdb_dir, tmp_path / "run", **{"train.resume": True})))
    unbroken = run_train(build_config(values(tiny_model_dir, imdb_dir, tmp_path / "ref")))
    assert resumed["adapter_sha256"] == unbroken["adapter_sha256"]
    assert resumed["per_epoch"][1]["train_loss"] == unbroken["per_epoch"][1]["train_loss"]


def test_out_of_memory_in_evaluation_through_the_cli(tiny_model_dir, imdb_dir, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runs, "evaluate_examples", oom)
    code = main(["eval", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-test", "4",
                 "--eval-batch-size", "64", "--out", str(tmp_path / "eval"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("peftlab: error: out of memory while evaluating: lower --eval-batch-size (now 64)")


def test_a_bug_is_not_disguised_as_out_of_memory(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        fail_at_batch(m, 1, RuntimeError("shape mismatch"))
        with pytest.raises(RuntimeError, match="shape mismatch") as info:
            run_train(build_config(values(tiny_model_dir, imdb_dir, tmp_path / "run")))
    assert not isinstance(info.value, PeftlabError)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model_dir, imdb_dir, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "run"
    config = build_config(values(tiny_model_dir, imdb_dir, out))
    calls = {"n": 0}
    real_save = runs.Checkpoints.save

    def save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: the disk is full from now on
            before.update(snapshot(out / "checkpoint"))
            fill_disk_on(monkeypatch, "tensors-")
        return real_save(self, *args, **kwargs)

    before: dict = {}
    with monkeypatch.context() as m:
        m.setattr(runs.Checkpoints, "save", save)
        with pytest.raises(DiskFull, match=r"disk full while writing .*tensors-000003\.safetensors: free space on "
                                           r"that disk or choose another --out; files written before are intact"):
            run_train(config)
    monkeypatch.undo()
    assert snapshot(out / "checkpoint") == before  # no half file, no leftover temporary file
    assert not list(out.rglob("*.tmp"))
    resumed = run_train(build_config(values(tiny_model_dir, imdb_dir, out, **{"train.resume": True})))
    assert resumed["resumed_from"] is not None and (out / "metrics.json").is_file()


def test_a_full_disk_while_writing_results_keeps_the_earlier_run(tiny_model_dir, imdb_dir, tmp_path, monkeypatch,
                                                                 capsys):
    # A finished eval run, then a second eval replacing it (--overwrite) on a disk that fills up.
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-test", "4",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    fill_disk_on(monkeypatch, "predictions.jsonl")
    assert main(args[:-3] + ["--n-test", "6", "--overwrite"] + args[-3:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error: disk full while writing") and "predictions.jsonl" in err and "\n" not in err
    assert snapshot(tmp_path / "eval.replaced-1") == before  # the earlier run, every file as it was
    assert json.loads((tmp_path / "eval.replaced-1" / "metrics.json").read_text())["n"] == 4
    assert not (out / "metrics.json").exists() and not (out / "predictions.jsonl").exists()


def test_a_full_disk_while_saving_the_adapter_loses_no_training(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    # The adapter is written once, after training: a full disk then must leave no half-written adapter
    # and keep the checkpoint, so that --resume writes it without training again, equal to an unbroken run.
    import peft.peft_model
    from safetensors import SafetensorError

    unbroken = run_train(build_config(values(tiny_model_dir, imdb_dir, tmp_path / "unbroken")))
    out = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    with monkeypatch.context() as m:
        m.setattr(peft.peft_model, "safe_save_file", full_disk)
        with pytest.raises(DiskFull, match="disk full while saving the adapter"):
            run_train(build_config(values(tiny_model_dir, imdb_dir, out)))
    assert not list((out / "adapter").glob("*")) and not list(out.glob(".adapter-*"))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["position"]["epoch"] == 3  # trained
    batches = fail_at_batch(monkeypatch, 10**9, RuntimeError("unused"))  # counts the batches computed
    resumed = run_train(build_config(values(tiny_model_dir, imdb_dir, out, **{"train.resume": True})))
    assert batches["n"] == 0
    assert resumed["adapter_sha256"] == unbroken["adapter_sha256"] == \
        sha256_file(out / "adapter" / "adapter_model.safetensors")
