"""Reports from a results store: the study's table shape, seeds, significance marks, files written."""

import csv
import re

import pytest

from peftlab.cli import main
from peftlab.evaluate.metrics import wilson_interval
from peftlab.experiments.store import ResultsStore
from peftlab.report import write_report
from peftlab.report.tables import MARK_LEFT, MARK_UP, build_tables, table_grid

N_TEST = 2000


def record(accuracy: float, n_train: int, dropout: float, seed: int = 0, best_epoch: int | None = 2,
           model: str = "smollm2") -> dict:
    """A metrics record as run_train writes it, with the fields the report reads."""
    correct = round(accuracy * N_TEST)
    config = {"model": {"name": model}, "data": {"n_train": n_train, "n_test": N_TEST},
              "method": {"method": "lora", "lora_dropout": dropout}, "train": {"seed": seed, "epochs": 2},
              "prompt": {"max_input_tokens": 256}}
    out = {"accuracy": correct / N_TEST, "ci95": list(wilson_interval(correct, N_TEST)), "n": N_TEST,
           "config": config, "eval_tokens": 500_000, "eval_tokens_per_s": 1200.0,
           "timings": {"train_s": 3.0 * n_train, "eval_s": 400.0}, "peak_memory_mb": 900.0,
           "versions": {"peftlab": "0.1.0", "torch": "2"}, "hardware": {"processor": "cpu", "torch_threads": 2},
           "git_commit": "abc"}
    if n_train:
        out.update(best_epoch=best_epoch, n_train=n_train, train_tokens=260 * n_train * 2, train_tokens_per_s=400.0,
                   trainable_parameters=460_800, per_epoch=[{"epoch": 1}, {"epoch": 2}])
    return out


def add_sweep(store: ResultsStore, name: str, grid: dict, cells: list[tuple[dict, dict | str]], spec=None):
    """Register a sweep and write its cells: (params, record) finished, (params, reason) failed."""
    keys = [(f"{name}-{i}", params) for i, (params, _) in enumerate(cells)]
    spec = {"name": None, "title": None, "rows": None, "columns": None, "study": None, **(spec or {})}
    store.register_sweep(name, f"configs/sweeps/{name}.yaml", f"peftlab sweep configs/sweeps/{name}.yaml",
                         grid, spec, keys)
    for (key, _), (params, result) in zip(keys, cells):
        config = result["config"] if isinstance(result, dict) else {"model": {"name": "smollm2"}}
        store.start(key, config, f"runs/{key}")
        if isinstance(result, dict):
            store.finish(key, result)
        else:
            store.fail(key, result)


