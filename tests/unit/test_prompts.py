import pytest

from peftlab.config import PromptConfig
from peftlab.data.examples import Example
from peftlab.errors import PeftlabError
from peftlab.prompts import build_prompt_encoder, render_template
from peftlab.prompts.templates import ALPACA
from tests.conftest import build_tiny_tokenizer

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_alpaca_template_is_split_around_the_input():
    prefix, suffix = render_template("alpaca", "Say it.")
    assert prefix + "REVIEW" + suffix == ALPACA.format(instruction="Say it.", input="REVIEW")
    assert suffix.endswith("### Response:\n")


@pytest.mark.parametrize("side", ["head", "tail", "head+tail"])
def test_only_the_input_is_truncated(tok, side):
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=8, truncation=side), CLASSES, True)
    text = " ".join(f"w{i}" for i in range(40))
    [ex] = enc.encode([Example("a", text, "positive")], tok)
    assert ex.truncated and ex.label == 1
    assert ex.prompt_ids[: len(enc.prefix_ids)] == enc.prefix_ids
    assert ex.prompt_ids[-len(enc.suffix_ids):] == enc.suffix_ids
    body = ex.prompt_ids[len(enc.prefix_ids): -len(enc.suffix_ids)]
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert len(body) == 8
    expected = {"head": full[:8], "tail": full[-8:], "head+tail": full[:2] + full[-6:]}[side]
    assert body == expected


def test_short_inputs_are_not_marked_truncated(tok):
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    [ex] = enc.encode([Example("a", "great film", "negative")], tok)
    assert not ex.truncated and ex.label == 0


def test_label_words_are_tokenised_in_context(tok):
    enc = build_prompt_encoder(tok, PromptConfig(), CLASSES, True)
    for word, ids in zip(enc.label_words, enc.label_ids):
        full = tok(enc.suffix_text + word, add_special_tokens=False)["input_ids"]
        assert full == enc.suffix_ids + ids
    assert "positive or negative" not in enc.instruction and "negative or positive" in enc.instruction


def test_plain_template_puts_the_space_in_the_label_word(tok):
    enc = build_prompt_encoder(tok, PromptConfig(template="plain"), CLASSES, False)
    assert enc.label_words == [" negative", " positive"]


def test_colliding_and_missing_label_words_are_refused(tok):
    with pytest.raises(PeftlabError, match="tokenise to the same ids"):
        build_prompt_encoder(tok, PromptConfig(label_words={"negative": "bad", "positive": "bad"}), CLASSES, True)
    with pytest.raises(PeftlabError, match="missing"):
        build_prompt_encoder(tok, PromptConfig(label_words={"negative": "bad"}), CLASSES, True)
    with pytest.raises(PeftlabError, match="neither a known template"):
        build_prompt_encoder(tok, PromptConfig(template="no input here"), CLASSES, True)
