import json

import pytest
import torch
from safetensors.torch import load_file

from peftlab.config import build_config
from peftlab.runs import run_train
from peftlab.train.loop import TrainingDiverged


def cfg(tiny_model_dir, imdb_dir, out, **extra):
    layer = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
             "data.n_train": 24, "data.n_test": 24, "prompt.max_input_tokens": 48, "train.epochs": 3,
             "train.batch_size": 4, "out": str(out)}
    layer.update(extra)
    return build_config(layer)


def test_training_learns_the_tiny_task(tiny_model_dir, imdb_dir, tmp_path):
    # A random 2-layer model learns slowly; the real learning floor is in tests/integration.
    metrics = run_train(cfg(tiny_model_dir, imdb_dir, tmp_path, **{"train.lr": 2e-2, "train.loss": "classes",
                                                                     "train.epochs": 6}))
    losses = [e["train_loss"] for e in metrics["per_epoch"]]
    assert losses[-1] < 0.8 * losses[0], losses  # a loss of the wrong sign or position would not fall
    assert metrics["accuracy"] >= 0.75          # random is 0.5; the task is separable by word
    assert metrics["best_epoch"] == max(range(1, 7), key=lambda e: (metrics["per_epoch"][e - 1]["accuracy"], -e))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_model_dir, imdb_dir, tmp_path):
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_train(cfg(tiny_model_dir, imdb_dir, tmp_path / name, **{"train.seed": seed, "train.epochs": 1}))
        weights.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    m_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m_a["accuracy"] == m_b["accuracy"] and m_a["per_epoch"][0]["train_loss"] == m_b["per_epoch"][0]["train_loss"]


def test_a_nan_loss_stops_training_with_a_reason(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    import peftlab.train.loop as loop
    real = loop.example_scores
    monkeypatch.setattr(loop, "example_scores", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged at epoch 1, batch 1"):
        run_train(cfg(tiny_model_dir, imdb_dir, tmp_path))
    assert not (tmp_path / "metrics.json").exists()
