"""The validation split and the selection protocols: which examples choose the epoch, and how often the
test subset is looked at."""

import json

import pytest

import peftlab.runs as runs
from peftlab.config import DataConfig, build_config
from peftlab.data import load_splits, select_splits
from peftlab.data.examples import Example, LabelledSplits
from peftlab.errors import PeftlabError
from peftlab.runs import run_train
from peftlab.train.selection import selected_on_val

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pool(per_class: int) -> LabelledSplits:
    train = [Example(f"train/{label}/{i}", f"text {i}", label) for label in ("neg", "pos") for i in range(per_class)]
    test = [Example(f"test/{label}/{i}", f"text {i}", label) for label in ("neg", "pos") for i in range(10)]
    return LabelledSplits(train=train, test=test, classes=["neg", "pos"])


@pytest.mark.parametrize("n_val", [20, 40, 100])
def test_validation_never_shares_an_example_with_any_training_sample_and_is_nested(n_val):
    splits = pool(150)
    grid = [10, 50, 100, 150 * 2 - n_val, None]  # up to every training example the validation split leaves
    vals = set()
    for n_train in grid:
        samples = select_splits(splits, n_train, 4, data_seed=7, n_val=n_val)
        val_ids, train_ids = {e.id for e in samples.val}, {e.id for e in samples.train}
        assert len(val_ids) == n_val and not val_ids & train_ids, n_train
        assert sum(e.label == "pos" for e in samples.val) == n_val // 2  # balanced
        vals.add(frozenset(val_ids))
    assert len(vals) == 1  # the same validation split for every N
    # Nested: a smaller validation split is part of a larger one; training samples do not move with it.
    small = select_splits(splits, 50, 4, 7, n_val=n_val // 2)
    assert {e.id for e in small.val} <= vals.pop()
    assert [e.id for e in small.train] == [e.id for e in select_splits(splits, 50, 4, 7, n_val=0).train]
    # 'all' trains on everything the validation split leaves.
    everything = select_splits(splits, None, 4, 7, n_val=n_val)
    assert len(everything.train) == 300 - n_val


def test_a_validation_split_larger_than_what_n_leaves_is_refused():
    with pytest.raises(PeftlabError, match="after the 20 validation examples of each class.*lower --n-val"):
        select_splits(pool(50), 80, 4, 0, n_val=40)
    with pytest.raises(PeftlabError, match="training split has only 50; lower --n-val"):
        select_splits(pool(50), 10, 4, 0, n_val=100)


def test_select_on_val_needs_a_validation_split():
    with pytest.raises(PeftlabError, match="select_on=val needs a validation split: give --n-val"):
        build_config({"train.select_on": "val"})
    assert build_config({}).train.select_on == "last"  # never the test subset by default
    assert build_config({"data.n_val": 20}).train.select_on == "val"


def test_val_data_file_is_read_and_kept_apart(tmp_path):
    rows = lambda prefix, n: "".join(json.dumps({"text": f"{prefix} {i}", "label": ["a", "b"][i % 2], "id": f"{prefix}{i}"})
                                     + "\n" for i in range(n))
    (tmp_path / "train.jsonl").write_text(rows("t", 20))
    (tmp_path / "val.jsonl").write_text(rows("v", 8))
    (tmp_path / "test.jsonl").write_text(rows("x", 6))
    config = DataConfig(source=str(tmp_path / "train.jsonl"), test_source=str(tmp_path / "test.jsonl"),
                        val_source=str(tmp_path / "val.jsonl"), id_column="id", n_val=None, n_train=10, n_test=6)
    samples = select_splits(load_splits(config), 10, 6, 0, n_val=None)
    assert sorted(e.id for e in samples.val) == sorted(f"v{i}" for i in range(8))
    (tmp_path / "val.jsonl").write_text(rows("t", 4))  # the training file's ids again
    with pytest.raises(PeftlabError, match="in both the train and the val split"):
        load_splits(config)


def counting_evaluations(monkeypatch):
    real, calls = runs.evaluate_examples, []

    def counted(model, tokenizer, encoder, examples, *args, **kwargs):
        calls.append((kwargs["desc"], frozenset(e.id for e in examples)))
        return real(model, tokenizer, encoder, examples, *args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_examples", counted)
    return calls


def config_of(tiny_model_dir, imdb_dir, out, **extra):
    values = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
              "data.n_train": 12, "data.n_val": 8, "data.n_test": 10, "prompt.max_input_tokens": 32,
              "train.epochs": 3, "train.batch_size": 4, "train.lr": 2e-2, "train.loss": "classes",
              "method.lora_dropout": 0.0, "out": str(out)}
    values.update(extra)
    return build_config(values)


def test_select_on_val_scores_the_test_subset_exactly_once_with_the_chosen_adapter(tiny_model_dir, imdb_dir, tmp_path,
                                                                                   monkeypatch):
    calls = counting_evaluations(monkeypatch)
    metrics = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "val"))
    test_ids = {json.loads(line)["id"] for line in (tmp_path / "val" / "predictions.jsonl").read_text().splitlines()}
    test_calls = [c for c in calls if c[1] & test_ids]
    assert len(test_calls) == 1 and test_calls[0][1] == test_ids  # once, whole, after training
    assert [c[0] for c in calls] == ["val epoch 1", "val epoch 2", "val epoch 3", "test"]
    assert metrics["selected_on"] == "val" and metrics["test_evaluations"] == 1 and metrics["n_val"] == 8
    val_accuracy = [e["val_accuracy"] for e in metrics["per_epoch"]]
    assert metrics["best_epoch"] == max(range(1, 4), key=lambda k: (val_accuracy[k - 1], -k))
    assert all("accuracy" not in e for e in metrics["per_epoch"])  # no per-epoch look at the test subset
    # The test figures are those of the chosen adapter: evaluating the saved adapter alone gives them again.
    again = runs.run_eval(build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32",
                                        "data.source": str(imdb_dir), "data.n_test": 10, "prompt.max_input_tokens": 32,
                                        "adapter": str(tmp_path / "val" / "adapter"), "out": str(tmp_path / "eval")}))
    assert again["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "eval" / "predictions.jsonl").read_text() == (tmp_path / "val" / "predictions.jsonl").read_text()


def test_select_on_test_with_a_validation_split_gives_both_protocols_from_one_run(tiny_model_dir, imdb_dir, tmp_path,
                                                                                  monkeypatch):
    calls = counting_evaluations(monkeypatch)
    metrics = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "study", **{"train.select_on": "test"}))
    assert metrics["test_evaluations"] == 3 and len([c for c in calls if c[0].startswith("test")]) == 3
    per_epoch = metrics["per_epoch"]
    assert metrics["accuracy"] == max(e["accuracy"] for e in per_epoch)  # the study's optimistic figure
    on_val = metrics["selected_on_val"]
    k = max(range(1, 4), key=lambda e: (per_epoch[e - 1]["val_accuracy"], -e))
    assert on_val["epoch"] == k and on_val["accuracy"] == per_epoch[k - 1]["accuracy"]


