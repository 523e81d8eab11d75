"""`peftlab tune --workers` on a local Ray cluster of two CPU workers (issue 12): every trial once, each
completed trial's value that of a serial `peftlab train` of its parameters, a lost worker's trial redone,
pruning decided by the driver from the workers' epoch reports, a killed driver's trials redone once."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import yaml

from peftlab.cli import main
from peftlab.experiments.grid import RayOptions
from peftlab.experiments.store import ResultsStore
from peftlab.experiments.tune import load_tune, train_trial
from peftlab.experiments.tune_parallel import run_tune_parallel
from tests.unit.test_tune import write_tune_yaml


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs, started once for this file (a start costs seconds)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import the tests
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level="error")
    yield
    ray.shutdown()


def die_after_first_report(config, model, tokenizer, progress, on_epoch):
    """The first trial to report an epoch (the driver has it and said: go on) loses its worker, as kill -9."""
    marker = Path(config.out).parents[1] / "killed"

    def report_then_die(epoch, record):
        on_epoch(epoch, record)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # one victim, whichever worker is first
        except FileExistsError:
            return
        os.write(fd, config.out.encode())
        os.close(fd)
        os._exit(9)

    return train_trial(config, model, tokenizer, progress, report_then_die)


def study_of(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.sqlite3'}")


@pytest.fixture(scope="module")
def parallel(ray_cluster, tmp_path_factory, tiny_model_dir, imdb_dir):
    folder = tmp_path_factory.mktemp("parallel")
    tune = load_tune(write_tune_yaml(folder, tiny_model_dir, imdb_dir), out=folder / "out")
    logs: list[str] = []
    with ResultsStore(folder / "out" / "results.sqlite", writer=True) as store:
        outcome = run_tune_parallel(tune, store, RayOptions(workers=2, cpus_per_worker=1), log=logs.append,
                                    train=die_after_first_report)
    with ResultsStore(folder / "out" / "results.sqlite") as store:
        cells = {c.key: c for c in store.cells()}
    return folder / "out", outcome, logs, cells


@pytest.mark.slow  # the shared search: ~80 s on a loaded 2-core machine
def test_every_trial_runs_once_and_a_lost_workers_trial_is_redone(parallel):
    out, _, logs, cells = parallel
    trials = study_of(out).trials
    assert [t.number for t in trials] == list(range(6))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}  # none cut off, none failed
    victim = next(key for key, cell in cells.items() if cell.out == (out / "killed").read_text())
    keys = [t.user_attrs["cell_key"] for t in trials]
    best_run = [key for key, cell in cells.items() if cell.config["train"]["score_test"]]
    assert victim in keys and len(set(keys)) == 6 and set(cells) == set(keys) | set(best_run)
    for trial in trials:
        cell = cells[trial.user_attrs["cell_key"]]
        assert cell.attempts == (2 if cell.key == victim else 1)
        if trial.state.name == "COMPLETE":
            assert cell.status == "finished" and cell.record["val"]["nll"] == trial.value
            assert trial.intermediate_values == {row["epoch"]: row["val"]["nll"] for row in
                                                 cell.record["val_per_epoch"]} and len(trial.intermediate_values) == 2
        else:  # the pruner stopped it after an epoch the worker reported through the driver
            assert cell.status == "failed" and cell.reason == f"pruned after epoch {max(trial.intermediate_values)}"
    assert any("its Ray worker died" in line for line in logs)
    # the victim's trial kept its number and its first epoch, and was not told twice
    victim_trial = next(t for t in trials if t.user_attrs["cell_key"] == victim)
    assert 1 in victim_trial.intermediate_values
    pids = {c.record["cell"]["pid"] for c in cells.values() if c.status == "finished"}
    assert pids and os.getpid() not in pids  # the runs were the workers'


@pytest.mark.slow  # the shared search: ~80 s on a loaded 2-core machine
def test_each_completed_trial_equals_a_serial_run_of_its_parameters(parallel, tmp_path, one_torch_thread):
    out, _, _, cells = parallel
    completed = [t for t in study_of(out).trials if t.state.name == "COMPLETE"]
    assert len(completed) >= 2
    for trial in completed:
        cell = cells[trial.user_attrs["cell_key"]]
        again = tmp_path / str(trial.number)
        assert main(["train", "--config", str(Path(cell.out) / "config.yaml"), "--out", str(again), "--quiet"]) == 0
        serial = json.loads((again / "metrics.json").read_text())
        assert serial["val"]["nll"] == trial.value  # a plain run, in this process: the same number
        assert serial["adapter_sha256"] == cell.record["adapter_sha256"]


@pytest.mark.slow  # the shared search: ~80 s on a loaded 2-core machine
def test_outputs_are_those_of_a_serial_search(parallel):
    out, outcome, _, cells = parallel
    study = study_of(out)
    best = study.best_trial
    assert (outcome.best_params, outcome.best_value) == (best.params, best.value)
    recorded = json.loads((out / "best.json").read_text())
    assert recorded["params"] == best.params and recorded["trial"] == best.number
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["method"]["lora_r"] == best.params["method.lora_r"] and config["train"]["lr"] == best.params["train.lr"]
    assert config["train"]["score_test"] is True and config["out"] is None
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,value,epochs,method.lora_r,train.lr,cell_key")
    assert [r.split(",")[:2] for r in rows[1:]] == [[str(t.number), t.state.name] for t in study.trials]
    scored = [c for c in cells.values() if c.config["train"]["score_test"]]
    assert len(scored) == 1 and scored[0].out == str(out / "best-run") and scored[0].status == "finished"
    metrics = json.loads((out / "best-run" / "metrics.json").read_text())
    assert metrics["accuracy"] == outcome.test["accuracy"] == recorded["test"]["accuracy"]
    assert all(not c.config["train"]["score_test"] for c in cells.values() if c.key != scored[0].key)


def test_cli_ray_section_and_pruning_by_the_driver(ray_cluster, tmp_path, tiny_model_dir, imdb_dir, capsys):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, trials=3)
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "ray": {"workers": 2, "cpus_per_worker": 1}}))
    tune = load_tune(path, out=tmp_path / "out")
    # A finished trial with a validation log-loss of 0 at each epoch: every real trial is worse after epoch 1,
    # so the median pruner (1 startup trial) must stop each there, told by a worker through the driver.
    tune.storage.parent.mkdir(parents=True)
    seeded = optuna.create_study(study_name="tune", storage=tune.url, direction="minimize")
    seeded.add_trial(optuna.trial.create_trial(params={"method.lora_r": 2, "train.lr": 1e-3},
                                               distributions=tune.space, value=0.0, intermediate_values={1: 0.0, 2: 0.0}))
    assert main(["tune", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "1 of 3 trials ended" in (out := capsys.readouterr().out) and "2 to run on 2 Ray workers" in out
    trials = study_of(tmp_path / "out").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    with ResultsStore(tmp_path / "out" / "results.sqlite") as store:
        for trial in trials[1:]:
            assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] > 0
            cell = store.cell(trial.user_attrs["cell_key"])
            assert cell.status == "failed" and cell.reason == "pruned after epoch 1"
            assert cell.config["train"]["epochs"] == 2  # stopped, not a one-epoch run


def test_help_documents_workers(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    for words in ("--workers", "--ray-address", "ray: section", "max_worker_losses", "constant-liar TPE"):
        assert words in out
    assert "no --workers yet" not in out


@pytest.mark.slow
def test_a_trial_equal_to_one_in_flight_takes_its_result(ray_cluster, tmp_path, tiny_model_dir, imdb_dir):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, trials=3, pruner="none")
    spec = yaml.safe_load(path.read_text())
    spec["search"] = {"method.lora_r": [4]}  # every trial is the same run
    path.write_text(yaml.safe_dump(spec))
    logs: list[str] = []
    tune = load_tune(path, out=tmp_path / "out")
    with ResultsStore(tmp_path / "out" / "results.sqlite", writer=True) as store:
        run_tune_parallel(tune, store, RayOptions(workers=2, cpus_per_worker=1), log=logs.append)
        cells = store.cells()
    trials = study_of(tmp_path / "out").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and len({t.value for t in trials}) == 1
    [cell] = [c for c in cells if not c.config["train"]["score_test"]]
    assert cell.attempts == 1 and cell.record["val"]["nll"] == trials[0].value  # run once, for three trials
    assert "[trial 2/3] lora_r=4: the same run as a trial in flight; it takes that trial's result" in logs
    ends = [line for line in logs if ": val nll" in line]
    assert [line.split(":")[0] for line in ends] == ["[trial 1/3] lora_r=4", "[trial 2/3] lora_r=4",
                                                     "[trial 3/3] lora_r=4"]
    assert ["(stored result reused)" in line for line in ends] == [False, True, True]


@pytest.mark.parametrize("args, ray_section, words", [
    (["--workers", "0"], None, "ray workers=0: give a whole number of workers, 1 or more"),
    (["--workers", "-3"], None, "ray workers=-3: give a whole number of workers, 1 or more"),
    ([], {"workers": 2, "worker": 3}, "unknown key 'ray.worker'"),
    (["--workers", "2", "--device", "cuda:1"], None,
     "model.device=cuda:1 cannot work on Ray workers (--workers): each worker sees only the GPU Ray gives it"),
    (["--device", "cuda"], {"workers": 2, "gpus_per_worker": 0}, "model.device=cuda with ray gpus_per_worker=0 "
     "cannot work: the workers see no GPU"),
])
def test_unworkable_worker_settings_exit_2_with_one_line(tmp_path, tiny_model_dir, imdb_dir, capsys, args,
                                                        ray_section, words):
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir)
    if ray_section is not None:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "ray": ray_section}))
    assert main(["tune", str(path), "--out", str(tmp_path / "out")] + args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "study.sqlite3").exists()  # refused before the search began


def states(database: Path) -> list[str]:
    """The trials' states, read as another process sees the study while it runs."""
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as conn:
            return [s for (s,) in conn.execute("SELECT state FROM trials")]
    except sqlite3.OperationalError:  # its tables not created yet, or locked for a moment
        return []


