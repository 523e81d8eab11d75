"""The pipeline on several architectures and tokenizer styles, each against a plain forward pass or plain peft.

LLaMA, Gemma 3 (sliding window shorter than the prompt, scaled embeddings, tied head), Qwen2 and GPT-2
(no q_proj/v_proj: peft's default LoRA target is c_attn), with a byte-level tokenizer that adds a BOS and
a GPT-2-style one that adds none.
"""

import json

import pytest
import torch

from peftlab.config import MethodConfig, PromptConfig, build_config
from peftlab.evaluate.scoring import build_rows, example_scores, score_examples, shared_prefix
from peftlab.models import attach_method, position_offset
from peftlab.prompts import build_prompt_encoder
from tests.tiny_models import ARCHITECTURES, save_model
from tests.unit.test_scoring import CLASSES, examples, plain_label_logprobs, with_method

# The tokenizer each architecture's training tests use: as its real checkpoints do (BOS or not).
ADDS_BOS = {"llama": True, "gemma3": True, "qwen2": False, "gpt2": False}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch in ARCHITECTURES:
        for bos in (True, False):
            dirs[arch, bos] = save_model(tmp_path_factory.mktemp(f"{arch}-{'bos' if bos else 'nobos'}"), arch, bos)
    return dirs


def load(folder):
    from peftlab.config import ModelConfig
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name=str(folder), dtype="fp32", device="cpu"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("method", [None, "lora", "prompt-tuning"], ids=["zero-shot", "lora", "prompt-tuning"])
def test_scores_equal_a_plain_forward_with_and_without_the_shared_prefix(model_dirs, one_torch_thread, arch, bos,
                                                                         method):
    model, tok = load(model_dirs[arch, bos])
    config = method and MethodConfig(method=method, lora_dropout=0.0, virtual_tokens=4, prompt_init="vocab")
    model = with_method(model, config)
    words = {"negative": "negative sentiment", "positive": "positive"}  # several tokens, of different counts
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64, label_words=words), CLASSES, True)
    assert len(enc.label_ids[0]) > len(enc.label_ids[1]) > 1
    assert (enc.prefix_ids[:1] == [tok.bos_token_id]) == bos  # BOS exactly where the tokenizer adds one
    encoded = enc.encode(examples(), tok)
    rows = build_rows(encoded, enc.label_ids)
    offset = position_offset(model)
    prefix = shared_prefix(model, rows, offset)
    assert prefix is not None and prefix.length == len(enc.prefix_ids)  # the whole instruction is shared
    window = getattr(model.config, "sliding_window", None)
    assert arch != "gemma3" or window < prefix.length  # the prefix (and every row) crosses the sliding window
    shared = score_examples(model, rows, 2, tok.pad_token_id, offset, max_examples=4, progress=False).scores
    unshared = score_examples(model, rows, 2, tok.pad_token_id, offset, max_examples=4, progress=False,
                              share_prefix=False).scores
    with torch.no_grad():
        for i, ex in enumerate(encoded):
            alone = example_scores(model, [rows[i]], 2, tok.pad_token_id, offset)[0]
            reference = torch.tensor(plain_label_logprobs(model, ex.prompt_ids, enc.label_ids))
            torch.testing.assert_close(alone, reference, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(unshared[i], reference, rtol=1e-4, atol=1e-4)  # in a padded batch
            torch.testing.assert_close(shared[i], reference, rtol=1e-4, atol=1e-4)


def default_lora_targets(model_type: str) -> set[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_training_and_reload_in_plain_peft_give_the_same_scores(model_dirs, imdb_dir, tmp_path, one_torch_thread,
                                                               arch, method):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftlab.config import DataConfig
    from peftlab.data import load_splits
    from peftlab.runs import run_train

    folder = model_dirs[arch, ADDS_BOS[arch]]
    cfg = build_config({"model.name": str(folder), "model.dtype": "fp32", "data.source": str(imdb_dir),
                        "data.n_train": 8, "data.n_test": 6, "prompt.max_input_tokens": 32, "train.epochs": 1,
                        "train.batch_size": 4, "train.lr": 5e-2, "method.method": method,
                        "method.virtual_tokens": 4, "method.lora_dropout": 0.0, "out": str(tmp_path / "run")})
    run_train(cfg, progress=False)
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    if method == "lora":
        assert set(saved["target_modules"]) == default_lora_targets(AutoConfig.from_pretrained(folder).model_type)
        assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())  # it trained: B left 0

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(base, adapter).eval()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=32), CLASSES, True)
    test = {e.id: e for e in load_splits(DataConfig(source=str(imdb_dir))).test}
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    with torch.no_grad():
        for line in lines[:3]:
            [ex] = enc.encode([test[line["id"]]], tok)
            plain = plain_label_logprobs(model, ex.prompt_ids, enc.label_ids)
            assert plain == pytest.approx([line["scores"][c] for c in CLASSES], abs=1e-4)
