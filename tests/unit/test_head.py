"""train.objective=head (issue 13, item 3): a `score` head on the last prompt token, trained with the adapter,
saved in peft's SEQ_CLS format, reloaded by plain transformers + peft with the same predictions."""

import json

import pytest
import torch
from safetensors.torch import load_file

from peftlab.config import MethodConfig, PromptConfig, build_config
from peftlab.evaluate.scoring import build_rows, example_scores, read_ids, score_examples
from peftlab.models import attach_method, position_offset
from peftlab.models.head import HeadSpec, class_head
from peftlab.prompts import build_prompt_encoder
from peftlab.runs import run_train
from tests.tiny_models import save_model
from tests.unit.test_scoring import CLASSES, examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    # LLaMA with a BOS, and GPT-2 (learned absolute positions, pad = EOS, head on `transformer`) without.
    return {arch: save_model(tmp_path_factory.mktemp(arch), arch, bos) for arch, bos in
            (("llama", True), ("gpt2", False), ("gemma3", True))}


def load(folder):
    from peftlab.config import ModelConfig
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name=str(folder), dtype="fp32", device="cpu"))


def train_layer(model_dir, imdb_dir, out, **extra):
    values = {"model.name": str(model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
              "data.n_train": 8, "data.n_test": 8, "prompt.max_input_tokens": 32, "train.epochs": 1,
              "train.batch_size": 4, "train.lr": 5e-2, "train.objective": "head", "method.virtual_tokens": 4,
              "method.lora_dropout": 0.0, "out": str(out)}
    values.update(extra)
    return values


def plain_classifier(model_dir, adapter):
    """What a user without peftlab writes (README, "A classification head")."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    head = json.loads((adapter / "peftlab.json").read_text())["head"]
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=head["num_labels"], id2label={int(k): v for k, v in head["id2label"].items()},
        label2id=head["label2id"], pad_token_id=head["pad_token_id"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval(), head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_a_head_adapter_reloads_in_plain_transformers_and_peft_with_the_same_predictions(
        model_dirs, imdb_dir, tmp_path, arch, method):
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig
    from peftlab.data import load_splits

    folder = model_dirs[arch]
    run_train(build_config(train_layer(folder, imdb_dir, tmp_path / "run", **{"method.method": method})))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    weights = load_file(adapter / "adapter_model.safetensors")
    [head_key] = [k for k in weights if k.endswith("score.weight")]
    assert weights[head_key].shape[0] == 2  # the head is in the adapter file (peft #310, #577, #876, #1070)

    model, head = plain_classifier(folder, adapter)
    assert head["id2label"] == {"0": "negative", "1": "positive"}
    torch.testing.assert_close(model.get_base_model().score.weight, weights[head_key])  # loaded, not re-initialised
    tok = AutoTokenizer.from_pretrained(folder)
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=32), CLASSES, True)
    test = {e.id: e for e in load_splits(DataConfig(source=str(imdb_dir))).test}
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    prompts = [enc.encode([test[line["id"]]], tok)[0].prompt_ids for line in lines]
    with torch.no_grad():
        if method == "lora":  # one right-padded batch: transformers pools at the last non-pad token
            width = max(len(p) for p in prompts)
            ids = torch.tensor([p + [head["pad_token_id"]] * (width - len(p)) for p in prompts])
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:  # prompt learning feeds embeddings, where transformers cannot see padding: one text at a time
            logits = torch.cat([model(input_ids=torch.tensor([p])).logits for p in prompts])
    plain = torch.log_softmax(logits.float(), dim=-1)
    ours = torch.tensor([[line["scores"][c] for c in CLASSES] for line in lines])
    torch.testing.assert_close(plain, ours, atol=1e-4, rtol=1e-4)
    assert [CLASSES[i] for i in plain.argmax(-1).tolist()] == [line["pred"] for line in lines]
    assert len({round(float(s[0]), 3) for s in ours}) > 1  # the scores depend on the text, not a constant head


def head_model(folder, method):
    """A head model with every trainable weight (adapter and head) made to matter."""
    model, tok = load(folder)
    model = attach_method(model, MethodConfig(method=method, lora_dropout=0.0, virtual_tokens=4, prompt_init="vocab"),
                          seed=0, head=HeadSpec(CLASSES, tok.pad_token_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model, tok


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_head_scores_do_not_depend_on_padding_or_the_shared_prefix(model_dirs, arch, method):
    model, tok = head_model(model_dirs[arch], method)
    assert class_head(model) is not None
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=64), CLASSES, True)
    encoded = enc.encode(examples(), tok)
    rows = build_rows(encoded, read_ids(model, enc.label_ids))
    assert all(len(r) == 1 and r[0].positions == [len(e.prompt_ids) - 1] for r, e in zip(rows, encoded))
    offset = position_offset(model)
    shared = score_examples(model, rows, 2, tok.pad_token_id, offset, max_examples=4, progress=False).scores
    unshared = score_examples(model, rows, 2, tok.pad_token_id, offset, max_examples=4, progress=False,
                              share_prefix=False).scores
    with torch.no_grad():
        for i, ex in enumerate(encoded):
            alone = example_scores(model, [rows[i]], 2, tok.pad_token_id, offset)[0]
            # Reference: the plain sequence-classification forward of one unpadded example (its pooled logits).
            plain = torch.log_softmax(model(input_ids=torch.tensor([ex.prompt_ids])).logits[0].float(), -1)
            torch.testing.assert_close(alone, plain, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(unshared[i], plain, rtol=1e-4, atol=1e-4)  # in a padded batch
            torch.testing.assert_close(shared[i], plain, rtol=1e-4, atol=1e-4)    # behind the prefix cache
    assert torch.exp(shared).sum(-1).sub(1).abs().max() < 1e-5  # class scores are a log-softmax over the classes


def test_a_head_learns_the_tiny_task_and_its_loss_falls(tiny_model_dir, imdb_dir, tmp_path):
    metrics = run_train(build_config(train_layer(
        tiny_model_dir, imdb_dir, tmp_path, **{"data.n_train": 24, "data.n_test": 24, "prompt.max_input_tokens": 48,
                                               "train.epochs": 6, "train.lr": 2e-2, "train.select_on": "test"})))
    losses = [e["train_loss"] for e in metrics["per_epoch"]]
    assert metrics["config"]["train"]["loss"] == "classes"
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["accuracy"] >= 0.75, metrics["per_epoch"]  # random is 0.5; the task is separable by word


def test_the_saved_head_is_the_chosen_epochs_not_the_last(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    from peftlab.train.selection import BestEpoch

    snapshots, real = {}, BestEpoch.consider

    def first_epoch_wins(self, epoch, record, params, predictions=None):
        snapshots[epoch] = {k: p.detach().clone() for k, p in params.items() if "score" in k}
        record = {split: dict(m, accuracy=1.0 / epoch) for split, m in record.items()}  # epoch 1 is best
        return real(self, epoch, record, params, predictions)

    monkeypatch.setattr(BestEpoch, "consider", first_epoch_wins)
    metrics = run_train(build_config(train_layer(tiny_model_dir, imdb_dir, tmp_path, **{
        "train.epochs": 3, "data.n_val": 4, "train.select_on": "val"})))
    assert metrics["best_epoch"] == 1
    [name] = snapshots[1]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert torch.equal(saved, snapshots[1][name])
    assert not torch.equal(saved, snapshots[3][name])  # the head trained on: the last epoch's would differ
    assert json.loads((tmp_path / "adapter" / "peftlab.json").read_text())["epoch"] == 1


def test_a_killed_head_run_resumes_to_the_unbroken_result(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    from tests.unit.test_checkpoint import Killed, kill_at_batch, outcome

    layer = train_layer(tiny_model_dir, imdb_dir, tmp_path / "unbroken", **{
        "train.epochs": 2, "train.batch_size": 2, "train.checkpoint_every": 3, "train.select_on": "test"})
    run_train(build_config(layer))
    layer["out"] = str(tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at_batch(m, 6)  # epoch 2 (4 batches an epoch), after the checkpoint of step 3
        with pytest.raises(Killed):
            run_train(build_config(layer))
    tensors = next((tmp_path / "run" / "checkpoint").glob("tensors-*.safetensors"))
    assert any("score" in k for k in load_file(tensors))  # the head is part of the checkpoint
    metrics = run_train(build_config(layer, {"train.resume": True}))
    assert metrics["resumed_from"] is not None
    assert outcome(tmp_path / "run") == outcome(tmp_path / "unbroken")


def test_eval_and_predict_with_a_head_adapter_give_the_training_runs_scores(tiny_model_dir, imdb_dir, tmp_path,
                                                                           capsys):
    from peftlab.cli import main

    run_train(build_config(train_layer(tiny_model_dir, imdb_dir, tmp_path / "run")))
    adapter = tmp_path / "run" / "adapter"
    trained = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert main(["eval", "--adapter", str(adapter), "--data", str(imdb_dir), "--n-test", "8", "--dtype", "fp32",
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    evaluated = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    by_id = {line["id"]: line["scores"] for line in evaluated}
    for line in trained:
        assert by_id[line["id"]] == pytest.approx(line["scores"], abs=1e-5)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["config"]["train"]["objective"] == "head"
    capsys.readouterr()
    assert main(["predict", "--adapter", str(adapter), "--dtype", "fp32", "A great wonderful film.",
                 "Dull boring awful."]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [sorted(r["scores"]) for r in rows] == [CLASSES, CLASSES]
    assert all(abs(sum(torch.tensor(list(r["scores"].values())).exp().tolist()) - 1) < 1e-4 for r in rows)


def test_export_of_a_head_adapter_is_a_plain_sequence_classifier_with_the_same_scores(tiny_model_dir, imdb_dir,
                                                                                     tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.config import DataConfig
    from peftlab.data import load_splits
    from peftlab.models.export import export_merged

    run_train(build_config(train_layer(tiny_model_dir, imdb_dir, tmp_path / "run")))
    out = export_merged(tmp_path / "run" / "adapter", tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=32), CLASSES, True)
    test = {e.id: e for e in load_splits(DataConfig(source=str(imdb_dir))).test}
    with torch.no_grad():
        for line in [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]:
            ids = enc.encode([test[line["id"]]], tok)[0].prompt_ids
            merged = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            torch.testing.assert_close(merged, torch.tensor([line["scores"][c] for c in CLASSES]), atol=1e-4, rtol=1e-4)
