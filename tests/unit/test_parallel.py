"""Parallel sweeps on a local Ray cluster of two CPU workers: the same cells and results as a serial sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from peftlab.cli import main
from peftlab.experiments import ResultsStore, load_sweep, run_sweep
from peftlab.experiments.grid import RayOptions
from peftlab.experiments.parallel import run_sweep_parallel
from peftlab.experiments.runner import run_cell
from peftlab.errors import PeftlabError
from tests.unit.test_experiments import write_sweep

GRID = {"data.n_train": [8, 16], "method.lora_dropout": [0.0, 0.1]}


def is_victim(cell) -> bool:
    return cell.config.data.n_train == 16 and cell.config.method.lora_dropout == 0.0


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs, started once for this file (a start costs seconds)."""
    # Functions defined in this file travel to the workers by value: they need not import the tests.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level="error")
    yield
    ray.shutdown()


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU worker runs: the serial reference is then bitwise comparable
    yield
    torch.set_num_threads(threads)


def die_once(cell, model, tokenizer, progress):
    """The victim cell's first try kills its worker process half-way (a partial file in its run folder)."""
    if is_victim(cell):
        marker = Path(cell.config.out).parent.parent / f"killed-{cell.key}"
        if not marker.exists():
            marker.touch()
            Path(cell.config.out).mkdir(parents=True, exist_ok=True)
            (Path(cell.config.out) / "half-written").write_text("lost with the worker")
            os._exit(9)  # as a kill -9 or a lost node: no exception, no clean-up
    return run_cell(cell, model, tokenizer, progress)


def always_die(cell, model, tokenizer, progress):
    if is_victim(cell):
        os._exit(9)
    return run_cell(cell, model, tokenizer, progress)


def predictions(out: str) -> list:
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


def test_two_workers_give_the_serial_results_and_a_lost_workers_cell_is_rescheduled(
        ray_cluster, one_thread, tmp_path, tiny_model_dir, imdb_dir):
    path = write_sweep(tmp_path / "par.yaml", tiny_model_dir, imdb_dir, GRID)
    serial_sweep = load_sweep(path, out=tmp_path / "serial" / "runs")
    with ResultsStore(tmp_path / "serial.sqlite", writer=True) as store:
        run_sweep(serial_sweep, store, log=lambda _: None)
        serial = {c.key: c for c in store.cells("par")}

    logs = []
    sweep = load_sweep(path, out=tmp_path / "parallel" / "runs")
    with ResultsStore(tmp_path / "parallel.sqlite", writer=True) as store:
        outcome = run_sweep_parallel(sweep, store, RayOptions(workers=2, cpus_per_worker=1), log=logs.append,
                                     run=die_once)
        cells = {c.key: c for c in store.cells("par")}
        rows = store.cells()
    victim = next(c.key for c in sweep.cells if is_victim(c))
    assert sorted(outcome.ran) == sorted(serial) and not outcome.failed
    assert len(rows) == 4 and all(c.status == "finished" for c in cells.values())
    assert cells[victim].attempts == 2 and any("died" in line and victim in line for line in logs)
    assert all(c.attempts == 1 for k, c in cells.items() if k != victim)
    assert not (Path(cells[victim].out) / "half-written").exists()  # the lost try's leftovers were cleared
    for key, cell in cells.items():
        assert cell.record["accuracy"] == serial[key].record["accuracy"]
        assert [(e["accuracy"], e["train_loss"]) for e in cell.record["per_epoch"]] == \
            [(e["accuracy"], e["train_loss"]) for e in serial[key].record["per_epoch"]]
        assert cell.record["adapter_sha256"] == serial[key].record["adapter_sha256"]  # bitwise the same adapter
        assert predictions(cell.out) == predictions(serial[key].out)
    workers = {c.record["cell"]["pid"] for c in cells.values()}
    assert len(workers) >= 2 and os.getpid() not in workers  # the cells ran in the workers ...
    assert outcome.model_loads <= len(workers)               # ... each loading the base model once


