"""`peftlab tune`: search-space parsing and its errors, a whole search on the tiny model, and a search
killed with SIGKILL in several phases that, resumed, equals the unbroken one (issue 12)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.experiments.search_space import parse_distribution, parse_search_space

optuna = pytest.importorskip("optuna")


def write_tune_yaml(folder: Path, model: Path, data: Path, trials: int = 6, **tune) -> Path:
    spec = {"model": {"name": str(model), "dtype": "fp32", "device": "cpu"},
            "data": {"source": str(data), "n_train": 8, "n_val": 8, "n_test": 8},
            "prompt": {"max_input_tokens": 24}, "method": {"method": "lora"},
            "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": 1},
            "search": {"train.lr": "loguniform(1e-4, 5e-2)", "method.lora_r": [2, 4]},
            "tune": {"trials": trials, "sampler": "tpe", "startup_trials": 1, "pruner": "median",
                     "objective": "val_nll", **tune}}
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_of(storage: Path) -> list[tuple]:
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{storage}")
    return [(t.state.name, t.params, t.value, dict(t.intermediate_values)) for t in study.trials
            if t.state.name in ("COMPLETE", "PRUNED")]


# -- the search space ------------------------------------------------------------------------------
def test_distributions_are_parsed_into_optuna_ones():
    d = optuna.distributions
    assert parse_distribution("train.lr", "loguniform(1e-5, 1e-2)", "t") == d.FloatDistribution(1e-5, 1e-2, log=True)
    assert parse_distribution("method.lora_dropout", "uniform(0, 0.3)", "t") == d.FloatDistribution(0.0, 0.3)
    assert parse_distribution("method.virtual_tokens", "int(4, 80)", "t") == d.IntDistribution(4, 80)
    assert parse_distribution("method.virtual_tokens", "int(4, 80, log)", "t") == d.IntDistribution(4, 80, log=True)
    assert parse_distribution("method.lora_r", [4, 8, 16], "t") == d.CategoricalDistribution([4, 8, 16])


@pytest.mark.parametrize("key, value, words", [
    ("train.learning_rate", "uniform(0, 1)", "unknown parameter 'train.learning_rate'"),
    ("train.lr", "uniform(0.3, 0.3)", "is empty"),
    ("train.lr", "loguniform(1e-2, 1e-5)", "is inverted"),
    ("method.virtual_tokens", "int(80, 4)", "is inverted"),
    ("train.lr", "loguniform(0, 1e-2)", "log scale needs bounds > 0"),
    ("train.lr", "normal(0, 1)", "cannot read 'normal(0, 1)'"),
    ("train.lr", "uniform(1e-3)", "needs two bounds"),
    ("method.virtual_tokens", "int(4.5, 80)", "whole numbers"),
    ("method.lora_r", [], "empty list"),
    ("method.lora_dropout", "uniform(0, 1.5)", "method.lora_dropout=1.5 is not a valid setting"),
])
def test_bad_search_spaces_fail_in_one_line(key, value, words):
    with pytest.raises(PeftlabError, match=words.replace("(", r"\(").replace(")", r"\)")) as exc:
        parse_search_space({key: value}, {}, "t.yaml")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("change, words", [
    ({"tune": {"trials": 0}}, "tune.trials=0: the budget"),
    ({"search": {"train.lrate": "uniform(0, 1)"}}, "unknown parameter 'train.lrate'"),
    ({"tune": {"sampler": "grid"}}, "tune.sampler='grid' is not one of"),
    ({"data": {"n_val": 0}}, "set data.n_val"),
])
def test_bad_tune_yaml_exits_2_with_one_line(tmp_path, tiny_model_dir, imdb_dir, capsys, change, words):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir)
    spec = yaml.safe_load(path.read_text())
    for section, values in change.items():
        spec[section] = {**spec[section], **values} if section != "search" else values
    path.write_text(yaml.safe_dump(spec))
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_shipped_tune_configs_load():
    from peftlab.experiments.tune import load_tune

    files = sorted((Path(__file__).resolve().parents[2] / "configs" / "tune").glob("*.yaml"))
    assert files
    for path in files:
        tune = load_tune(path)
        assert tune.spec.trials >= 16 and tune.space and tune.base["data.n_val"] > 0


# -- a whole search --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_model_dir, imdb_dir, one_torch_thread):
    folder = tmp_path_factory.mktemp("unbroken")
    path = write_tune_yaml(folder, tiny_model_dir, imdb_dir)
    assert main(["tune", str(path), "--out", str(folder / "out"), "--quiet"]) == 0
    return folder / "out"


def test_search_writes_best_yaml_tables_plots_and_scores_the_test_subset_once(unbroken, capsys):
    trials = trials_of(unbroken / "study.sqlite3")
    assert len(trials) == 6
    assert [t[0] for t in trials].count("PRUNED") >= 1  # the tiny runs differ enough for the median pruner
    best = yaml.safe_load((unbroken / "best.yaml").read_text())
    assert best["train"]["score_test"] is True and best["train"]["select_on"] == "val" and best["out"] is None
    with sqlite3.connect(unbroken / "results.sqlite") as conn:
        cells = conn.execute("SELECT config, record FROM cells WHERE status='finished'").fetchall()
    import json

    scored = [json.loads(c) for c, _ in cells if json.loads(c)["train"]["score_test"]]
    assert len(scored) == 1  # the test subset only for the best config, once
    assert {t[0] for t in trials} <= {"COMPLETE", "PRUNED"}
    header = (unbroken / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("trial,state,value,epochs,method.lora_r,train.lr")
    assert (unbroken / "plots" / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial | state |" in (unbroken / "trials.md").read_text()


@pytest.mark.parametrize("objective", ["val_accuracy", "val_nll"])
def test_trials_tied_on_the_objective_are_told_apart_by_the_other_validation_metric(tmp_path, tiny_model_dir,
                                                                                   imdb_dir, objective):
    from optuna.distributions import FloatDistribution

    from peftlab.experiments.store import ResultsStore
    from peftlab.experiments.tune import chosen_trial, load_tune

    tune = load_tune(write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, objective=objective), out=tmp_path / "out")
    # (val accuracy, val nll) of five trials' runs: under accuracy, trials 1, 2 and 4 tie at 0.89 and trial 2
    # has the lowest log-loss; under log-loss, trials 0 and 3 tie at 0.30 and trial 3 is the more accurate.
    runs = [(0.85, 0.30), (0.89, 0.33), (0.89, 0.31), (0.87, 0.30), (0.89, 0.31)]
    study = optuna.create_study(direction=tune.direction)
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        for i, (accuracy, nll) in enumerate(runs):
            store.start(f"cell{i}", {}, None)
            store.finish(f"cell{i}", {"accuracy": accuracy, "val": {"accuracy": accuracy, "nll": nll}})
            value = accuracy if objective == "val_accuracy" else nll
            study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-3}, value=value,
                                                      distributions={"train.lr": FloatDistribution(1e-4, 1e-2)},
                                                      user_attrs={"cell_key": f"cell{i}"}))
        chosen = chosen_trial(study, tune, store)
    assert chosen.number == (2 if objective == "val_accuracy" else 3)
    assert study.best_trial.number == (1 if objective == "val_accuracy" else 0)  # Optuna alone: the first tied


def test_best_yaml_runs_with_peftlab_train(unbroken, tmp_path, capsys):
    best_run = json.loads((unbroken / "best-run" / "metrics.json").read_text())
    assert main(["train", "--config", str(unbroken / "best.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["accuracy"] == best_run["accuracy"] and again["val"]["accuracy"] == best_run["val"]["accuracy"]


import json  # noqa: E402  (used by the tests above)


# -- killed and resumed ----------------------------------------------------------------------------
# Where a kill lands: a training step, the gap before a trial is asked, telling Optuna, and committing a
# cell to the results store.
MARKERS = [("training", "peftlab.train.loop", "batch_loss"), ("between", "peftlab.experiments.tune", "make_sampler"),
           ("writing", "optuna.study", "Study.tell"), ("writing", "peftlab.experiments.store", "ResultsStore._end")]


def run_child(argv: list[str], marks: Path) -> int:
    """Fork a child that runs the CLI with the phases marked (a line per entry, then a short sleep)."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        import importlib

        for phase, module, dotted in MARKERS:
            owner = importlib.import_module(module)
            *classes, name = dotted.split(".")
            for cls in classes:
                owner = getattr(owner, cls)
            original = getattr(owner, name)

            def wrapper(*args, _phase=phase, _fn=original, **kwargs):
                with open(marks, "a") as fh:
                    fh.write(f"{os.getpid()} {_phase}\n")
                time.sleep(0.05)
                return _fn(*args, **kwargs)
            setattr(owner, name, wrapper)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = main(argv)
    finally:
        os._exit(code)


