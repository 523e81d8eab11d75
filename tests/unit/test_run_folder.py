"""A run folder is never replaced silently, and --resume with nothing to resume is an error (issue 14)."""

import hashlib

import pytest
import yaml

from peftlab.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def eval_args(tiny_model_dir, imdb_dir, out, n_test="4"):
    return ["eval", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-test", n_test,
            "--max-input-tokens", "32", "--out", str(out), "--quiet"]


def train_args(tiny_model_dir, imdb_dir, out):
    return ["train", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(imdb_dir), "--n-train", "8",
            "--n-test", "4", "--epochs", "1", "--batch-size", "4", "--max-input-tokens", "32", "--out", str(out),
            "--quiet"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("peftlab: error: "), err
    return err


def test_a_finished_run_is_refused_then_moved_aside_only_with_overwrite(tiny_model_dir, imdb_dir, tmp_path, capsys):
    out = tmp_path / "keep"
    assert main(eval_args(tiny_model_dir, imdb_dir, out)) == 0
    first = snapshot(out)
    capsys.readouterr()
    assert main(eval_args(tiny_model_dir, imdb_dir, out, n_test="6")) == 2
    err = one_error_line(capsys)
    assert "holds a finished run" in err and "new --out" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == first  # not a byte changed
    assert main(eval_args(tiny_model_dir, imdb_dir, out, n_test="6") + ["--overwrite"]) == 0
    assert snapshot(tmp_path / "keep.replaced-1") == first  # the old run, whole, beside the new one
    assert '"n": 6' in (out / "metrics.json").read_text()


def test_an_unfinished_run_is_refused_without_resume_or_overwrite(tiny_model_dir, imdb_dir, tmp_path, capsys):
    out = tmp_path / "cut"
    out.mkdir()
    (out / "config.yaml").write_text("# peftlab train --config config.yaml\n")
    assert main(train_args(tiny_model_dir, imdb_dir, out)) == 2
    assert "holds an unfinished run (config.yaml, no metrics.json)" in one_error_line(capsys)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(train_args(tiny_model_dir, imdb_dir, tmp_path / "other")) == 2
    assert "holds files that are not a peftlab run" in one_error_line(capsys)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_with_nothing_to_resume_is_an_error(tiny_model_dir, imdb_dir, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, imdb_dir, tmp_path / "nosuchrun") + ["--resume"]) == 2
    assert "--resume: " in one_error_line(capsys) and not (tmp_path / "nosuchrun" / "metrics.json").exists()
    # A finished run is returned as it is by --resume.
    out = tmp_path / "done"
    assert main(train_args(tiny_model_dir, imdb_dir, out)) == 0
    before = snapshot(out)
    assert main(train_args(tiny_model_dir, imdb_dir, out) + ["--resume"]) == 0
    assert snapshot(out) == before


def test_a_sweep_with_resume_starts_new_cells_with_a_notice(tiny_model_dir, imdb_dir, tmp_path, capsys):
    config = {"model": {"name": str(tiny_model_dir), "dtype": "fp32"},
              "data": {"source": str(imdb_dir), "n_test": 4}, "prompt": {"max_input_tokens": 32},
              "train": {"epochs": 1, "batch_size": 4}, "grid": {"data.n_train": [4, 8]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["sweep", str(path), "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "cells"), "--resume",
            "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("nothing to resume for") == 2 and "2 cells run" in captured.out
