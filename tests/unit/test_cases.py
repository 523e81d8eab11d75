"""Sweeps with `cases:` (settings that go together, such as a method and its learning rate), and the
method comparison they carry (configs/sweeps/smollm2-methods*.yaml) run on the tiny model."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.config import build_config
from peftlab.errors import PeftlabError
from peftlab.experiments import ResultsStore, cell_key, load_sweep, run_sweep
from peftlab.report import write_report
from peftlab.experiments.grid import format_value
from peftlab.report.tables import build_tables, cost_rows, row_choices

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices are too small to share among threads
    yield
    torch.set_num_threads(threads)


def write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


CASES = {"lora": {"method.method": "lora", "train.lr": [1e-3, 1e-2]},
         "dora": {"method": {"method": "lora", "peft_options": {"use_dora": True}}, "train.lr": 1e-2},
         "ia3": {"method.method": "ia3", "train.lr": 3e-3}}


def test_cases_are_a_union_each_crossed_with_the_grid(tmp_path):
    path = write(tmp_path / "c.yaml", {"data": {"n_train": 50}, "cases": CASES, "grid": {"train.seed": [0, 1]}})
    sweep = load_sweep(path, out=tmp_path / "out")
    got = [(c.params["case"], c.params.get("train.lr"), c.params["train.seed"]) for c in sweep.cells]
    assert got == [("lora", 1e-3, 0), ("lora", 1e-3, 1), ("lora", 1e-2, 0), ("lora", 1e-2, 1),
                   ("dora", None, 0), ("dora", None, 1), ("ia3", None, 0), ("ia3", None, 1)]
    by_case = {c.params["case"]: c.config for c in sweep.cells if c.params["train.seed"] == 0}
    assert by_case["dora"].method.peft_options == {"use_dora": True} and by_case["dora"].train.lr == 1e-2
    assert by_case["ia3"].method.method == "ia3" and by_case["lora"].method.peft_options == {}
    # a cell's key is its run's: the same as a plain config of those settings, whatever the case is called
    assert sweep.cells[4].key == cell_key(build_config({"data.n_train": 50, "method.method": "lora",
                                                        "method.peft_options": {"use_dora": True},
                                                        "train.lr": 1e-2, "train.seed": 0}))
    assert list(sweep.grid) == ["case", "train.lr", "train.seed"] and sweep.grid["train.lr"] == [1e-3, 1e-2]


def test_a_flag_overrides_what_the_cases_set(tmp_path):
    path = write(tmp_path / "c.yaml", {"data": {"n_train": 50}, "cases": {k: CASES[k] for k in ("dora", "ia3")}})
    sweep = load_sweep(path, {"train.lr": "0.05"})
    assert [c.config.train.lr for c in sweep.cells] == [0.05, 0.05]
    with pytest.raises(PeftlabError, match="are the same run"):  # two cases that the flag makes one run
        load_sweep(write(tmp_path / "d.yaml", {"cases": {"a": {"train.lr": 1e-3}, "b": {"train.lr": 1e-2}}}),
                   {"train.lr": "0.05"})


@pytest.mark.parametrize("cases, grid, message", [
    ({"a": {"train.lr": 1e-3}}, {"train.lr": [1e-2]}, "case a sets train.lr, which grid: sweeps"),
    ({"a": {"train.rl": 1e-3}}, None, "case a: unknown key 'train.rl'"),
    ({"a b": {"train.lr": 1e-3}}, None, "case name 'a b'"),
    ({"a": {}}, None, "case a must map dotted config keys"),
    ([{"train.lr": 1e-3}], None, "'cases' must map case names"),
    ({"a": {"train.lr": []}}, None, "case a: grid key train.lr has an empty list"),
    ({"a": {"train.lr": 1e-3}, "b": {"train.lr": 1e-3}}, None, "are the same run"),
    ({"a": {"method.lora_dropout": [0.1, 2.0]}}, None, "method.lora_dropout=2.0 must be"),
])
def test_bad_cases_are_refused_in_one_line(tmp_path, cases, grid, message):
    body = {"data": {"n_train": 50}, "cases": cases, **({"grid": grid} if grid else {})}
    with pytest.raises(PeftlabError, match=message):
        load_sweep(write(tmp_path / "bad.yaml", body))


def test_the_method_comparison_runs_every_method_on_the_tiny_model(tmp_path, tiny_model_dir, imdb_dir):
    """Each case of the shipped learning-rate search trains its own kind of adapter on the shared base and
    leaves it untouched (the runner checks the base's fingerprint after every cell), and the report
    lays the cases out as rows with their cost."""
    tiny = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
            "data.n_train": "8", "data.n_val": "4", "data.n_test": "8", "prompt.max_input_tokens": "40",
            "train.epochs": "1", "train.batch_size": "4", "method.virtual_tokens": "4"}
    sweep = load_sweep(ROOT / "configs/sweeps/smollm2-methods-lr.yaml", tiny, out=tmp_path / "out")
    cases = list(dict.fromkeys(c.params["case"] for c in sweep.cells))
    assert cases == ["lora", "dora", "rslora", "ia3", "loha", "lokr", "prompt-tuning", "p-tuning", "prefix-tuning",
                     "vera", "oft", "hra", "ln-tuning"]
    one_each = [next(c for c in sweep.cells if c.params["case"] == case) for case in cases]  # one lr per method
    sweep = dataclasses.replace(sweep, cells=one_each, members=one_each)
    store_path = tmp_path / "r.sqlite"
    with ResultsStore(store_path, writer=True) as store:
        outcome = run_sweep(sweep, store, log=lambda _: None)
        assert not outcome.failed and len(outcome.ran) == 13 and outcome.model_loads == 1
        cells = {c.params["case"]: c for c in store.cells(sweep.name)}
        trainable = {case: cells[case].record["trainable_parameters"] for case in cases}
        saved = {case: json.loads((Path(cells[case].record["out"]) / "adapter" / "adapter_config.json").read_text())
                 for case in cases}                            # what plain peft will load: 13 kinds of adapter
        assert [saved[c]["peft_type"] for c in cases] == ["LORA", "LORA", "LORA", "IA3", "LOHA", "LOKR",
                                                          "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "VERA",
                                                          "OFT", "HRA", "LN_TUNING"]
        assert [(saved[c]["use_dora"], saved[c]["use_rslora"]) for c in ("lora", "dora", "rslora")] == \
            [(False, False), (True, False), (False, True)]
        assert trainable["dora"] > trainable["lora"] == trainable["rslora"]  # DoRA adds a magnitude vector
        assert all(cells[c].record["evaluated_on"] == "val" and cells[c].record["test_evaluations"] == 0
                   for c in cases)                             # the search never scores the test subset
        [table] = build_tables(store)
    assert table.row_key == "case" and table.col_key == "train.lr" and table.rows == cases
    # the union of the cases' learning rates, in cell order 1.5e-4, 1e-3, 5e-4, ..., is laid out in order
    assert table.cols == sorted({c.config.train.lr for c in one_each}) and table.cols != \
        list(dict.fromkeys(c.config.train.lr for c in one_each))
    per_epoch = {row[1].split(",")[0]: row[8] for row in cost_rows(table)}   # "train s/epoch"
    assert per_epoch == {f"case={c}": f"{cells[c].record['timings']['train_s'] / 1:,.1f}" for c in cases}  # 1 epoch
    markdown = write_report(store_path, tmp_path / "report", plots=False)["markdown"].read_text()
    assert "| prefix-tuning |" in markdown
    assert "4 validation examples" in markdown and "test examples" not in markdown  # the test was never scored


def test_the_method_comparison_takes_each_rate_the_search_chose_on_validation():
    """configs/sweeps/smollm2-methods.yaml runs each method at N=500 with the learning rate the committed
    search (results/methods/lr-search.sqlite) picks for its row on validation, a rate inside the values
    searched and from a finished row; everything else is the search's setting. Fails if a case's rate was
    edited by hand (or picked from the test subset), if a case is added before its row has finished, or if
    the two YAMLs drift apart in anything but N, the test scoring and the rate."""
    comparison = load_sweep(ROOT / "configs/sweeps/smollm2-methods.yaml")
    search = load_sweep(ROOT / "configs/sweeps/smollm2-methods-lr.yaml")
    with ResultsStore(ROOT / "results/methods/lr-search.sqlite") as store:
        [table] = [t for t in build_tables(store) if t.sweep == search.name]
    header, lines = row_choices(table)
    choices = {line[0]: line for line in lines}
    assert comparison.cells and all(c.config.data.n_train == 500 and c.config.train.score_test and
                                    c.config.train.select_on == "val" for c in comparison.cells)
    for cell in comparison.cells:
        case, lr = cell.params["case"], cell.config.train.lr
        chosen, _, _, finished, note = choices[case][1:]
        done, of = finished.split(" of ")
        assert chosen == f"lr={format_value(lr)}" and done == of and note == "", (case, choices[case])
        [searched] = [c for c in search.cells if c.params["case"] == case and c.config.train.lr == lr]
        same = dataclasses.replace(cell.config, out=searched.config.out,
                                   data=dataclasses.replace(cell.config.data, n_train=searched.config.data.n_train),
                                   train=dataclasses.replace(cell.config.train, score_test=False))
        assert same == searched.config, case
