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