def test_a_search_killed_in_every_phase_resumes_to_the_unbroken_result(unbroken, tmp_path, tiny_model_dir,
                                                                          imdb_dir):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir)
    argv = ["tune", str(path), "--out", str(tmp_path / "out"), "--quiet"]
    marks = tmp_path / "marks"
    # (phase, how many entries of it in this attempt before the kill)
    plan = [("training", 3), ("writing", 1), ("between", 2), ("training", 9), ("writing", 4), ("training", 14),
            ("writing", 7)]
    killed = 0
    for phase, nth in plan:
        marks.write_text("")
        pid = run_child(argv, marks)
        deadline = time.time() + 120
        while time.time() < deadline:
            lines = [l.split()[1] for l in marks.read_text().splitlines() if l.startswith(f"{pid} ")]
            if lines.count(phase) >= nth:
                os.kill(pid, signal.SIGKILL)
                killed += 1
                break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = None
                break
            time.sleep(0.01)
        if pid:
            os.waitpid(pid, 0)
    assert killed >= 4  # the kills landed (the search was not over before them)
    marks.write_text("")
    pid = run_child(argv, marks)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert trials_of(tmp_path / "out" / "study.sqlite3") == trials_of(unbroken / "study.sqlite3")
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.sqlite3'}")
    cut_off = [t for t in study.trials if t.state.name == "FAIL" and "reason" not in t.user_attrs]
    assert cut_off  # a kill landed inside a trial: it was marked FAIL and redone
    resumed = json.loads((tmp_path / "out" / "best.json").read_text())
    original = json.loads((unbroken / "best.json").read_text())
    assert resumed["params"] == original["params"] and resumed["test"] == original["test"]
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as conn:
        rows = conn.execute("SELECT key, record FROM cells WHERE status='finished'").fetchall()
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys))
    # A trial killed mid-training went on from its checkpoint (not from scratch), and the search still equals
    # the unbroken one above, intermediate values included: its finished epochs were told to the new trial.
    assert any(json.loads(record).get("resumed_from") for _, record in rows)


