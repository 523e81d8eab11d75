"""The study's pipeline on the real model and data, small enough for CI (~5 minutes on 2 cores)."""

import json

import pytest
import torch

from peftlab.config import build_config
from peftlab.runs import run_eval, run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 400 balanced test reviews cut to 128 tokens (head+tail): the 95% interval is about +-4.5 points.
COMMON = {"data.n_test": 400, "prompt.max_input_tokens": 128, "data.data_seed": 0}


def config(imdb_archive, out, **extra):
    return build_config({"data.source": str(imdb_archive), **COMMON, **extra, "out": str(out)})


@pytest.fixture(scope="module")
def zero_shot(smollm2, imdb_archive, tmp_path_factory):
    model, tok = smollm2
    return run_eval(config(imdb_archive, tmp_path_factory.mktemp("zs"), **{"data.n_train": 0}), model, tok)


@pytest.fixture(scope="module")
def lora_run(smollm2, imdb_archive, tmp_path_factory):
    model, tok = smollm2
    out = tmp_path_factory.mktemp("lora")
    # N=500, one epoch: 81.85% on 2000 test reviews in results/core (N=200 was not enough: 61% vs 67%).
    metrics = run_train(config(imdb_archive, out, **{"data.n_train": 500, "train.epochs": 1}), model, tok)
    assert not any("lora" in name for name, _ in model.named_modules())  # the shared base is restored
    return out, metrics


def test_zero_shot_scores_every_review(zero_shot):
    assert zero_shot["n"] == 400 and sum(map(sum, zero_shot["confusion"]["matrix"])) == 400
    # These 400 are the first 200 per class of results/core/zero-shot's 2000 (nested sampling): 0.705 there
    # (recall 0.62 negative, 0.79 positive; bf16). 46 of them tie in bf16, so another precision lies in
    # 0.6225-0.7375. A scorer that always answers one class gets exactly 0.5 with one recall 0; a coin-flip
    # scorer 0.5 +- 0.025 (one standard deviation at n=400): the floor is 3 of them above it.
    assert 0.58 <= zero_shot["accuracy"] <= 0.75, zero_shot["accuracy"]
    recalls = [zero_shot["per_class"][c]["recall"] for c in ("negative", "positive")]
    assert min(recalls) >= 0.35, recalls  # both classes are predicted (0.455 at worst from the bf16 record)
    assert zero_shot["truncated_share"] > 0.3     # IMDB reviews are long


def test_lora_beats_zero_shot_by_a_clear_margin(lora_run, zero_shot):
    _, metrics = lora_run
    assert metrics["accuracy"] >= zero_shot["accuracy"] + 0.08, (metrics["accuracy"], zero_shot["accuracy"])
    assert metrics["accuracy"] >= 0.74
    assert metrics["trainable_parameters"] > 0 and metrics["best_epoch"] == 1


def test_plain_peft_reproduces_peftlab_predictions(lora_run, imdb_archive):
    """Adapter interop: a fresh base model + peft.PeftModel.from_pretrained, scored by a plain forward pass."""
    from peft import PeftModel

    from peftlab.config import ModelConfig
    from peftlab.data import load_splits
    from peftlab.models import load_base_model
    from peftlab.prompts import build_prompt_encoder

    out, metrics = lora_run
    base, tok = load_base_model(ModelConfig(name="smollm2"))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    cfg = config(imdb_archive, out)
    enc = build_prompt_encoder(tok, cfg.prompt, ["negative", "positive"], True)
    test = {e.id: e for e in load_splits(cfg.data).test}
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()][:12]
    agree = 0
    for line in lines:
        [ex] = enc.encode([test[line["id"]]], tok)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.prompt_ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        scores = {c: lp[ids[0]].item() for c, ids in zip(enc.classes, enc.label_ids)}
        # Plain peft runs the fp32 adapter on un-autocast bf16 activations, one review at a time; peftlab
        # batches under bf16 autocast. Scores then differ by bf16 rounding (up to ~0.2 nats here; exact
        # equality is tested in fp32 in tests/unit/test_cli.py), never by a different adapter.
        for c in scores:
            assert scores[c] == pytest.approx(line["scores"][c], abs=0.35)
        margin = scores["positive"] - scores["negative"]
        if abs(margin) > 0.5:
            assert max(scores, key=scores.get) == line["pred"]
        agree += max(scores, key=scores.get) == line["pred"]
    assert agree >= 11
