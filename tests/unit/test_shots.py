"""k-shot prompts: demonstrations from the training split only, balanced, in the shared prefix, scored right."""

import collections

import pytest
import torch

from peftlab.config import PromptConfig, build_config
from peftlab.data import load_splits
from peftlab.config import DataConfig
from peftlab.errors import PeftlabError
from peftlab.evaluate.scoring import build_rows, score_examples, shared_prefix
from peftlab.prompts import build_prompt_encoder
from peftlab.prompts.templates import ALPACA, IMDB_INSTRUCTION
from tests.unit.test_scoring import CLASSES, plain_label_logprobs


def alpaca(text: str) -> str:
    return ALPACA.replace("{instruction}", IMDB_INSTRUCTION.replace("{choices}", "negative or positive")) \
        .replace("{input}", text)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fixed_shots_are_the_text_by_hand_in_the_shared_prefix_and_score_as_a_plain_forward(
        tiny, imdb_dir, one_torch_thread, k):
    model, tok = tiny
    splits = load_splits(DataConfig(source=str(imdb_dir)))
    config = PromptConfig(max_input_tokens=512, shots=k)  # no truncation: the text can be compared by hand
    enc = build_prompt_encoder(tok, config, CLASSES, True, splits.train, data_seed=0)
    plain = build_prompt_encoder(tok, PromptConfig(max_input_tokens=512), CLASSES, True)
    demos = enc.demonstrations
    assert len(demos) == k and len({d.id for d in demos}) == k
    counts = collections.Counter(d.label for d in demos)
    assert max(counts.values()) - min(counts.get(c, 0) for c in CLASSES) <= 1  # balanced as far as k allows
    test = splits.test[:5]
    encoded = enc.encode(test, tok)
    by_hand = "".join(alpaca(d.text) + d.label + "\n\n" for d in demos)
    for ex, e in zip(test, encoded):
        assert tok.decode(e.prompt_ids) == by_hand + alpaca(ex.text)
    rows = build_rows(encoded, enc.label_ids)
    prefix = shared_prefix(model, rows, 0)
    assert prefix.length == len(enc.prefix_ids) > len(plain.prefix_ids) + 40 * k  # demonstrations scored once
    scores = score_examples(model, rows, 2, tok.pad_token_id, 0, max_examples=3, progress=False).scores
    with torch.no_grad():
        for i, e in enumerate(encoded):
            reference = torch.tensor(plain_label_logprobs(model, e.prompt_ids, enc.label_ids))
            torch.testing.assert_close(scores[i], reference, rtol=1e-4, atol=1e-4)


def test_demonstrations_come_from_the_training_split_and_never_show_the_example_itself(tiny_model_dir, imdb_dir):
    from peftlab.models.loading import load_tokenizer, resolve_model_source
    from peftlab.config import ModelConfig
    from peftlab.runs import load_task

    tok = load_tokenizer(resolve_model_source(str(tiny_model_dir)), ModelConfig(name=str(tiny_model_dir)))
    for mode in ("fixed", "per-example"):
        cfg = build_config({"data.source": str(imdb_dir), "data.n_train": 8, "data.n_test": 12,
                            "prompt.shots": 4, "prompt.shots_mode": mode, "prompt.max_input_tokens": 512})
        task = load_task(cfg, tok)
        train_ids, test_ids = {e.id for e in task.splits.train}, {e.id for e in task.test}
        texts = {e.id: e.text for e in task.splits.train}
        fixed = {d.id for d in task.encoder.demonstrations}
        # A fixed demonstration may also be in the training sample (prompts/shots.py): those are left out here.
        shown_for = task.test + [e for e in task.train if e.id not in fixed]
        assert len(shown_for) >= len(task.test) + len(task.train) - 4
        for ex, encoded in zip(shown_for, task.encoder.encode(shown_for, tok)):
            shown = tok.decode(encoded.prompt_ids)
            demos = [i for i, t in texts.items() if t in shown and i != ex.id]
            assert len(demos) == 4 and set(demos) <= train_ids and not set(demos) & test_ids
            assert shown.count(ex.text) == 1  # per-example: a training example is not its own demonstration
        if mode == "fixed":
            assert {d.id for d in task.encoder.demonstrations} <= train_ids
            assert task.encoder.record()["demonstrations"] == [d.id for d in task.encoder.demonstrations]