def test_help_documents_the_tune_yaml(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for words in ("loguniform(1e-5, 1e-2)", "int(4, 80, log)", "[4, 8, 16]", "tune.trials", "tune.pruner",
                  "tune.objective", "optuna-dashboard sqlite:///"):
        assert words in out


def test_a_trial_equal_to_a_finished_grid_cell_reuses_its_stored_result(tmp_path, tiny_model_dir, imdb_dir):
    from peftlab.experiments.grid import cell_key
    from peftlab.experiments.store import ResultsStore
    from peftlab.experiments.tune import FINAL_SETTINGS, load_tune, trial_config

    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, trials=1)
    spec = yaml.safe_load(path.read_text())
    spec["search"] = {"method.lora_r": [4]}
    path.write_text(yaml.safe_dump(spec))
    # The grid cell of the same run (a sweep scores the test subset): values no real run would give.
    grid_cell = trial_config(load_tune(path, out=tmp_path / "out"), {"method.lora_r": 4}, FINAL_SETTINGS)
    stored = {"accuracy": 0.625, "ci95": [0.3, 0.9], "n": 8, "val": {"accuracy": 0.123, "nll": 9.5}}
    with ResultsStore(tmp_path / "grid.sqlite", writer=True) as store:
        store.start(cell_key(grid_cell), grid_cell.to_dict(), "runs/grid-cell")
        store.finish(cell_key(grid_cell), stored)
    argv = ["tune", str(path), "--out", str(tmp_path / "out"), "--store", str(tmp_path / "grid.sqlite"), "--quiet"]
    assert main(argv) == 0
    [trial] = trials_of(tmp_path / "out" / "study.sqlite3")
    assert trial[2] == 9.5  # the stored val_nll: nothing was trained
    assert not (tmp_path / "out" / "trials").exists()
    assert json.loads((tmp_path / "out" / "best.json").read_text())["test"]["accuracy"] == 0.625


# -- the tuned config beside the untuned one ---------------------------------------------------------
def test_mcnemar_exact_matches_the_binomial_tail_by_hand():
    from peftlab.evaluate.metrics import mcnemar_exact

    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 2 ** 10)   # 0.021484375
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)


def test_baseline_runs_the_untuned_config_beside_the_best_on_the_same_test_examples(tmp_path, tiny_model_dir,
                                                                                     imdb_dir, one_torch_thread):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, trials=2, baseline=True)
    assert main(["tune", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    base_run = tmp_path / "out" / "baseline-run"
    config = yaml.safe_load((base_run / "config.yaml").read_text())
    assert (config["train"]["lr"], config["method"]["lora_r"]) == (5e-4, 8)  # peftlab's defaults: nothing searched
    assert best["baseline"]["params"] == {"train.lr": 5e-4, "method.lora_r": 8}
    assert config["train"]["score_test"] is True and config["train"]["select_on"] == "val"
    # the paired counts, recounted from the two runs' predictions
    rows = {name: {r["id"]: r["correct"] for r in map(json.loads, (tmp_path / "out" / name / "predictions.jsonl")
                                                           .read_text().splitlines())}
            for name in ("best-run", "baseline-run")}
    tuned, untuned = rows["best-run"], rows["baseline-run"]
    assert set(tuned) == set(untuned) and len(tuned) == 8
    paired = best["paired"]
    assert paired["only_best_correct"] == sum(tuned[i] and not untuned[i] for i in tuned)
    assert paired["only_baseline_correct"] == sum(untuned[i] and not tuned[i] for i in tuned)
    assert paired["difference"] == pytest.approx((sum(tuned.values()) - sum(untuned.values())) / 8)
    assert "McNemar exact p" in (tmp_path / "out" / "trials.md").read_text()