@pytest.fixture()
def store_path(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultsStore(path, writer=True) as store:
        # A LoRA grid in the study's shape, two seeds per setting, one seed of one setting failed.
        accuracies = {(50, 0.0): 0.600, (50, 0.1): 0.605, (150, 0.0): 0.700, (150, 0.1): 0.760}
        cells = []
        for (n, d), acc in accuracies.items():
            for seed in (0, 1):
                if (n, d, seed) == (150, 0.1, 1):
                    cells.append(({"data.n_train": n, "method.lora_dropout": d, "train.seed": seed},
                                  "TrainingDiverged: training diverged at epoch 1, batch 3"))
                    continue
                cells.append(({"data.n_train": n, "method.lora_dropout": d, "train.seed": seed},
                              record(acc + 0.004 * seed, n, d, seed, best_epoch=1 + seed)))
        add_sweep(store, "smollm2-lora", {"data.n_train": [50, 150], "method.lora_dropout": [0.0, 0.1],
                                          "train.seed": [0, 1]}, cells)
        # Zero-shot, a single cell without a grid.
        add_sweep(store, "smollm2-zero-shot", {}, [({}, record(0.56, 0, 0.1, best_epoch=None))])
    return path


def test_tables_have_the_study_shape_with_seeds_and_the_published_numbers(store_path):
    with ResultsStore(store_path) as store:
        tables = {t.sweep: t for t in build_tables(store)}
    lora = tables["smollm2-lora"]
    header, rows = table_grid(lora)
    assert header == ["N", "d=0.0", "d=0.0 (study)", "d=0.1", "d=0.1 (study)"]
    assert [r[0] for r in rows] == ["50", "150"]
    # Two seeds: mean ± std and the count; the seed that diverged is counted as failed.
    assert re.fullmatch(r"60\.20 ± 0\.28 \(2 seeds\)", rows[0][1])
    assert rows[1][3].startswith("76.00 (1) [1 failed]")
    assert rows[0][2] == "91.05 (2)" and rows[1][4].startswith("94.1 (1)")  # the study's, with its (k)
    zero = tables["smollm2-zero-shot"]
    header, rows = table_grid(zero)
    assert header == ["model", "accuracy %", "study %"]
    assert rows[0][:2] == ["smollm2", "56.00"]
    assert [r[0] for r in rows[1:]] == ["LLaMA-2 7B", "LLaMA-2 13B", "LLaMA-2 70B"]
    assert [r[2].rstrip(MARK_UP) for r in rows[1:]] == ["51.78", "82.564", "94.24"]


def test_the_zero_shot_line_is_the_zero_shot_run_on_the_same_reviews_and_prompt(store_path):
    from peftlab.report import zero_shot_baselines

    # Beside the grid's own zero-shot cell (56 %): a 4-shot cell and a zero-shot cell cut at 128 tokens, both
    # of the same model on the same reviews; neither is the grid's baseline (a mean over all three is 60.67).
    four_shot, short = record(0.50, 0, 0.1, best_epoch=None), record(0.76, 0, 0.1, best_epoch=None)
    four_shot["config"]["prompt"]["shots"] = 4
    short["config"]["prompt"]["max_input_tokens"] = 128
    with ResultsStore(store_path, writer=True) as store:
        add_sweep(store, "smollm2-shots", {"prompt.shots": [4]}, [({"prompt.shots": 4}, four_shot)])
        add_sweep(store, "smollm2-zero-shot-128", {}, [({}, short)])
    with ResultsStore(store_path) as store:
        baselines = zero_shot_baselines(build_tables(store))
    assert baselines["smollm2-lora"] == pytest.approx(56.0)
    assert baselines["smollm2-zero-shot-128"] == pytest.approx(76.0)
    assert baselines["smollm2-shots"] == pytest.approx(56.0)  # a k-shot table's reference: 0 shots, same reviews


def test_a_method_comparison_gets_accuracy_against_time_parameters_and_memory_per_method(tmp_path):
    import statistics

    from peftlab.report.plots import cost_points

    def run(method, accuracy, seed, train_s, params, peak):
        r = record(accuracy, 500, 0.0, seed)
        r["config"]["method"]["method"] = method
        r.update(timings={"train_s": train_s, "eval_s": 300.0}, trainable_parameters=params, peak_memory_mb=peak)
        return r

    path = tmp_path / "methods.sqlite"
    with ResultsStore(path, writer=True) as store:
        cells = [({"case": "lora", "train.seed": 0}, run("lora", 0.80, 0, 100.0, 460_800, 900.0)),
                 ({"case": "lora", "train.seed": 1}, run("lora", 0.82, 1, 120.0, 460_800, 1000.0)),
                 ({"case": "ia3", "train.seed": 0}, run("ia3", 0.70, 0, 50.0, 30_000, 700.0)),
                 ({"case": "prefix", "train.seed": 0}, "TrainingDiverged: training diverged at epoch 1, batch 3")]
        add_sweep(store, "smollm2-methods", {"case": ["lora", "ia3", "prefix"], "train.seed": [0, 1]}, cells,
                  spec={"rows": "case"})
    with ResultsStore(path) as store:
        table = next(t for t in build_tables(store) if t.sweep == "smollm2-methods")
    points = {name: rest for name, *rest in cost_points(table)}
    assert set(points) == {"lora", "ia3"}  # the failed method has no point
    accuracy, low, high, costs = points["lora"]
    # By hand: two runs of 2 epochs, the mean Wilson half-width widened by t(1 dof) x sd / sqrt(2).
    w = statistics.mean(50 * (hi - lo) for lo, hi in (wilson_interval(1600, 2000), wilson_interval(1640, 2000)))
    half = (w ** 2 + (12.706 * statistics.stdev([80.0, 82.0]) / 2 ** 0.5) ** 2) ** 0.5
    assert accuracy == pytest.approx(81.0) and (low, high) == (pytest.approx(81.0 - half), pytest.approx(81.0 + half))
    assert costs == {"train_s_per_epoch": pytest.approx(55.0), "trainable_parameters": 460_800,
                     "peak_memory_mb": pytest.approx(950.0)}
    assert points["ia3"][0] == pytest.approx(70.0) and points["ia3"][3]["train_s_per_epoch"] == pytest.approx(25.0)
    report = write_report(path, tmp_path / "report")
    assert "plots/smollm2-methods-cost.png" in report["markdown"].read_text()


def test_marks_flag_differences_the_intervals_do_not_support(store_path):
    with ResultsStore(store_path) as store:
        lora = next(t for t in build_tables(store) if t.sweep == "smollm2-lora")
    # 60.2 vs 60.7 (left neighbour) overlap; 60.2 vs 70.2 (above) do not.
    assert lora.marks[(50, 0.1)] == MARK_LEFT
    assert lora.marks[(150, 0.0)] == ""
    assert MARK_LEFT not in lora.marks[(150, 0.1)]  # 76.0 vs 70.2: supported
    # The study's own single runs on 2000 reviews: 91.05 vs 90.4 and 95.4 vs 94.1 overlap, 90.4 vs 94.1 do not.
    assert lora.study_marks[(50, 0.1)] == MARK_LEFT
    assert lora.study_marks[(150, 0.1)] == MARK_LEFT


def test_report_writes_markdown_csv_png_and_one_self_contained_html(store_path, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(store_path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## smollm2-lora" in md and "| N | d=0.0 | d=0.0 (study) |" in md
    assert "`peftlab sweep configs/sweeps/smollm2-lora.yaml`" in md and "TrainingDiverged" in md
    with open(out / "tables" / "smollm2-lora.csv", newline="") as fh:
        shaped = list(csv.reader(fh))
    assert shaped[0][0] == "N" and len(shaped) == 3 and len(shaped[0]) == 5
    with open(out / "tables" / "cells.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    assert len(cells) == 9 and {c["status"] for c in cells} == {"finished", "failed"}
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["accuracy-vs-cost.png", "smollm2-lora-accuracy-vs-n.png", "smollm2-lora-heat-map.png",
                    "smollm2-zero-shot-accuracy.png"]
    for name in pngs:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="plots/' not in page  # nothing to fetch
    assert "<table" in page and "91.05 (2)" in page and "60.20 ± 0.28 (2 seeds)" in page


def test_report_refuses_a_missing_store_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error: no results store") and "\n" not in err


# A fresh interpreter in which `import matplotlib` fails (a None entry in sys.modules makes the import
# raise ImportError), running `peftlab report`; argv after -c: the report's arguments.
NO_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; from peftlab.cli import main; "
                 "code = main(sys.argv[1:]); assert 'matplotlib.pyplot' not in sys.modules; sys.exit(code)")


def test_report_without_plots_needs_no_matplotlib(store_path, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r"
    run = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, "report", str(store_path), "--out", str(out),
                          "--no-plots"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "report.html").is_file() and (out / "report.md").is_file() and not (out / "plots").exists()
    assert "smollm2-lora" in (out / "report.md").read_text()
    # The block is real: in the same interpreter set-up the report with plots is refused for want of matplotlib.
    run = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, "report", str(store_path), "--out", str(tmp_path / "p")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "plots need matplotlib" in run.stderr, run.stderr


def test_several_stores_make_one_report_and_clashing_sweep_names_are_refused(store_path, tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    with ResultsStore(other, writer=True) as store:
        add_sweep(store, "second-grid", {"data.n_train": [50, 150]},
                  [({"data.n_train": n}, record(0.55 + n / 1000, n, 0.0)) for n in (50, 150)])
    out = tmp_path / "both"
    assert main(["report", str(store_path), str(other), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    with ResultsStore(store_path) as store:
        first = {t.name for t in build_tables(store)}
    assert all(name in md for name in first) and "second-grid" in md
    assert str(store_path) in md and str(other) in md
    sweeps = {row["sweep"] for row in csv.DictReader((out / "tables" / "cells.csv").open())}
    assert "second-grid" in sweeps and len(sweeps) >= 2

    assert main(["report", str(store_path), str(store_path), "--out", str(tmp_path / "twice"), "--no-plots"]) == 2
    assert "the stores hold sweeps of the same name" in capsys.readouterr().err


def test_the_protocol_heads_each_table_and_the_validation_choice_gets_its_own(tmp_path):
    path = tmp_path / "gap.sqlite"
    with ResultsStore(path, writer=True) as store:
        cells = []
        for n, on_test, on_val, k in ((50, 0.70, 0.66, 1), (150, 0.80, 0.80, 2)):
            r = record(on_test, n, 0.0)
            r.update(per_epoch=[{"epoch": 1, "accuracy": 0.66, "val_accuracy": 0.88},
                                {"epoch": 2, "accuracy": on_test, "val_accuracy": 0.85 if k == 1 else 0.9}])
            r.update(selected_on="test", selected_on_val={"epoch": k, "accuracy": on_val,
                                                          "ci95": list(wilson_interval(round(on_val * N_TEST), N_TEST)),
                                                          "val_accuracy": 0.9})
            cells.append(({"data.n_train": n}, r))
        add_sweep(store, "gap", {"data.n_train": [50, 150]}, cells)
        add_sweep(store, "old", {"data.n_train": [50]}, [({"data.n_train": 50}, record(0.7, 50, 0.0))])
    with ResultsStore(path) as store:
        tables = {t.title: t for t in build_tables(store)}
    from peftlab.report.tables import protocol_note

    assert "selected on test: optimistic" in protocol_note(tables["gap"])
    assert "selected on test: optimistic" in protocol_note(tables["old"])  # stored before select_on: on test
    twin = tables["gap, epoch chosen on the validation split"]
    assert "validation split" in protocol_note(twin)
    _, rows = table_grid(twin)
    assert [row[1].rstrip(MARK_LEFT + MARK_UP) for row in rows] == ["66.00 (1)", "80.00 (2)"]
    report = write_report(path, tmp_path / "report", plots=False)
    text = report["markdown"].read_text()
    assert text.count("*Protocol: epoch selected on test: optimistic") == 2 and "epoch chosen on the validation" in text
    # The gap run by run, by hand: N=50 chose epoch 2 on test (70 %) and epoch 1 on validation (66 %), N=150
    # epoch 2 on both; the old sweep scored no validation split, and the twin's runs are not counted twice.
    with (tmp_path / "report" / "tables" / "selection-gap.csv").open() as f:
        gap = list(csv.reader(f))
    assert [row[:3] + row[5:] for row in gap[1:]] == [["gap", "N=50", "0", "70.00 (2)", "66.00 (1)", "4.00"],
                                                     ["gap", "N=150", "0", "80.00 (2)", "80.00 (2)", "0.00"]]
    assert gap[1][3:5] == ["66.00 / 70.00", "88.00 / 85.00"]  # each epoch's test and validation accuracy
    assert ("2 runs: the validation split chose the test subset's epoch in 1; the gap is 2.00 points on average, "
            "at most 4.00 (gap, N=50).") in text
    assert "Selection gap" in report["html"].read_text()
    # cells.csv: each stored cell once (the twin table holds the same cells), at the epoch chosen on test
    with (tmp_path / "report" / "tables" / "cells.csv").open() as f:
        listed = [(row["sweep"], row["key"], row["accuracy"], row["best_epoch"]) for row in csv.DictReader(f)]
    with ResultsStore(path) as store:
        stored = [(s.name, c.key) for s in store.sweeps() for c in store.cells(s.name)]
    assert sorted(row[:2] for row in listed) == sorted(stored) and len(stored) == 3
    assert sorted(row[2:] for row in listed if row[0] == "gap") == [("0.7", "2"), ("0.8", "2")]


def test_calibration_columns_and_reliability_diagram_come_from_the_cell_records(tmp_path):
    import math

    import torch

    from peftlab.evaluate.calibration_metrics import calibration_metrics
    from peftlab.report.plots import pooled_bins

    # Two seeds of one setting: confidences .9 (right) and .7 (wrong) land in bins 13 and 10.
    calib = [calibration_metrics(torch.tensor([[math.log(.9), math.log(.1)]]), [0]),
             calibration_metrics(torch.tensor([[math.log(.3), math.log(.7)]]), [0])]
    path = tmp_path / "results.sqlite"
    with ResultsStore(path, writer=True) as store:
        cells = [({"train.seed": s}, {**record(0.7, 50, 0.1, seed=s), **calib[s]}) for s in (0, 1)]
        add_sweep(store, "calibrated", {"train.seed": [0, 1]}, cells)
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 0
    with open(out / "tables" / "cells.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["nll"]) for r in rows] == pytest.approx([-math.log(.9), -math.log(.3)])
    assert [float(r["ece"]) for r in rows] == pytest.approx([.1, .7])
    assert (out / "plots" / "calibrated-reliability.png").read_bytes()[:4] == b"\x89PNG"
    pooled = pooled_bins([cells[0][1], cells[1][1]])
    assert pooled["count"][13] == 1 and pooled["count"][10] == 1 and sum(pooled["count"]) == 2
    assert pooled["accuracy"][10] == 0.0 and pooled["confidence"][13] == pytest.approx(.9)


def test_the_study_models_join_a_zero_shot_table_of_models_but_not_a_table_of_k_shot_prompts(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        zero = record(0.6055, 0, 0.0)
        add_sweep(store, "zero-shot", {}, [({}, zero)])
        shots = [({"prompt.shots": k}, dict(record(acc, 0, 0.0), config={**zero["config"], "prompt": {"shots": k}}))
                 for k, acc in ((0, 0.6055), (4, 0.5))]
        add_sweep(store, "shots", {"prompt.shots": [0, 4]}, shots)
        tables = {t.sweep: t for t in build_tables(store)}
    assert tables["zero-shot"].rows == ["smollm2", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf",
                                        "meta-llama/Llama-2-70b-hf"]                # the study's three beside ours
    assert tables["shots"].study is None and tables["shots"].rows == [0, 4]          # k rows, no LLaMA rows


def test_the_best_cell_is_named_by_its_case_where_the_sweep_has_cases():
    """rslora and dora are both peft's `lora`: a cases sweep's best cell is named by its case, a grid's by its method."""
    from peftlab.report.confusion import describe_cell

    rslora = record(0.915, 150, 0.0) | {"cell": {"params": {"case": "rslora", "train.lr": 1.5e-3}}, "macro_f1": 0.914}
    grid = record(0.88, 500, 0.1) | {"cell": {"params": {"data.n_train": 500}}, "macro_f1": 0.88}
    assert describe_cell(rslora).startswith("rslora N=150, 2000 test examples, accuracy 91.5 %, macro-F1 91.4 %")
    assert describe_cell(grid).startswith("lora N=500, 2000 test examples, accuracy 88.0 %")


def test_each_row_of_a_search_gets_the_column_its_validation_split_prefers(tmp_path):
    """A learning-rate search per method: per row, the highest validation accuracy (ties to the lower NLL), the
    test accuracy never read, an end of the searched range flagged, a row with cells to come provisional."""
    def val_run(val_accuracy: float, nll: float, test_accuracy: float | None = None) -> dict:
        r = record(test_accuracy or val_accuracy, 150, 0.0)
        r.update(selected_on="val", val={"accuracy": val_accuracy, "nll": nll})
        if test_accuracy is None:
            r.update(evaluated_on="val")
        return r

    path = tmp_path / "search.sqlite"
    with ResultsStore(path, writer=True) as store:
        cells = [({"case": "a", "train.lr": 1e-3}, val_run(0.80, 0.50)),
                 ({"case": "a", "train.lr": 3e-3}, val_run(0.85, 0.40, test_accuracy=0.70)),
                 ({"case": "a", "train.lr": 1e-2}, val_run(0.85, 0.30, test_accuracy=0.60)),  # tie: lower NLL
                 ({"case": "b", "train.lr": 1e-3}, val_run(0.70, 0.60, test_accuracy=0.95)),  # best test, not chosen
                 ({"case": "b", "train.lr": 3e-3}, val_run(0.90, 0.30, test_accuracy=0.50)),
                 ({"case": "b", "train.lr": 1e-2}, val_run(0.88, 0.31)),
                 ({"case": "c", "train.lr": 1e-3}, val_run(0.75, 0.55)),
                 ({"case": "c", "train.lr": 3e-3}, "TrainingDiverged: diverged at epoch 1, batch 2")]
        add_sweep(store, "search", {"case": ["a", "b", "c"], "train.lr": [1e-3, 3e-3, 1e-2]}, cells,
                  spec={"rows": "case", "columns": "train.lr"})
    with ResultsStore(path) as store:
        [table] = build_tables(store)
    from peftlab.report.tables import row_choices

    header, rows = row_choices(table)
    assert header[:2] == ["case", "chosen"]
    assert [row[:5] for row in rows] == [["a", "lr=0.01", "85.00", "0.3000", "3 of 3"],
                                         ["b", "lr=0.003", "90.00", "0.3000", "3 of 3"],
                                         ["c", "lr=0.001", "75.00", "0.5500", "1 of 2"]]
    assert "upper end" in rows[0][5] and rows[1][5] == ""
    assert "lower end" in rows[2][5] and "provisional" in rows[2][5]
    write_report(path, tmp_path / "report", plots=False)
    with (tmp_path / "report" / "tables" / "search-choices.csv").open() as f:
        assert list(csv.reader(f))[2][:2] == ["b", "lr=0.003"]
    # A grid whose runs chose their epoch on the test subset gets no choice: its validation figures carry it.
    with ResultsStore(tmp_path / "study.sqlite", writer=True) as store:
        add_sweep(store, "grid", {"data.n_train": [50], "method.lora_dropout": [0.0, 0.1]},
                  [({"data.n_train": 50, "method.lora_dropout": d}, record(0.6, 50, d) | {"val": {"accuracy": 0.7}})
                   for d in (0.0, 0.1)])
        [grid] = build_tables(store)
    assert row_choices(grid) is None


def test_every_run_is_set_against_the_best_example_by_example_with_holms_correction(tmp_path):
    """Hand-built per-example results on 40 examples: discordant counts, exact McNemar p by hand, and Holm's
    step-down (X's p = 0.039 is under 5 % alone but not under 5 %/2 once Z's tiny p has taken the first step)."""
    from peftlab.evaluate.paired import correct_bits
    from peftlab.report.paired_tests import paired_with_best

    def run(right: set[int], n_train: int, dropout: float) -> dict:
        r = record(len(right) / 40, n_train, dropout)
        r.update(n=40, correct_bits=correct_bits([{"id": f"r{i:02d}", "correct": i in right} for i in range(40)]))
        r["selected_on_val"] = {"epoch": 1, "accuracy": 0.5, "ci95": [0.4, 0.6], "val_accuracy": 0.5}
        return r

    best = set(range(36))
    x = (best - set(range(10))) | {36, 37}      # only the best right on 10, only X on 2
    y = (best - {0, 1}) | {36}                  # 2 and 1
    z = best - set(range(15))                   # 15 and 0
    path = tmp_path / "paired.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "grid", {"data.n_train": [50, 150], "method.lora_dropout": [0.0, 0.1]},
                  [({"data.n_train": 50, "method.lora_dropout": 0.0}, run(z, 50, 0.0)),
                   ({"data.n_train": 50, "method.lora_dropout": 0.1}, run(y, 50, 0.1)),
                   ({"data.n_train": 150, "method.lora_dropout": 0.0}, run(x, 150, 0.0)),
                   ({"data.n_train": 150, "method.lora_dropout": 0.1}, run(best, 150, 0.1))])
    with ResultsStore(path) as store:
        table, twin = build_tables(store)
    header, rows, summary = paired_with_best(table)
    assert [row[0] for row in rows] == ["N=50, d=0.0", "N=50, d=0.1", "N=150, d=0.0"]
    assert [row[3:5] for row in rows] == [["15", "0"], ["2", "1"], ["10", "2"]]
    assert [float(row[5]) for row in rows] == pytest.approx([2 / 2 ** 15, 1.0, 158 / 4096], rel=1e-3)
    assert [row[6] for row in rows] == ["yes", "no", "no"]
    assert [row[2] for row in rows] == ["-37.50", "-2.50", "-20.00"]
    assert summary.startswith("Best: N=150, d=0.1 (90.00 %). Not told apart from it: N=50, d=0.1; N=150, d=0.0")
    assert paired_with_best(twin) is None  # the validation-chosen epochs: no per-example results
    text = write_report(path, tmp_path / "report", plots=False)["markdown"].read_text()
    assert "| N=150, d=0.0 | 70.00 | -20.00 | 10 | 2 | 0.0386 | no |" in text
    assert (tmp_path / "report" / "tables" / "grid-paired.csv").is_file()


def test_no_paired_tests_when_the_tables_best_has_no_per_example_results(tmp_path):
    """Two runs with correct_bits under a better one from before them: "the best" would be the wrong one."""
    from peftlab.evaluate.paired import correct_bits
    from peftlab.report.paired_tests import paired_with_best

    def run(right: int, dropout: float, bits: bool) -> dict:
        r = record(right / 40, 50, dropout) | {"n": 40}
        if bits:
            r["correct_bits"] = correct_bits([{"id": f"r{i:02d}", "correct": i < right} for i in range(40)])
        return r

    path = tmp_path / "old.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "grid", {"data.n_train": [50], "method.lora_dropout": [0.0, 0.1, 0.2]},
                  [({"data.n_train": 50, "method.lora_dropout": d}, run(right, d, bits))
                   for d, right, bits in ((0.0, 30, True), (0.1, 38, False), (0.2, 20, True))])
    with ResultsStore(path) as store:
        [table] = build_tables(store)
    assert paired_with_best(table) is None


def test_a_comparison_of_cases_shows_each_methods_interval_and_cost_beside_its_accuracy(tmp_path):
    """The method comparison (one setting per case, no column) is one table: accuracy, its 95% interval,
    the learning rate, trainable parameters (and their share of the model), training seconds per epoch and
    peak memory, each from the case's own records (means over seeds). Values worked out by hand here."""
    def case_record(accuracy, lr, trainable, train_s, peak, seed=0):
        r = record(accuracy, 500, 0.0, seed=seed)
        r.update(lr=lr, trainable_parameters=trainable, total_parameters=135_000_000,
                 timings={"train_s": train_s, "eval_s": 400.0}, peak_memory_mb=peak)
        return r

    path = tmp_path / "r.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "methods", {"case": ["lora", "ia3", "prefix-tuning"], "train.seed": [0, 1]}, [
            ({"case": "lora", "train.seed": 0}, case_record(0.9000, 5e-3, 460_800, 1000.0, 4000.0)),
            ({"case": "lora", "train.seed": 1}, case_record(0.8800, 5e-3, 460_800, 1200.0, 4100.0, seed=1)),
            ({"case": "ia3", "train.seed": 0}, case_record(0.8500, 1e-2, 57_600, 800.0, 3900.0)),
            ({"case": "prefix-tuning", "train.seed": 0}, "TrainingDiverged: loss nan"),
        ], spec={"rows": "case"})
        [table] = build_tables(store)
    header, rows = table_grid(table)
    assert header == ["case", "accuracy %", "95% interval", "lr", "trainable params", "% of the model",
                      "train s/epoch", "peak MB"]
    lora, ia3, prefix = rows
    low, high = (100 * x for x in wilson_interval(1700, 2000))      # one run: its Wilson interval
    assert ia3 == ["ia3", "85.00 (2)" + MARK_UP, f"{low:.1f}-{high:.1f}", "0.01", "57,600", "0.0427", "400.0", "3,900"]
    # two seeds: 89.00 ± 1.41, the interval widened by the seeds' spread (t = 12.71 for 2 runs)
    half = ((100 * (wilson_interval(1800, 2000)[1] - wilson_interval(1800, 2000)[0]) / 2
             + 100 * (wilson_interval(1760, 2000)[1] - wilson_interval(1760, 2000)[0]) / 2) / 2)
    half = (half ** 2 + (12.706 * 1.41421 / 2 ** 0.5) ** 2) ** 0.5
    assert lora[:2] == ["lora", "89.00 ± 1.41 (2 seeds)"] and lora[3:] == ["0.005", "460,800", "0.341", "550.0",
                                                                        "4,050"]
    assert lora[2] == f"{89 - half:.1f}-{89 + half:.1f}"
    assert prefix[1].startswith("failed") and prefix[2:] == [""] * 6


def test_a_sweep_cells_peak_from_before_the_per_cell_reset_is_marked_as_an_upper_bound(tmp_path):
    """Sweep cells written before peftlab reset the peak per cell (no `peak_memory_scope`) hold the sweep
    process's peak so far: the method comparison's first four showed 4.8 -> 6.8 GB, where the same methods
    alone peak at ~3 GB. The comparison table, the cost table and the cost plot's memory panel mark them and the
    page says what the mark means; a cell whose record says its peak is its own, or a single run (no sweep
    cell), is not marked."""
    from peftlab.report.plots import cost_points
    from peftlab.report.tables import MARK_PEAK, PEAK_NOTE, cost_rows

    def case_record(accuracy, peak, scope):
        r = record(accuracy, 500, 0.0)
        r.update(peak_memory_mb=peak, cell={"key": "k", "params": {}})
        if scope:
            r["peak_memory_scope"] = scope
        return r

    path = tmp_path / "r.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "methods", {"case": ["lora", "ia3"]}, [
            ({"case": "lora"}, case_record(0.90, 4828.9, None)),
            ({"case": "ia3"}, case_record(0.89, 3216.2, "cell")),
        ], spec={"rows": "case"})
        add_sweep(store, "single", {"case": ["lora"]}, [({"case": "lora"}, record(0.9, 500, 0.0))],
                  spec={"rows": "case"})
        tables = {t.sweep: t for t in build_tables(store)}
    _, (lora, ia3) = table_grid(tables["methods"])
    assert lora[-1] == "4,829" + MARK_PEAK and ia3[-1] == "3,216"
    peaks = [row[12] for row in cost_rows(tables["methods"])]
    assert peaks == ["4,829" + MARK_PEAK, "3,216"]
    points = {name: costs for name, *_, costs in cost_points(tables["methods"])}
    assert "process_peak" in points["lora"] and "process_peak" not in points["ia3"]
    _, (single,) = table_grid(tables["single"])
    assert single[-1] == "900"  # not a sweep cell: a run's own process, its peak is its own
    write_report(path, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count(PEAK_NOTE) == 1  # under the methods table only


def test_each_table_says_what_its_runs_cost_per_machine(store_path, tmp_path):
    """"How long each grid took" from the records: the fixture's 7 finished LoRA runs trained 3 s per
    training review (N=50: 4 runs, N=150: 3) and scored for 400 s each; hand sum 1,950 + 2,800 s.
    A run on another machine is counted apart; the failed run counts for nothing."""
    from peftlab.report.tables import compute_summary

    with ResultsStore(store_path) as store:
        lora = {t.sweep: t for t in build_tables(store)}["smollm2-lora"]
    assert compute_summary(lora) == ("Compute: 7 runs, 1.3 h (training 0.5 h, scoring 0.8 h) on cpu (2 threads)")
    gpu = record(0.8, 150, 0.0)
    gpu["hardware"] = {"gpus": ["NVIDIA H100 80GB HBM3"]}
    gpu["timings"] = {"train_s": 360.0, "eval_s": 180.0}
    path = tmp_path / "two.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "two", {"data.n_train": [50, 150]}, [({"data.n_train": 50}, record(0.7, 50, 0.0)),
                                                              ({"data.n_train": 150}, gpu)])
        [two] = build_tables(store)
    assert compute_summary(two) == ("Compute: 1 run, 0.2 h (training 0.0 h, scoring 0.1 h) on cpu (2 threads); "
                                    "1 run, 0.1 h (training 0.1 h, scoring 0.1 h) on NVIDIA H100 80GB HBM3")
    markdown = write_report(store_path, tmp_path / "report", plots=False)["markdown"].read_text()
    assert "Compute: 7 runs, 1.3 h" in markdown


def test_a_comparison_marks_the_time_and_memory_of_runs_timed_on_another_machine(tmp_path):
    """The method comparison's first nine methods ran on an AMX Xeon in bf16, the last on a Zen 3 in fp32 (no
    bf16 units): their seconds per epoch and peak MB measure the machine as much as the method. The odd one out
    is marked in the comparison table and drawn apart in the cost plot, the page names both machines, and the
    cost table says where each cell ran; a table timed on one machine has no mark and no note."""
    from peftlab.report.plots import cost_points
    from peftlab.report.tables import MARK_MACHINE, cost_rows, machine_label, machine_note

    def on(accuracy, processor, family_model, dtype):
        r = record(accuracy, 500, 0.0)
        r["hardware"] = {"processor": processor, "torch_threads": 1, **({"cpu_family_model": family_model}
                                                                          if family_model else {})}
        r["model"] = {"name": "smollm2", "dtype": dtype}
        return r

    xeon, epyc = ("Intel(R) Xeon(R) Processor", None, "bfloat16"), ("AMD EPYC", "25/1", "float32")
    assert machine_label(on(0.9, *xeon)) == "Intel(R) Xeon(R) Processor (1 threads, bfloat16)"
    assert machine_label(on(0.9, *epyc)) == "AMD EPYC family/model 25/1 (1 threads, float32)"
    path = tmp_path / "r.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "mixed", {"case": ["lora", "ia3", "vera"]}, [
            ({"case": "lora"}, on(0.90, *xeon)), ({"case": "ia3"}, on(0.89, *xeon)),
            ({"case": "vera"}, on(0.88, *epyc))], spec={"rows": "case"})
        add_sweep(store, "one", {"case": ["lora", "vera"]}, [
            ({"case": "lora"}, on(0.90, *epyc)), ({"case": "vera"}, on(0.88, *epyc))], spec={"rows": "case"})
        tables = {t.sweep: t for t in build_tables(store)}
    _, (lora, ia3, vera) = table_grid(tables["mixed"])
    # record(): 3 s per training review x 500 over 2 epochs = 750 s per epoch; 900 MB
    assert lora[-2:] == ia3[-2:] == ["750.0", "900"]
    assert vera[-2:] == ["750.0" + MARK_MACHINE, "900" + MARK_MACHINE]
    note = machine_note(tables["mixed"])
    assert note.startswith(f"{MARK_MACHINE} time and memory measured on AMD EPYC family/model 25/1 (1 threads, "
                           "float32); the other rows' on Intel(R) Xeon(R) Processor (1 threads, bfloat16)")
    assert [row[-1] for row in cost_rows(tables["mixed"])] == [
        "Intel(R) Xeon(R) Processor (1 threads, bfloat16)"] * 2 + ["AMD EPYC family/model 25/1 (1 threads, float32)"]
    points = {name: costs for name, *_, costs in cost_points(tables["mixed"])}
    assert ["elsewhere" in points[c] for c in ("lora", "ia3", "vera")] == [False, False, True]
    _, rows = table_grid(tables["one"])
    assert all(MARK_MACHINE not in x for row in rows for x in row) and machine_note(tables["one"]) is None
    write_report(path, tmp_path / "report")
    assert (tmp_path / "report" / "report.md").read_text().count(note) == 1