@pytest.mark.parametrize("mode", ["fixed", "per-example"])
def test_more_shots_than_the_training_split_holds_per_class_is_one_clear_error(tiny, imdb_dir, mode):
    _, tok = tiny
    splits = load_splits(DataConfig(source=str(imdb_dir)))  # 12 training reviews per class
    with pytest.raises(PeftlabError, match=r"prompt.shots=26 needs 13 demonstration\(s\) of class 'negative'"):
        build_prompt_encoder(tok, PromptConfig(shots=26, shots_mode=mode), CLASSES, True, splits.train)
    with pytest.raises(PeftlabError, match="prompt.shots=2 draws demonstrations from the training split"):
        build_prompt_encoder(tok, PromptConfig(shots=2), CLASSES, True, [])
    with pytest.raises(PeftlabError, match="prompt.shots_mode='some'"):
        PromptConfig(shots_mode="some")


def test_a_k_shot_eval_runs_end_to_end_and_records_its_demonstrations(tiny_model_dir, imdb_dir, tmp_path,
                                                                      one_torch_thread):
    from peftlab.runs import run_eval

    cfg = build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
                        "data.n_train": 0, "data.n_test": 8, "prompt.shots": 2, "prompt.max_input_tokens": 48,
                        "out": str(tmp_path / "run")})
    metrics = run_eval(cfg, progress=False)
    demos = metrics["prompt"]["demonstrations"]
    assert len(demos) == 2 and all(d.startswith("train/") for d in demos) and metrics["n"] == 8


def test_training_with_fixed_shots_shares_the_demonstrations_in_each_batch_prefix(tiny, imdb_dir, one_torch_thread):
    from peftlab.config import MethodConfig, TrainConfig
    from peftlab.distributed import SINGLE
    from peftlab.models import attach_method
    from peftlab.train.loop import batch_loss, training_prefix

    model, tok = tiny
    splits = load_splits(DataConfig(source=str(imdb_dir)))
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=48, shots=2), CLASSES, True, splits.train)
    lora = attach_method(model, MethodConfig(method="lora", lora_dropout=0.0), seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    encoded = enc.encode(splits.train[:6], tok)
    rows = build_rows(encoded, enc.label_ids, gold_only=True)
    prefix_ids = training_prefix(lora, rows, 0, TrainConfig(), SINGLE)
    assert prefix_ids == enc.prefix_ids  # demonstrations and instruction: one pass per batch
    gold = torch.tensor([e.label for e in encoded])
    shared = batch_loss(lora, rows, gold, 2, tok.pad_token_id, 0, "lm", prefix_ids=prefix_ids)
    plain = batch_loss(lora, rows, gold, 2, tok.pad_token_id, 0, "lm", prefix_ids=None)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "per-example"])
def test_k_shot_ids_are_the_tokenisation_of_the_prompt_text(imdb_dir, mode):
    """The blank line after each demonstration is tokenised as it stands before the next template. A tokenizer
    with one token for a lone "\\n\\n" (SmolLM2's) split it differently mid-text, so peftlab's k-shot ids were not
    the tokenisation of their own text, which lm-evaluation-harness scores (bench/kshot_bench.py)."""
    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(extra_corpus=("the end\n\n",) * 5)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(ids("\n\n")) == 1 and len(ids("\n\nBelow")) > 1 + len(ids("Below"))  # the case this test is about
    splits = load_splits(DataConfig(source=str(imdb_dir)))
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=512, shots=3, shots_mode=mode), CLASSES, True,
                               splits.train, data_seed=0)
    for e in enc.encode(splits.test[:4], tok):
        assert ids(tok.decode(e.prompt_ids)) == e.prompt_ids
