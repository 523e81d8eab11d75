"""Shared fixtures: a tiny LLaMA with a tiny tokenizer (no download), and a tiny aclImdb folder."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS_POS = "great wonderful moving brilliant superb lovely charming".split()
WORDS_NEG = "awful boring dull terrible weak clumsy tedious".split()
FILLER = "the film movie story actor plot scene music ending camera was and a it this".split()


def review(rng: random.Random, positive: bool, length: int = 30) -> str:
    words = [rng.choice(FILLER) for _ in range(length)]
    for i in rng.sample(range(length), 4):
        words[i] = rng.choice(WORDS_POS if positive else WORDS_NEG)
    return " ".join(words).capitalize() + "."


def build_tiny_tokenizer(extra_corpus: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peftlab.prompts.templates import ALPACA, IMDB_INSTRUCTION

    corpus = [ALPACA, IMDB_INSTRUCTION, "positive negative neutral good bad Answer:"] + \
        [" ".join(WORDS_POS + WORDS_NEG + FILLER)] * 5 + list(extra_corpus)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaMA folder, loadable with --model <folder>."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny(tiny_model_dir):
    """(model, tokenizer) fresh for each test: fp32 on the CPU."""
    from peftlab.config import ModelConfig
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu"))


def write_aclimdb(root: Path, n_per_class: int = 12, seed: int = 0) -> Path:
    """A small folder in the official aclImdb layout, with HTML line breaks like the real one."""
    rng = random.Random(seed)
    for split in ("train", "test"):
        for folder, positive in (("pos", True), ("neg", False)):
            d = root / "aclImdb" / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                rating = rng.choice([7, 8, 9, 10] if positive else [1, 2, 3, 4])
                text = review(rng, positive) + "<br /><br />" + review(rng, positive, 10)
                (d / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    return root / "aclImdb"


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("imdb"))


@pytest.fixture(autouse=True)
def _quiet_and_no_imdb_env(monkeypatch):
    # No progress bars in test logs; a user's $PEFTLAB_IMDB must not change what "imdb" means here.
    monkeypatch.setenv("PEFTLAB_PROGRESS", "0")
    monkeypatch.delenv("PEFTLAB_IMDB", raising=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: the tiny model gains nothing from threads, and on a shared,
    loaded CPU OpenMP threads spin (one thread measured ~10x faster). Bitwise comparisons only need the
    same thread count in every run they compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
