"""Reproducibility: `peftlab rerun RUN_DIR` gives the same sample, metrics and adapter hash on the same machine."""

import json

import pytest

from peftlab.cli import main
from peftlab.records import sha256_file


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_args(tiny_model_dir, imdb_dir, out):
    return ["train", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-train", "12",
            "--n-test", "8", "--max-input-tokens", "32", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2",
            "--data-seed", "3", "--seed", "5", "--select-on", "test", "--out", str(out), "--quiet"]


def test_rerun_of_a_training_run_reproduces_it_bitwise(tiny_model_dir, imdb_dir, tmp_path, capsys):
    run = tmp_path / "lora"
    assert main(train_args(tiny_model_dir, imdb_dir, run)) == 0
    assert (run / "config.yaml").read_text().startswith("# peftlab train --config config.yaml")
    capsys.readouterr()
    assert main(["rerun", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    rerun = tmp_path / "lora-rerun-1"
    assert ("compared with" in out and "training sample same, test sample same, accuracy same, per-epoch metrics "
            "same, adapter sha256 same" in out), out
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run, rerun))
    assert a["train_ids_sha256"] == b["train_ids_sha256"]  # the same training sample
    assert (run / "predictions.jsonl").read_text() == (rerun / "predictions.jsonl").read_text()  # same test sample
    assert [(e["accuracy"], e["train_loss"]) for e in a["per_epoch"]] == \
        [(e["accuracy"], e["train_loss"]) for e in b["per_epoch"]]
    assert sha256_file(run / "adapter" / "adapter_model.safetensors") == \
        sha256_file(rerun / "adapter" / "adapter_model.safetensors") == a["adapter_sha256"] == b["adapter_sha256"]
    assert b["config"]["data"]["data_seed"] == 3 and b["config"]["train"]["seed"] == 5
    # The next rerun gets the next free folder; --out picks one.
    assert main(["rerun", str(run), "--quiet", "--out", str(tmp_path / "chosen")]) == 0
    assert (tmp_path / "chosen" / "metrics.json").is_file() and not (tmp_path / "lora-rerun-2").exists()


def test_rerun_of_an_eval_run_and_of_a_killed_run(tiny_model_dir, imdb_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "zero"
    assert main(["eval", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-test", "6",
                 "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["rerun", str(run), "--quiet"]) == 0
    assert "test sample same, accuracy same" in capsys.readouterr().out
    # A run killed before it wrote metrics.json still says what it was: config.yaml is written first.
    import peftlab.runs as runs

    killed = tmp_path / "killed"
    monkeypatch.setattr(runs, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(train_args(tiny_model_dir, imdb_dir, killed)) == 130
    monkeypatch.undo()
    assert (killed / "config.yaml").is_file() and not (killed / "metrics.json").exists()
    assert main(["rerun", str(killed), "--quiet"]) == 0
    assert "did not finish: nothing to compare with" in capsys.readouterr().out
    assert (tmp_path / "killed-rerun-1" / "metrics.json").is_file()


def test_the_recorded_commit_is_dirty_only_when_the_code_differs(tmp_path):
    """A store written into a tracked results/ file must not mark every cell "-dirty" (issue 16: the committed
    report named -dirty commits, and which code made those cells could not be told)."""
    import subprocess

    from peftlab.repro import git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "store.sqlite").write_bytes(b"cells: 1")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "results" / "store.sqlite").write_bytes(b"cells: 2")   # a sweep writing its tracked store
    (tmp_path / "notes.txt").write_text("untracked, outside src")
    assert git_commit(tmp_path) == head
    (tmp_path / "src" / "new_module.py").write_text("y = 2\n")       # code that is in no commit
    assert git_commit(tmp_path) == head + "-dirty"
    (tmp_path / "src" / "new_module.py").unlink()
    (tmp_path / "src" / "code.py").write_text("x = 2\n")             # changed code
    assert git_commit(tmp_path) == head + "-dirty"
