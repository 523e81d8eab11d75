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
             "train.batch_size": 4, "train.select_on": "test", "out": str(out)}
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


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning", "p-tuning"])
def test_a_shared_prompt_prefix_gives_the_gradients_of_one_pass_per_row(tiny, method):
    """The prefix runs once per batch with its graph kept: loss and gradients equal full passes (dropout 0)."""
    from peftlab.config import MethodConfig, PromptConfig, TrainConfig
    from peftlab.evaluate.scoring import build_rows
    from peftlab.models import attach_method, position_offset
    from peftlab.prompts import build_prompt_encoder
    from peftlab.distributed import SINGLE
    from peftlab.train.loop import batch_loss, training_prefix
    from tests.unit.test_scoring import CLASSES, examples

    model, tok = tiny
    model = attach_method(model, MethodConfig(method=method, lora_dropout=0.0, virtual_tokens=4, prompt_init="vocab"),
                          seed=0)
    offset = position_offset(model)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): make every adapter weight matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.train()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    encoded = enc.encode(examples(), tok)
    rows = build_rows(encoded, enc.label_ids, gold_only=True)
    gold = torch.tensor([e.label for e in encoded])
    prefix_ids = training_prefix(model, rows, offset, TrainConfig(), SINGLE)
    assert prefix_ids == enc.prefix_ids  # the whole instruction part is shared
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for ids in (None, prefix_ids):
        model.zero_grad()
        loss = batch_loss(model, rows, gold, 2, tok.pad_token_id, offset, "lm", prefix_ids=ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (plain_loss, plain_grads), (shared_loss, shared_grads) = results
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_no_training_prefix_with_dropout_prefix_tuning_or_checkpointing(tiny):
    from peftlab.config import MethodConfig, PromptConfig, TrainConfig
    from peftlab.evaluate.scoring import build_rows
    from peftlab.models import attach_method, position_offset
    from peftlab.prompts import build_prompt_encoder
    from peftlab.distributed import SINGLE
    from peftlab.train.loop import training_prefix
    from tests.unit.test_scoring import CLASSES, examples

    model, tok = tiny
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    rows = build_rows(enc.encode(examples(), tok), enc.label_ids, gold_only=True)
    lora = attach_method(model, MethodConfig(method="lora", lora_dropout=0.0), seed=0)
    assert training_prefix(lora, rows, 0, TrainConfig(gradient_checkpointing=True), SINGLE) is None
    assert training_prefix(lora, rows, 0, TrainConfig(), SINGLE) == enc.prefix_ids
    lora.unload()
    # Dropout anywhere (the adapter's, the base's attention): one prefix pass would share one mask.
    with_dropout = attach_method(model, MethodConfig(method="lora", lora_dropout=0.1), seed=0)
    assert training_prefix(with_dropout, rows, 0, TrainConfig(), SINGLE) is None
    with_dropout.unload()
    model.config.attention_dropout = 0.1
    ia3 = attach_method(model, MethodConfig(method="ia3"), seed=0)
    assert training_prefix(ia3, rows, 0, TrainConfig(), SINGLE) is None
    model.config.attention_dropout = 0.0
    assert training_prefix(ia3, rows, 0, TrainConfig(), SINGLE) == enc.prefix_ids
    ia3.unload()
    prompt = attach_method(model, MethodConfig(method="prefix-tuning", virtual_tokens=4), seed=0)
    assert training_prefix(prompt, rows, position_offset(prompt), TrainConfig(), SINGLE) is None
