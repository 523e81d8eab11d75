"""Scores must be right (equal to a plain full forward pass) and independent of the batch."""

import pytest
import torch

from peftlab.config import MethodConfig, PromptConfig
from peftlab.data.examples import Example
from peftlab.evaluate.scoring import build_rows, example_scores, length_batches, score_examples
from peftlab.models import attach_method, position_offset
from peftlab.prompts import build_prompt_encoder
from tests.conftest import review

CLASSES = ["negative", "positive"]


def examples(n=6):
    import random
    rng = random.Random(1)
    # Lengths differ a lot, so batches are padded.
    return [Example(str(i), review(rng, i % 2 == 0, length=5 + 9 * i), CLASSES[i % 2]) for i in range(n)]


def methods():
    return [None, MethodConfig(method="lora", lora_dropout=0.0), MethodConfig(method="prompt-tuning",
            virtual_tokens=5, prompt_init="vocab"), MethodConfig(method="ia3")]


def with_method(model, method):
    if method is None:
        return model
    peft_model = attach_method(model, method, seed=0)
    with torch.no_grad():  # adapters start as the identity (LoRA B = 0): make them matter
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return peft_model


def plain_label_logprobs(model, ids: list[int], label_ids: list[list[int]]) -> list[float]:
    """Reference: full forward pass on prompt + label word, no padding, no logits_to_keep."""
    out = []
    for lab in label_ids:
        seq = torch.tensor([ids + lab])
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].float()
        offset = logits.shape[0] - seq.shape[1]  # virtual tokens of prompt tuning come first
        lp = torch.log_softmax(logits, -1)
        out.append(sum(lp[offset + len(ids) - 1 + j, t].item() for j, t in enumerate(lab)))
    return out


@pytest.mark.parametrize("method", methods(), ids=["zero-shot", "lora", "prompt-tuning", "ia3"])
@pytest.mark.parametrize("words", [None, {"negative": "negative sentiment", "positive": "positive vibes"}],
                         ids=["single-token", "multi-token"])
def test_batched_scores_equal_plain_forward_and_do_not_depend_on_the_batch(tiny, method, words):
    model, tok = tiny
    model = with_method(model, method)
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64, label_words=words), CLASSES, True)
    if words:
        assert max(len(ids) for ids in enc.label_ids) > 1
    encoded = enc.encode(examples(), tok)
    rows = build_rows(encoded, enc.label_ids)
    offset = position_offset(model)
    with torch.no_grad():
        together = example_scores(model, rows, 2, tok.pad_token_id, offset)
        for i, ex in enumerate(encoded):
            alone = example_scores(model, [rows[i]], 2, tok.pad_token_id, offset)
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)
            reference = torch.tensor(plain_label_logprobs(model, ex.prompt_ids, enc.label_ids))
            torch.testing.assert_close(together[i], reference, rtol=1e-4, atol=1e-4)


def test_training_scores_are_batch_independent_with_dropout_off(tiny):
    model, tok = tiny
    model = with_method(model, MethodConfig(method="prompt-tuning", virtual_tokens=4, prompt_init="vocab"))
    model.train()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    rows = build_rows(enc.encode(examples(), tok), enc.label_ids, gold_only=True)
    together = example_scores(model, rows, 2, tok.pad_token_id, 4)
    alone = example_scores(model, [rows[3]], 2, tok.pad_token_id, 4)
    torch.testing.assert_close(together[3], alone[0], rtol=1e-4, atol=1e-4)
    assert torch.isinf(together[3]).sum() == 1  # gold-only rows score just the gold class


def test_length_batches_respect_both_limits():
    lengths = [10, 50, 20, 40, 30, 60, 5]
    batches = length_batches(lengths, max_examples=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_score_examples_counts_tokens(tiny):
    model, tok = tiny
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    encoded = enc.encode(examples(), tok)
    rows = build_rows(encoded, enc.label_ids)
    result = score_examples(model, rows, 2, tok.pad_token_id, 0, 4, 10_000, False)
    assert result.scores.shape == (6, 2) and result.tokens == sum(len(row.seq) for r in rows for row in r)
    assert result.tokens >= sum(len(e.prompt_ids) for e in encoded)


@pytest.mark.parametrize("method", [None, MethodConfig(method="lora", lora_dropout=0.0),
                                    MethodConfig(method="prompt-tuning", virtual_tokens=5, prompt_init="vocab"),
                                    MethodConfig(method="p-tuning", virtual_tokens=3)],
                         ids=["zero-shot", "lora", "prompt-tuning", "p-tuning"])
@pytest.mark.parametrize("words", [None, {"negative": "negative sentiment", "positive": "positive vibes"}],
                         ids=["single-token", "multi-token"])
def test_shared_prefix_cache_gives_the_same_scores(tiny, method, words):
    from peftlab.evaluate.scoring import shared_prefix

    model, tok = tiny
    model = with_method(model, method)
    offset = position_offset(model)
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64, label_words=words), CLASSES, True)
    rows = build_rows(enc.encode(examples(), tok), enc.label_ids)
    prefix = shared_prefix(model, rows, offset)
    assert prefix is not None and prefix.length == len(enc.prefix_ids)  # the whole instruction part
    assert prefix.virtual == (offset if method and method.method != "lora" else 0)
    shared = score_examples(model, rows, 2, tok.pad_token_id, offset, 4, 10_000, False, share_prefix=True)
    plain = score_examples(model, rows, 2, tok.pad_token_id, offset, 4, 10_000, False, share_prefix=False)
    torch.testing.assert_close(shared.scores, plain.scores, rtol=1e-4, atol=1e-4)


def test_no_shared_prefix_for_prefix_tuning(tiny):
    """Prefix tuning brings its own cache in front of every row: peftlab does not split its forward."""
    from peftlab.evaluate.scoring import shared_prefix

    model, tok = tiny
    model = with_method(model, MethodConfig(method="prefix-tuning", virtual_tokens=4))
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    rows = build_rows(enc.encode(examples(), tok), enc.label_ids)
    assert shared_prefix(model, rows, position_offset(model)) is None


def test_gpu_attention_leaves_out_cudnn_and_restores_the_settings():
    from peftlab.evaluate.scoring import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cuda")):  # only sets the flags: runs without a GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