def test_a_cell_whose_workers_keep_dying_is_recorded_failed_and_the_rest_finish(ray_cluster, tmp_path,
                                                                               tiny_model_dir, imdb_dir):
    path = write_sweep(tmp_path / "dies.yaml", tiny_model_dir, imdb_dir,
                       {"data.n_train": [8, 16], "method.lora_dropout": [0.0]})
    sweep = load_sweep(path, out=tmp_path / "runs")
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        outcome = run_sweep_parallel(sweep, store, RayOptions(workers=2, cpus_per_worker=1, max_worker_losses=2),
                                     log=lambda _: None, run=always_die)
        cells = {c.params["data.n_train"]: c for c in store.cells("dies")}
    assert cells[16].status == "failed" and "Ray worker died 2 times" in cells[16].reason and cells[16].attempts == 2
    assert outcome.failed == [(cells[16].key, cells[16].reason)]
    assert outcome.ran == [cells[8].key] and cells[8].status == "finished"


def test_cli_workers_flag_and_ray_section(ray_cluster, tmp_path, tiny_model_dir, imdb_dir, capsys):
    path = write_sweep(tmp_path / "cli.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8, 16]})
    store = tmp_path / "r.sqlite"
    args = ["sweep", str(path), "--store", str(store), "--out", str(tmp_path / "runs"), "--quiet"]
    assert main(args + ["--workers", "2"]) == 0
    assert "2 to run on 2 Ray workers" in capsys.readouterr().out
    with ResultsStore(store) as reader:
        assert [c.status for c in reader.cells("cli")] == ["finished", "finished"]
    assert main(args + ["--workers", "2"]) == 0  # everything is done: nothing runs again
    assert "0 cells run, 2 already done" in capsys.readouterr().out

    text = path.read_text() + "ray:\n  workers: 0\n"
    path.write_text(text)
    assert main(args) == 2
    assert "ray workers=0: give a whole number of workers, 1 or more" in capsys.readouterr().err
    path.write_text(text.replace("workers: 0", "worker: 2"))
    assert main(args) == 2
    assert "unknown key 'ray.worker'" in capsys.readouterr().err


def test_a_worker_asking_for_more_than_the_cluster_has_is_refused(ray_cluster, tmp_path, tiny_model_dir, imdb_dir):
    path = write_sweep(tmp_path / "big.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8, 16]})
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        with pytest.raises(PeftlabError, match="asks for 1 CPUs and 1 GPUs but the Ray cluster has 2 CPUs and 0 GPUs"):
            run_sweep_parallel(load_sweep(path, out=tmp_path / "runs"), store,
                               RayOptions(workers=2, cpus_per_worker=1, gpus_per_worker=1), log=lambda _: None)


def test_the_cli_starts_and_stops_its_own_local_cluster(tmp_path, tiny_model_dir, imdb_dir):
    """What a user runs: no cluster yet, `peftlab sweep --workers 2` starts one, runs the cells, shuts it down."""
    path = write_sweep(tmp_path / "own.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8, 16]})
    store = tmp_path / "r.sqlite"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "peftlab", "sweep", str(path), "--store", str(store), "--out",
                           str(tmp_path / "runs"), "--quiet", "--workers", "2"], cwd=tmp_path, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1", "PEFTLAB_PROGRESS": "0"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 to run on 2 Ray workers" in done.stdout and "2 cells run" in done.stdout
    with ResultsStore(store) as reader:
        assert [c.status for c in reader.cells("own")] == ["finished", "finished"]


def test_a_gpu_index_no_worker_has_is_refused_before_ray_starts(tmp_path, tiny_model_dir, imdb_dir, capsys):
    path = write_sweep(tmp_path / "gpu.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8, 16]},
                       model={"device": "cuda:1"})
    store = tmp_path / "r.sqlite"
    assert main(["sweep", str(path), "--store", str(store), "--out", str(tmp_path / "runs"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.device=cuda:1 cannot work on Ray workers (--workers)" in err and err.count("\n") == 1
    with ResultsStore(store) as reader:
        assert reader.cells() == []  # refused before any cell was started
