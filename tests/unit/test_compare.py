"""`peftlab compare`: two runs on the same examples, example by example, against hand-counted figures."""

from __future__ import annotations

import json

import pytest

from peftlab.cli import main


def run_folder(path, correct: list[bool], ids: list[str] | None = None):
    """A run folder as a finished run leaves it, reduced to what compare reads: predictions.jsonl."""
    path.mkdir(parents=True)
    ids = ids or [f"test/r{i}" for i in range(len(correct))]
    lines = [json.dumps({"id": i, "label": "positive", "pred": "positive" if ok else "negative", "correct": ok,
                         "scores": {"negative": -1.0, "positive": -0.5}}) for i, ok in zip(ids, correct)]
    (path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def two_runs(tmp_path):
    # 40 examples: both right on 20, both wrong on 8, only A right on 10, only B right on 2.
    a = [True] * 20 + [False] * 8 + [True] * 10 + [False] * 2
    b = [True] * 20 + [False] * 8 + [False] * 10 + [True] * 2
    return run_folder(tmp_path / "a", a), run_folder(tmp_path / "b", b)


def test_compare_counts_the_discordant_examples_and_tests_them(two_runs, capsys):
    a, b = two_runs
    assert main(["compare", str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n"], result["only_a_correct"], result["only_b_correct"]) == (40, 10, 2)
    assert (result["accuracy_a"], result["accuracy_b"]) == (30 / 40, 22 / 40)
    assert result["difference"] == pytest.approx(-8 / 40)
    # Exact two-sided McNemar by hand: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert result["mcnemar_p"] == pytest.approx(158 / 4096)
    # Wilson interval of 30/40 by hand (z = 1.96): centre (0.75 + 1.96²/80) / (1 + 1.96²/40).
    z = 1.959964
    centre = (0.75 + z * z / 80) / (1 + z * z / 40)
    half = z * (0.75 * 0.25 / 40 + z * z / 6400) ** 0.5 / (1 + z * z / 40)
    assert result["ci95_a"] == pytest.approx([centre - half, centre + half])


def test_compare_says_it_in_two_lines(two_runs, capsys):
    a, b = two_runs
    assert main(["compare", str(a), str(b)]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == f"A {a}: 75.00 % (59.8-85.8); B {b}: 55.00 % (39.8-69.3); the same 40 examples"
    assert second == ("B - A: -20.00 points; 2 examples only B gets right, 10 only A; McNemar exact p = 0.0386 "
                      "(supported at the 5 % level)")


def test_runs_that_never_disagree_are_not_told_apart(tmp_path, capsys):
    same = [True, False] * 10
    a, b = run_folder(tmp_path / "a", same), run_folder(tmp_path / "b", same)
    assert main(["compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mcnemar_p"] == 1.0


@pytest.mark.parametrize("case", ["other-examples", "no-predictions", "damaged"])
def test_compare_refuses_what_it_cannot_pair(tmp_path, capsys, case):
    a = run_folder(tmp_path / "a", [True] * 10)
    if case == "other-examples":
        b = run_folder(tmp_path / "b", [True] * 10, ids=[f"test/other{i}" for i in range(10)])
        expected = ("the two runs were not scored on the same examples (10 and 10, 0 in common); a paired test "
                    "needs one test subset: the same data, data.n_test and data.data_seed")
    elif case == "no-predictions":
        b = tmp_path / "b"
        b.mkdir()
        expected = f"{b} has no predictions.jsonl: give the --out folder of a finished train or eval run"
    else:
        b = run_folder(tmp_path / "b", [True] * 10)
        (b / "predictions.jsonl").write_text('{"id": "test/r0", "correct": true}\n{"id": "test/r1"\n')
        expected = (f"{b / 'predictions.jsonl'} line 2 is not a prediction (JSON with 'id' and 'correct'); the file "
                    "is damaged: rerun the run (`peftlab rerun`)")
    assert main(["compare", str(a), str(b)]) == 2
    assert capsys.readouterr().err.strip() == f"peftlab: error: {expected}"


def test_the_record_bits_pair_runs_as_their_prediction_files_do(two_runs, tmp_path):
    """correct_bits by hand, and the pairing of two metrics records equal to compare on the two folders."""
    from peftlab.evaluate.paired import compare_runs, correct_bits, paired_records

    # ids sorted: a (wrong), b (right), c (right), d (wrong) -> 0110 0000 -> "60".
    bits = correct_bits([{"id": "b", "correct": True}, {"id": "d", "correct": False},
                         {"id": "a", "correct": False}, {"id": "c", "correct": True}])
    assert (bits["n"], bits["bits"]) == (4, "60")
    records = []
    for folder in two_runs:
        lines = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        records.append({"correct_bits": correct_bits(lines[::-1])})  # any order of the lines: sorted by id
    paired = paired_records(*records)
    folders = compare_runs(*two_runs)
    assert {k: paired[k] for k in paired} == {k: folders[k] for k in paired}
    assert (paired["only_a_correct"], paired["only_b_correct"]) == (10, 2)
    # Other examples, or a record from before the bits: nothing to pair.
    other = run_folder(tmp_path / "other", [True] * 40, ids=[f"test/s{i}" for i in range(40)])
    other_bits = correct_bits([json.loads(x) for x in (other / "predictions.jsonl").read_text().splitlines()])
    assert paired_records(records[0], {"correct_bits": other_bits}) is None
    assert paired_records(records[0], {"accuracy": 0.5}) is None


def test_a_stored_cell_compares_as_its_run_folder_did(two_runs, tmp_path, capsys):
    """STORE.sqlite:KEY pairs a cell by the correct_bits of its record (its folder may be gone): the same
    hand-counted figures as the two folders, in any mix of folders and cells."""
    from peftlab.evaluate.paired import correct_bits
    from peftlab.experiments.store import ResultsStore

    a, b = two_runs
    store = tmp_path / "cells.sqlite"
    with ResultsStore(store, writer=True) as writer:
        for key, folder in (("aaaaaaaaaaaa", a), ("bbbbbbbbbbbb", b)):
            lines = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
            writer.start(key, {}, None)
            writer.finish(key, {"accuracy": 0.0, "correct_bits": correct_bits(lines)})
        writer.start("cccccccccccc", {}, None)  # cut off: running
        writer.start("dddddddddddd", {}, None)
        writer.finish("dddddddddddd", {"accuracy": 0.5})  # a record from before the bits
    folders = None
    for run_a, run_b in ((a, b), (f"{store}:aaaaaaaaaaaa", f"{store}:bbbbbbbbbbbb"), (f"{store}:aaaaaaaaaaaa", b),
                         (a, f"{store}:bbbbbbbbbbbb")):
        assert main(["compare", str(run_a), str(run_b), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["a"], result["b"]) == (str(run_a), str(run_b))
        figures = {k: v for k, v in result.items() if k not in ("a", "b")}
        folders = folders or figures
        assert figures == folders
    assert (folders["only_a_correct"], folders["only_b_correct"], folders["n"]) == (10, 2, 40)
    other = run_folder(tmp_path / "other", [True] * 40, ids=[f"test/s{i}" for i in range(40)])
    for spec, expected in (
            (f"{store}:eeeeeeeeeeee", f"{store} holds no cell eeeeeeeeeeee; the keys are in the report's "
                                      f"tables/cells.csv (`peftlab report {store}`)"),
            (f"{store}:cccccccccccc", f"cell cccccccccccc of {store} is running, not finished: there is nothing "
                                      "to compare yet"),
            (f"{store}:dddddddddddd", f"cell dddddddddddd of {store} has no correct_bits (a record from before "
                                      "71f43a8); compare its run folder instead"),
            (str(other), "the two runs were not scored on the same examples (40 and 40, other ids); a paired test "
                         "needs one test subset: the same data, data.n_test and data.data_seed")):
        assert main(["compare", f"{store}:aaaaaaaaaaaa", spec]) == 2
        assert capsys.readouterr().err.strip() == f"peftlab: error: {expected}"
