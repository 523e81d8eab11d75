"""Length normalisation and prior calibration, against hand computations and a plain forward pass."""

import json
import math

import pytest
import torch

from peftlab.config import EvalConfig, build_config
from peftlab.errors import PeftlabError
from peftlab.evaluate.calibration import (
    CONTENT_FREE_INPUTS,
    content_free_offsets,
    decision_scores,
    fit_prior,
    normalise_scores,
)


def test_token_and_byte_normalisation_divide_by_the_word_length():
    scores = torch.tensor([[-6.0, -2.0], [-3.0, -1.5]])
    ids, words = [[5, 6, 7], [8]], [" terrible", "good"]  # 3 tokens / 8 bytes, 1 token / 4 bytes
    assert torch.equal(normalise_scores(scores, ids, words, "sum"), scores)
    assert normalise_scores(scores, ids, words, "token").tolist() == [[-2.0, -2.0], [-1.0, -1.5]]
    assert normalise_scores(scores, ids, words, "byte").tolist() == [[-0.75, -0.5], [-0.375, -0.375]]


def test_content_free_calibration_divides_by_the_mean_content_free_probabilities():
    # Two content-free inputs whose class probabilities (renormalised over the classes) are 0.8/0.2 and 0.6/0.4.
    free = torch.tensor([[math.log(0.8 * 0.5), math.log(0.2 * 0.5)], [math.log(0.6), math.log(0.4)]])
    offsets = content_free_offsets(free)
    assert offsets.tolist() == pytest.approx([math.log(0.7), math.log(0.3)])
    # An example at 0.6/0.4 goes to class 0 uncalibrated; divided by p_cf (0.6/0.7 < 0.4/0.3) to class 1.
    example = torch.tensor([[math.log(0.6), math.log(0.4)]])
    assert decision_scores(example).argmax().item() == 0
    decided = decision_scores(example, offsets)
    assert decided.argmax().item() == 1
    expected = [0.6 / 0.7, 0.4 / 0.3]
    assert torch.softmax(decided, -1)[0].tolist() == pytest.approx([e / sum(expected) for e in expected])


def test_the_validation_prior_matches_hand_solutions():
    # A uniform model and gold classes 3:1: the fitted prior must make softmax(-b) = (0.75, 0.25).
    b = fit_prior(torch.zeros(8, 2), [0, 0, 0, 1, 0, 0, 0, 1])
    logs = [math.log(0.75), math.log(0.25)]
    assert b.tolist() == pytest.approx([-(v - sum(logs) / 2) for v in logs], abs=1e-6)
    # A model that always says 0.9/0.1 on balanced gold: b removes exactly that bias.
    b = fit_prior(torch.log(torch.tensor([[0.9, 0.1]] * 6)), [0, 1] * 3)
    half = (math.log(0.9) - math.log(0.1)) / 2
    assert b.tolist() == pytest.approx([half, -half], abs=1e-6)
    with pytest.raises(PeftlabError, match="validation split is empty"):
        fit_prior(torch.zeros(0, 2), [])


def test_config_refuses_unknown_options_and_val_without_a_validation_split():
    with pytest.raises(PeftlabError, match="eval.score_norm='mean' is not one of sum, token, byte"):
        EvalConfig(score_norm="mean")
    with pytest.raises(PeftlabError, match="eval.calibration=val fits the prior on a validation split"):
        build_config({"eval.calibration": "val"})


@pytest.mark.parametrize("norm", ["sum", "token", "byte"])
def test_content_free_decisions_of_a_run_equal_a_hand_calibration_of_plain_forward_scores(
        tiny_model_dir, imdb_dir, tmp_path, one_torch_thread, norm):
    from peftlab.data.examples import Example
    from peftlab.runs import run_eval
    from peftlab.models import load_base_model
    from peftlab.config import ModelConfig, PromptConfig
    from peftlab.prompts import build_prompt_encoder
    from tests.unit.test_scoring import plain_label_logprobs

    words = {"negative": "negative sentiment", "positive": "positive"}  # lengths differ: normalisation matters
    cfg = build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
                        "data.n_train": 0, "data.n_test": 12, "prompt.max_input_tokens": 40,
                        "prompt.label_words": words, "eval.score_norm": norm, "eval.calibration": "content-free",
                        "out": str(tmp_path / "run")})
    metrics = run_eval(cfg, progress=False)
    model, tok = load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu"))
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=40, label_words=words), ["negative", "positive"],
                               True)
    lengths = {"sum": [1, 1], "token": [len(i) for i in enc.label_ids], "byte": [len("negative sentiment"), 8]}[norm]
    with torch.no_grad():
        free = [plain_label_logprobs(model, ex.prompt_ids, enc.label_ids)
                for ex in enc.encode([Example(str(i), t, None) for i, t in enumerate(CONTENT_FREE_INPUTS)], tok)]
    probs = [[math.exp(s / n) for s, n in zip(row, lengths)] for row in free]
    p_cf = [sum(p[c] / sum(p) for p in probs) / len(probs) for c in range(2)]
    assert list(metrics["decision"]["log_prior_offsets"].values()) == pytest.approx([math.log(p) for p in p_cf],
                                                                                     abs=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        raw = [line["scores"][c] for c in ("negative", "positive")]
        adjusted = [math.exp(s / n) / p for s, n, p in zip(raw, lengths, p_cf)]
        assert line["pred"] == ("negative", "positive")[adjusted.index(max(adjusted))]
    assert metrics["decision"]["score_norm"] == norm


def test_a_validation_prior_is_fitted_on_the_validation_scores_of_the_chosen_adapter(
        tiny_model_dir, imdb_dir, tmp_path, one_torch_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.config import PromptConfig
    from peftlab.data import load_splits
    from peftlab.prompts import build_prompt_encoder
    from peftlab.runs import run_train, sample_task
    from tests.unit.test_scoring import plain_label_logprobs

    cfg = build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
                        "data.n_train": 8, "data.n_val": 6, "data.n_test": 6, "prompt.max_input_tokens": 32,
                        "train.epochs": 1, "train.batch_size": 4, "train.lr": 5e-2, "method.lora_dropout": 0.0,
                        "eval.calibration": "val", "eval.score_norm": "token", "out": str(tmp_path / "run")})
    metrics = run_train(cfg, progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=32), ["negative", "positive"], True)
    val = sample_task(cfg, load_splits(cfg.data)).val
    assert len(val) == 6
    with torch.no_grad():
        encoded = enc.encode(val, tok)
        scores = torch.tensor([plain_label_logprobs(model, e.prompt_ids, enc.label_ids) for e in encoded])
    lengths = torch.tensor([len(ids) for ids in enc.label_ids], dtype=scores.dtype)
    expected = fit_prior(scores / lengths, [e.label for e in encoded])
    assert list(metrics["decision"]["log_prior_offsets"].values()) == pytest.approx(expected.tolist(), abs=1e-4)