def test_score_test_false_never_looks_at_the_test_subset(tiny_model_dir, imdb_dir, tmp_path, monkeypatch):
    calls = counting_evaluations(monkeypatch)
    seen = []
    metrics = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "trial", **{"train.score_test": False}),
                        on_epoch=lambda epoch, record: seen.append((epoch, record["val"]["accuracy"], record["test"])))
    assert [c[0] for c in calls] == ["val epoch 1", "val epoch 2", "val epoch 3"]
    assert metrics["evaluated_on"] == "val" and metrics["test_evaluations"] == 0
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[2] is None for s in seen)
    assert metrics["accuracy"] == max(s[1] for s in seen)


def test_an_exception_in_on_epoch_ends_the_run_and_leaves_the_base_model_clean(tiny_model_dir, imdb_dir, tmp_path):
    from peftlab.models import load_base_model

    model, tokenizer = load_base_model(build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32"}).model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Pruned(Exception):
        pass

    def prune(epoch, record):
        raise Pruned

    with pytest.raises(Pruned):
        run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "pruned"), model, tokenizer, on_epoch=prune)
    after = model.state_dict()
    assert set(after) == set(before) and all((after[k] == before[k]).all() for k in before)


def test_selected_on_val_by_hand():
    history = [{"epoch": 1, "val_accuracy": 0.7, "accuracy": 0.80, "ci95": [0.7, 0.9]},
               {"epoch": 2, "val_accuracy": 0.9, "accuracy": 0.75, "ci95": [0.6, 0.8]},
               {"epoch": 3, "val_accuracy": 0.9, "accuracy": 0.85, "ci95": [0.8, 0.9]}]
    assert selected_on_val(history) == {"epoch": 2, "accuracy": 0.75, "ci95": [0.6, 0.8], "val_accuracy": 0.9}
    assert selected_on_val([{"epoch": 1, "val_accuracy": 0.7, "accuracy": None}]) is None