def test_scoring_seconds_add_back_the_final_test_pass_older_records_left_out(tmp_path):
    """Until final_test_s, a run chosen on validation counted only its epochs' validation passes in
    timings.eval_s; its top-level eval_seconds is the test pass after training. The report adds it back (the
    comparison's LoRA: 92 s of validation + 531 s of test), and leaves newer records and test-chosen runs alone."""
    from peftlab.report.tables import compute_summary, cost_rows, scoring_seconds

    old = record(0.9, 500, 0.0)
    old.update(selected_on="val", evaluated_on="test", eval_seconds=531.0, timings={"train_s": 1500.0, "eval_s": 92.0})
    new = dict(old, timings={"train_s": 1500.0, "eval_s": 623.0, "final_test_s": 531.0})
    study = dict(old, selected_on="test", timings={"train_s": 1500.0, "eval_s": 800.0})
    assert [scoring_seconds(r) for r in (old, new, study)] == [623.0, 623.0, 800.0]
    path = tmp_path / "r.sqlite"
    with ResultsStore(path, writer=True) as store:
        add_sweep(store, "m", {"case": ["a", "b"]}, [({"case": "a"}, old), ({"case": "b"}, new)], spec={"rows": "case"})
        [table] = build_tables(store)
    assert [row[9] for row in cost_rows(table)] == ["623.0", "623.0"]
    # 2 x (1500 + 623) s = 1.18 h, scoring 1,246 s = 0.35 h
    assert compute_summary(table) == "Compute: 2 runs, 1.2 h (training 0.8 h, scoring 0.3 h) on cpu (2 threads)"