@pytest.mark.slow
def test_a_killed_driver_leaves_its_trials_to_be_redone_once(tmp_path, tiny_model_dir, imdb_dir):
    """kill -9 the driver of `peftlab tune --workers 2` while trials run; the same command ends the search."""
    path = write_tune_yaml(tmp_path, tiny_model_dir, imdb_dir, trials=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peftlab", "tune", str(path), "--out", str(out), "--quiet", "--workers", "2"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1",
           "PEFTLAB_PROGRESS": "0"}
    # Its own session: the Ray processes it starts share its process group, ended below with it.
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:
            seen = states(out / "study.sqlite3")
            if seen.count("RUNNING") >= 1 and seen.count("COMPLETE") + seen.count("PRUNED") >= 1:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the search ended before the kill"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # what Ray left of the killed driver's local cluster
        except ProcessLookupError:
            pass
    cut = [t.number for t in study_of(out).trials if t.state.name == "RUNNING"]
    assert cut
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "was cut off by a kill: redone" in done.stdout
    trials = study_of(out).trials
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 4 and all(t.state.name != "FAIL" or t.number in cut for t in trials)
    for number in cut:  # each cut-off trial is FAIL (not counted), and its parameters ran once more
        assert trials[number].state.name == "FAIL" and "reason" not in trials[number].user_attrs
        redos = [t for t in trials if t.user_attrs.get("redo_of") == number]
        if len(trials[number].params) < 2:  # killed between asking the trial and drawing its parameters:
            assert not redos                # nothing of it ran, and there is nothing to redo
            continue
        [redo] = redos
        assert redo in counted and redo.params == trials[number].params
    keys = [t.user_attrs["cell_key"] for t in counted]
    assert len(set(keys)) == 4
    with ResultsStore(out / "results.sqlite") as store:
        cells = {c.key: c for c in store.cells()}
    assert all(cells[k].status in ("finished", "failed") for k in keys)
    assert [c.status for c in cells.values()].count("running") == 0
    assert json.loads((out / "best.json").read_text())["trial"] in [t.number for t in counted]