def test_a_run_prints_its_plan_then_one_line_per_epoch(tiny_model_dir, imdb_dir, tmp_path, capsys):
    from peftlab.experiments.estimate import _tokens

    metrics = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "plan"), progress=True)
    err = capsys.readouterr().err
    plan = next(line for line in err.splitlines() if line.startswith("plan: "))
    # The plan's token count is computed before training; the loop counts what it really trained on.
    assert f"{_tokens(metrics['train_tokens'])} training" in plan and "12 training examples x 3 epochs" in plan
    for e in metrics["per_epoch"]:
        line = f"epoch {e['epoch']}/3: train loss {e['train_loss']:.4f}"
        assert line in err and f"val accuracy {e['val_accuracy']:.2%}" in err.split(line)[1].split("\n")[0]


def test_the_plan_says_whether_the_test_subset_is_scored(tiny_model_dir, imdb_dir, tmp_path, capsys):
    def plan(name, **extra):
        run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / name, **extra), progress=True)
        return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("plan: "))

    assert "8 validation, 10 test (epoch chosen: val)" in plan("scored")
    # A tune trial or a learning-rate search cell never looks at the test subset: the plan must not claim it.
    assert "8 validation, test not scored (10 drawn) (epoch chosen: val)" in plan("trial", **{"train.score_test": False})


@pytest.mark.parametrize("method", [{"method.lora_dropout": 0.1},
                                    {"method.lora_dropout": 0.1, "train.objective": "head"},
                                    {"method.lora_dropout": 0.1, "train.objective": "head", "model.dtype": "bf16"},
                                    {"method.method": "prompt-tuning", "method.virtual_tokens": 4}],
                         ids=["lora", "head", "head-bf16", "prompt-tuning"])
def test_printing_the_plan_changes_nothing_the_run_computes(tiny_model_dir, imdb_dir, tmp_path, method, capsys):
    # The plan times a forward and a backward pass of the model itself (estimate.probe_speeds): that must
    # leave no gradient, no dropout draw and no mode change behind, with an adapter, a head or virtual tokens.
    quiet = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "quiet", **method), progress=False)
    shown = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / "shown", **method), progress=True)
    assert "tok/s training" in capsys.readouterr().err  # the probe ran (a failing one leaves the time out)
    assert shown["adapter_sha256"] == quiet["adapter_sha256"]
    assert [e["train_loss"] for e in shown["per_epoch"]] == [e["train_loss"] for e in quiet["per_epoch"]]


@pytest.mark.parametrize("select_on", ["val", "test"])
def test_the_records_scoring_seconds_are_every_scoring_pass_the_run_made(tiny_model_dir, imdb_dir, tmp_path,
                                                                         monkeypatch, select_on):
    """timings.eval_s is what `how long each grid took` adds up: chosen on validation, the test pass after
    training is part of it (records before final_test_s left it out: the method comparison's prefix tuning
    counted 720 of its 3,841 scoring seconds)."""
    real, seconds = runs.evaluate_examples, []

    def timed(*args, **kwargs):
        out = real(*args, **kwargs)
        seconds.append((kwargs["desc"], out[2].seconds))  # the pass's own timer, as the record reads it
        return out

    monkeypatch.setattr(runs, "evaluate_examples", timed)
    metrics = run_train(config_of(tiny_model_dir, imdb_dir, tmp_path / select_on, **{"train.select_on": select_on}))
    timings = metrics["timings"]
    assert timings["eval_s"] == pytest.approx(sum(s for _, s in seconds), rel=1e-9)
    final = [s for desc, s in seconds if desc == "test"]
    assert timings["final_test_s"] == (pytest.approx(final[0], rel=1e-9) if select_on == "val" else 0.0)
    assert len(final) == (select_on == "val")
