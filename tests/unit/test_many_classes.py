"""k classes on aclImdb star ratings: labels from the file names, balanced samples, metrics and the report."""

import json
import re

import pytest

from peftlab.config import DataConfig, build_config
from peftlab.data import load_splits, select_splits
from peftlab.errors import PeftlabError

HAND_RATING_4 = {1: "terrible", 2: "terrible", 3: "poor", 4: "poor", 7: "good", 8: "good", 9: "excellent",
                 10: "excellent"}


@pytest.fixture(scope="module")
def rated_dir(tmp_path_factory):
    """aclImdb with every rating 3 times per split; words of the review match its class half."""
    import random

    from tests.conftest import review

    rng = random.Random(3)
    root = tmp_path_factory.mktemp("rated") / "aclImdb"
    for split in ("train", "test"):
        i = 0
        for rating in (1, 2, 3, 4, 7, 8, 9, 10):
            folder = root / split / ("pos" if rating >= 7 else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                (folder / f"{i}_{rating}.txt").write_text(review(rng, rating >= 7), encoding="utf-8")
                i += 1
    return root


def stars(example_id: str) -> int:
    return int(re.search(r"_(\d+)$", example_id).group(1))


@pytest.mark.parametrize("scheme", ["rating-4", "rating"])
def test_classes_come_from_the_stars_in_the_file_names(rated_dir, scheme):
    splits = load_splits(DataConfig(source=str(rated_dir), labels=scheme))
    expected = ["terrible", "poor", "good", "excellent"] if scheme == "rating-4" else \
        ["1", "2", "3", "4", "7", "8", "9", "10"]
    assert splits.classes == expected
    for ex in splits.train + splits.test:
        assert ex.label == (HAND_RATING_4[stars(ex.id)] if scheme == "rating-4" else str(stars(ex.id)))
    samples = select_splits(splits, len(expected), 2 * len(expected), 0)
    train, test = samples.train, samples.test
    assert sorted(ex.label for ex in test) == sorted(expected * 2)  # balanced over k classes
    assert sorted(ex.label for ex in train) == sorted(expected)


def test_a_rating_scheme_on_data_without_ratings_is_refused(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(PeftlabError, match="data.labels=rating-4 needs the star ratings of aclImdb file names"):
        load_splits(DataConfig(source=str(table), labels="rating-4"))
    with pytest.raises(PeftlabError, match="data.labels='stars' is not one of sentiment, rating-4, rating"):
        DataConfig(labels="stars")


def test_label_words_that_collide_among_four_classes_are_one_clear_error(tiny):
    from peftlab.config import PromptConfig
    from peftlab.prompts import build_prompt_encoder

    _, tok = tiny
    words = {"terrible": "terrible", "poor": "bad", "good": "good", "excellent": "good"}
    config = PromptConfig(label_words=words)
    with pytest.raises(PeftlabError, match="label words 'good' and 'good' tokenise to the same ids"):
        build_prompt_encoder(tok, config, list(words), True)


def test_a_four_class_run_reports_macro_f1_and_a_confusion_matrix_as_computed_by_hand(
        tiny_model_dir, rated_dir, tmp_path, one_torch_thread):
    from peftlab.runs import run_eval

    cfg = build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(rated_dir),
                        "data.labels": "rating-4", "data.n_train": 0, "data.n_test": 24,
                        "prompt.max_input_tokens": 40, "out": str(tmp_path / "run")})
    metrics = run_eval(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    classes = ["terrible", "poor", "good", "excellent"]
    assert len(lines) == 24 and sorted(line["label"] for line in lines) == sorted(classes * 6)
    assert all(line["label"] == HAND_RATING_4[stars(line["id"])] for line in lines)
    matrix = [[sum(1 for x in lines if x["label"] == g and x["pred"] == p) for p in classes] for g in classes]
    assert metrics["confusion"] == {"labels": classes, "matrix": matrix}
    f1 = []
    for c in classes:
        tp = sum(1 for x in lines if x["label"] == c and x["pred"] == c)
        predicted, support = sum(1 for x in lines if x["pred"] == c), 6
        p, r = (tp / predicted if predicted else 0.0), tp / support
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 4)


def test_the_report_shows_the_best_cells_confusion_matrix_and_how_it_was_scored(tmp_path):
    from peftlab.experiments.store import ResultsStore
    from peftlab.report import write_report
    from tests.unit.test_report import add_sweep, record

    matrix = [[5, 1, 0, 0], [2, 3, 1, 0], [0, 1, 4, 1], [0, 0, 2, 4]]
    classes = ["terrible", "poor", "good", "excellent"]
    cells = []
    for n, acc in ((40, 0.5), (80, 16 / 24)):
        r = record(acc, n, 0.1)
        r["config"]["eval"] = {"score_norm": "byte", "calibration": "content-free"}
        r["confusion"] = {"labels": classes, "matrix": matrix if n == 80 else [[6, 0, 0, 0]] * 4}
        r["macro_f1"] = 0.66
        cells.append(({"data.n_train": n}, r))
    with ResultsStore(tmp_path / "s.sqlite", writer=True) as store:
        add_sweep(store, "rating4-lora", {"data.n_train": [40, 80]}, cells)
    write_report(tmp_path / "s.sqlite", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Scored with score_norm=byte, calibration=content-free, shots=0." in text
    assert "| poor | 2 | 3 | 1 | 0 |" in text and "N=80" in text  # the best cell's matrix, not the other one
    assert (tmp_path / "report" / "plots" / "rating4-lora-confusion.png").stat().st_size > 1000
    assert "Confusion matrix of the best cell" in (tmp_path / "report" / "report.html").read_text()


def test_predict_with_a_rating_4_adapter_answers_in_its_classes_as_the_run_did(tiny_model_dir, rated_dir, tmp_path,
                                                                             one_torch_thread, capsys):
    from peftlab.cli import main
    from peftlab.runs import run_train

    cfg = build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(rated_dir),
                        "data.labels": "rating-4", "data.n_train": 8, "data.n_test": 8, "train.epochs": 1,
                        "train.batch_size": 4, "prompt.max_input_tokens": 40, "eval.score_norm": "token",
                        "eval.calibration": "content-free",
                        "out": str(tmp_path / "run")})
    run_train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    test = {e.id: e.text for e in load_splits(DataConfig(source=str(rated_dir))).test}
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "run" / "adapter"), "--dtype", "fp32",
                 *[test[x["id"]] for x in lines]]) == 0
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [a["pred"] for a in answers] == [x["pred"] for x in lines]
    assert {c for a in answers for c in a["scores"]} == {"terrible", "poor", "good", "excellent"}
