"""Sweeps on the tiny model: grid expansion, the results store, the runner, kill -9 and restart."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.cli import main
from peftlab.config import build_config
from peftlab.errors import PeftlabError
from peftlab.experiments import BaseModelChanged, ResultsStore, cell_key, load_sweep, run_sweep
from peftlab.experiments.runner import base_fingerprint, run_cell
from peftlab.experiments.store import SCHEMA_VERSION
from peftlab.models import load_base_model
from peftlab.runs import load_task
from peftlab.train.loop import TrainingDiverged


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model's matrices are too small to share among threads: on a busy 2-core machine two
    # threads make a cell ~10x slower (0.37 s vs 3.5 s measured), one thread keeps this file fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sweep(path: Path, model_dir, data_dir, grid, **sections) -> Path:
    config = {"model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
              "data": {"source": str(data_dir), "n_test": 12}, "prompt": {"max_input_tokens": 40},
              "method": {"method": "lora", "lora_r": 4},
              "train": {"epochs": 1, "lr": 1e-2, "batch_size": 4, "select_on": "test"}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    if grid is not None:
        config["grid"] = grid
    path.write_text("# peftlab sweep " + path.name + "\n" + yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture()
def sweep_yaml(tmp_path, tiny_model_dir, imdb_dir):
    return write_sweep(tmp_path / "tiny.yaml", tiny_model_dir, imdb_dir,
                       {"data.n_train": [8, 16], "method.lora_dropout": [0.0, 0.1]})


# -- grid expansion --------------------------------------------------------------------------------

def test_grid_expands_into_the_cartesian_product_with_stable_keys(sweep_yaml, tmp_path):
    sweep = load_sweep(sweep_yaml, out=tmp_path / "out")
    assert sweep.name == "tiny" and len(sweep.cells) == 4
    assert [(c.params["data.n_train"], c.params["method.lora_dropout"]) for c in sweep.cells] == \
        [(8, 0.0), (8, 0.1), (16, 0.0), (16, 0.1)]                 # the first key varies slowest
    assert sweep.cells[3].config.data.n_train == 16 and sweep.cells[3].config.method.lora_dropout == 0.1
    assert sweep.cells[0].config.method.lora_r == 4                 # the base config holds for every cell
    assert len({c.key for c in sweep.cells}) == 4
    again = load_sweep(sweep_yaml, out=tmp_path / "elsewhere")
    assert [c.key for c in again.cells] == [c.key for c in sweep.cells]  # the key ignores where runs go
    for cell in sweep.cells:
        folder = Path(cell.config.out)
        assert folder.parent == tmp_path / "out" and folder.name.startswith(cell.key)


def test_cell_key_changes_with_every_setting_but_not_with_out_or_resume():
    base = build_config({"data.n_train": 50})
    assert cell_key(base) == cell_key(build_config({"data.n_train": 50, "out": "x", "train.resume": "true"}))
    assert cell_key(base) != cell_key(build_config({"data.n_train": 50, "train.lr": 1e-3}))
    assert cell_key(base) != cell_key(build_config({"data.n_train": 50, "data.data_seed": 1}))


def test_a_local_path_is_the_same_run_however_it_is_spelled(tmp_path, tiny_model_dir, imdb_dir, monkeypatch):
    # results/study/README.md: a resumed sweep given `../shared/...` for a store written with `/work/shared/...`
    # found every finished cell "new" and would have run the grid again.
    monkeypatch.chdir(imdb_dir.parent)
    relative = os.path.relpath(imdb_dir, tmp_path / "elsewhere")  # ../<data folder>, from a folder beside it
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    absolute = build_config({"data.source": str(imdb_dir), "model.name": str(tiny_model_dir), "data.n_train": 8})
    monkeypatch.chdir(tmp_path / "elsewhere")
    spelled = build_config({"data.source": relative, "model.name": os.path.relpath(tiny_model_dir),
                            "data.n_train": 8})
    assert spelled.data.source != absolute.data.source                  # the control: two spellings
    assert cell_key(spelled) == cell_key(absolute)
    assert cell_key(build_config({"data.source": relative + "-other", "data.n_train": 8})) != cell_key(absolute)
    # names that are no local path stay names: the alias and a hub id
    assert cell_key(build_config({"data.source": "imdb"})) != cell_key(build_config({"data.source": "stanfordnlp/imdb"}))


def test_a_resumed_sweep_finds_its_cells_under_another_spelling_of_the_data(tmp_path, tiny_model_dir, imdb_dir,
                                                                           monkeypatch):
    path = write_sweep(tmp_path / "spell.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8]})
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        first = run_sweep(load_sweep(path, out=tmp_path / "out"), store, log=lambda _: None)
        assert len(first.ran) == 1
        monkeypatch.chdir(tmp_path)
        again = run_sweep(load_sweep(path, {"data.source": os.path.relpath(imdb_dir)}, out=tmp_path / "out"),
                          store, log=lambda _: None, run=lambda *a: pytest.fail("a finished cell ran again"))
        assert again.skipped == first.ran and not again.ran


@pytest.mark.parametrize("grid, base, message", [
    ({"data.ntrain": [50]}, {}, "unknown grid key 'data.ntrain'"),
    ({"n_train": [50]}, {}, r"did you mean data.n_train"),
    ({"data.n_train": []}, {}, "empty list"),
    ({}, {}, "the grid is empty"),
    (None, {}, "the grid is empty"),
    ({"data.n_train": 50}, {}, "must hold a list"),
    ({"data.n_train": [[50, 150]]}, {}, "a list where a single value is needed"),
    ({"data.n_train": [50, 50]}, {}, "repeats a value"),
    ({"method.lora_dropout": [0.1, 1.5]}, {}, r"cell method.lora_dropout=1.5: method.lora_dropout=1.5 must be"),
    ({"method.lora_r": [4]}, {"data": {"n_train": [50, 150]}}, "takes a single value; to sweep it, move it under grid"),
    ({"method.lora_r": [4]}, {"sweep": {"rows": "data.n_train"}}, "sweep.rows=data.n_train is not a grid key"),
    ({"method.lora_r": [4]}, {"sweep": {"colour": "x"}}, "unknown key 'sweep.colour'"),
])
def test_bad_grids_are_refused_with_a_clear_message(tmp_path, grid, base, message):
    path = tmp_path / "bad.yaml"
    config = {"data": {"n_train": 50}, **base, "grid": grid}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PeftlabError, match=message):
        load_sweep(path)


def test_a_flag_naming_a_grid_key_runs_only_that_value(sweep_yaml):
    sweep = load_sweep(sweep_yaml, {"data.n_train": "16", "train.epochs": "3"})
    assert [c.params["data.n_train"] for c in sweep.cells] == [16, 16]
    assert all(c.config.train.epochs == 3 for c in sweep.cells)
    full = load_sweep(sweep_yaml, {"train.epochs": "3"})
    assert {c.key for c in sweep.cells} < {c.key for c in full.cells}  # the same cells as in the full grid


def test_training_sets_are_nested_across_n_and_every_cell_has_the_same_test_reviews(tmp_path, tiny_model_dir,
                                                                                    imdb_dir, tiny):
    _, tokenizer = tiny
    path = write_sweep(tmp_path / "nested.yaml", tiny_model_dir, imdb_dir,
                       {"data.n_train": [4, 8, 16, "all"], "method.virtual_tokens": [2, 4]},
                       method={"method": "prompt-tuning"})
    sweep = load_sweep(path)
    tasks = [(c.config.data.n_train, load_task(c.config, tokenizer)) for c in sweep.cells]  # as run_train does
    test_ids = {tuple(e.id for e in task.test) for _, task in tasks}
    assert len(test_ids) == 1 and len(next(iter(test_ids))) == 12
    train_ids = {n: {e.id for e in task.train} for n, task in tasks}
    assert train_ids[4] < train_ids[8] < train_ids[16] < train_ids[None]
    assert len(train_ids[None]) == 24  # 'all': the whole training split


# -- the results store -----------------------------------------------------------------------------

def test_store_round_trip(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultsStore(path, writer=True) as store:
        store.register_sweep("s", "s.yaml", "peftlab sweep s.yaml", {"data.n_train": [50, 150]}, {"title": "t"},
                             [("k1", {"data.n_train": 50}), ("k2", {"data.n_train": 150}), ("k3", {})])
        store.start("k1", {"data": {"n_train": 50}}, "out/k1")
        store.finish("k1", {"accuracy": 0.75, "per_epoch": [{"epoch": 1}], "best_epoch": 1})
        store.start("k2", {"data": {"n_train": 150}}, "out/k2")
        store.fail("k2", "TrainingDiverged: loss is nan")
        store.start("k2", {"data": {"n_train": 150}}, "out/k2")  # a retry
        with pytest.raises(RuntimeError, match="never run again"):
            store.start("k1", {}, "out/k1")
    with ResultsStore(path) as store:  # read-only
        cells = {c.key: c for c in store.cells("s")}
        assert cells["k1"].status == "finished" and cells["k1"].record["accuracy"] == 0.75
        assert cells["k1"].params == {"data.n_train": 50} and cells["k1"].config == {"data": {"n_train": 50}}
        assert cells["k2"].status == "running" and cells["k2"].attempts == 2 and cells["k2"].reason is None
        assert cells["k3"].status == "pending"
        [sweep] = store.sweeps()
        assert (sweep.name, sweep.command, sweep.spec) == ("s", "peftlab sweep s.yaml", {"title": "t"})
        with pytest.raises(RuntimeError, match="read-only"):
            store.fail("k2", "x")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize("kind, message", [
    ("foreign", "not a peftlab results store"),
    ("newer", "newer peftlab"),
    ("older", "older store schema"),
    ("text", "not a peftlab results store"),
])
def test_a_foreign_or_other_schema_store_is_refused_and_left_untouched(tmp_path, kind, message):
    path = tmp_path / "x.sqlite"
    if kind == "text":
        path.write_text("hello, not a database\n" * 100)
    elif kind == "foreign":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE photos (id INTEGER, name TEXT)")
    else:
        ResultsStore(path, writer=True).close()
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE peftlab_schema SET version = ?", (SCHEMA_VERSION + (1 if kind == "newer" else -1),))
    before = _bytes(path)
    for writer in (True, False):
        with pytest.raises(PeftlabError, match=message):
            ResultsStore(path, writer=writer)
    assert _bytes(path) == before


def test_two_writers_cannot_share_a_store_and_a_reader_can(tmp_path, sweep_yaml, capsys):
    path = tmp_path / "r.sqlite"
    first = ResultsStore(path, writer=True)
    try:
        with pytest.raises(PeftlabError, match=rf"being written by another sweep \(pid {os.getpid()}"):
            ResultsStore(path, writer=True)
        assert main(["sweep", str(sweep_yaml), "--store", str(path), "--quiet"]) == 2  # the CLI: one line
        err = capsys.readouterr().err.strip()
        assert "being written by another sweep" in err and "\n" not in err
        with ResultsStore(path) as reader:
            assert reader.cells() == []
    finally:
        first.close()
    ResultsStore(path, writer=True).close()  # the lock went with the first writer


# -- the runner --------------------------------------------------------------------------------------

def counting_loader(calls: list):
    def load(model_config):
        calls.append(model_config.name)
        return load_base_model(model_config)
    return load


def test_each_model_is_loaded_once_and_left_untouched_by_lora_and_prompt_tuning(tmp_path, tiny_model_dir, imdb_dir):
    other = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_dir, other)
    path = write_sweep(tmp_path / "models.yaml", tiny_model_dir, imdb_dir,
                       {"model.name": [str(tiny_model_dir), str(other)], "method.method": ["lora", "prompt-tuning"]},
                       data={"n_train": 8}, method={"virtual_tokens": 4})
    calls = []
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        outcome = run_sweep(load_sweep(path, out=tmp_path / "out"), store, log=lambda _: None,
                            load_model=counting_loader(calls))
        assert sorted(calls) == sorted([str(tiny_model_dir), str(other)]) and outcome.model_loads == 2
        assert len(outcome.ran) == 4 and not outcome.failed  # every cell checked the base fingerprint
        trainable = [c.record["trainable_parameters"] for c in store.cells("models")]
        assert all(t > 0 for t in trainable) and len(set(trainable)) == 2


PEAK_SCRIPT = """
import json, sys
import torch
from peftlab.experiments import ResultsStore, load_sweep, run_sweep
def rss():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
torch.set_num_threads(1)
before = rss()
big = torch.ones(1000 * 2**20 // 4)   # touched: resident
del big
high_water = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
small = [torch.ones(16 * 1024) for _ in range(10000)]  # 640 MB of 64 KB chunks: glibc's heap, below mmap's threshold
last = small[-1]  # live at the heap's top: the heap cannot shrink, the freed pages under it stay resident
del small
retained = rss()
with ResultsStore(sys.argv[2], writer=True) as store:
    run_sweep(load_sweep(sys.argv[1], out=sys.argv[3]), store, log=lambda _: None)
    peaks = [c.record["peak_memory_mb"] for c in store.cells("tiny")]
    scopes = [c.record["peak_memory_scope"] for c in store.cells("tiny")]
    starts = [c.record["memory_at_cell_start_mb"] for c in store.cells("tiny")]
print(json.dumps({"before": before, "high_water": high_water, "retained": retained, "peaks": peaks, "rss": rss(),
                  "scopes": scopes, "starts": starts}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="Linux's peak-RSS reset is needed")
def test_each_cell_records_its_own_peak_memory_not_the_sweeps(tmp_path, sweep_yaml):
    """On a CPU a cell's peak_memory_mb is the process's peak resident memory, and one sweep process runs
    every cell: without a reset before each cell, every record would hold the highest peak of any cell
    (or anything else the process did) before it, which is what the method comparison's memory column
    showed. 1000 MB touched and freed before the sweep must not appear in any cell's figure. In a fresh
    process: this one's resident memory depends on the tests that ran before. Run from a parent holding 2 GB,
    as pytest in the full suite holds gigabytes: getrusage's peak would carry the parent's over to the child.
    Then 640 MB freed in small chunks that glibc keeps resident, as a cell's small tensors are: no cell's
    peak may include them either (the reset trims the heap first)."""
    ballast = torch.ones(2 * 2**30 // 4)  # the parent's resident memory at the fork
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(sweep_yaml), str(tmp_path / "r.sqlite"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    del ballast
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["high_water"] > m["before"] + 900, m          # the 1000 MB did raise the process's peak
    assert m["retained"] > m["before"] + 500, m           # the freed small chunks stayed resident
    assert len(m["peaks"]) == 4 and all(m["rss"] * 0.5 < p < m["high_water"] - 500 for p in m["peaks"]), m
    assert all(p < m["retained"] - 400 for p in m["peaks"]), m
    assert m["scopes"] == ["cell"] * 4  # what the report reads to trust the figure as the cell's own
    # the resident set each count started from: trimmed (no freed 640 MB in it), and under the cell's peak
    assert all(m["before"] * 0.5 < s < m["retained"] - 400 and s <= p for s, p in zip(m["starts"], m["peaks"])), m


def test_failed_cells_are_recorded_with_their_reason_and_the_sweep_goes_on(tmp_path, tiny_model_dir, imdb_dir):
    path = write_sweep(tmp_path / "f.yaml", tiny_model_dir, imdb_dir,
                       {"data.n_train": [8, 15], "train.seed": [0, 1, 2, 3]})
    injected = {1: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                2: OSError(errno.ENOSPC, "No space left on device"),
                3: TrainingDiverged("training diverged at epoch 1, batch 1: the loss is nan")}

    def run(cell, model, tokenizer, progress):
        if cell.params["data.n_train"] == 8 and cell.params["train.seed"] in injected:
            raise injected[cell.params["train.seed"]]
        return run_cell(cell, model, tokenizer, progress)  # N=15 fails by itself: 15 reviews cannot be balanced

    calls = []
    sweep = load_sweep(path, out=tmp_path / "out")
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        outcome = run_sweep(sweep, store, log=lambda _: None, load_model=counting_loader(calls), run=run)
        assert calls == [str(tiny_model_dir)] and len(outcome.ran) == 1 and len(outcome.failed) == 7
        reasons = {(c.params["data.n_train"], c.params["train.seed"]): c.reason for c in store.cells("f")}
        assert reasons[(8, 0)] is None
        assert reasons[(8, 1)].startswith("out of memory") and reasons[(8, 2)].startswith("disk full")
        assert reasons[(8, 3)].startswith("TrainingDiverged: training diverged")
        assert all("cannot be split into 2 balanced classes" in reasons[(15, s)] for s in range(4))
        # Run again: finished and failed cells are kept; --retry-failed tries the failed ones again.
        again = run_sweep(sweep, store, log=lambda _: None, run=run)
        assert len(again.skipped) == 8 and not again.ran and not again.failed
        retried = run_sweep(sweep, store, log=lambda _: None, run=run, retry_failed=True)
        assert len(retried.failed) == 7 and {c.attempts for c in store.cells("f") if c.status == "failed"} == {2}


def test_an_unexpected_error_stops_the_sweep_and_the_next_sweep_redoes_the_cell(tmp_path, sweep_yaml):
    def buggy(cell, model, tokenizer, progress):
        raise ZeroDivisionError("a bug")

    sweep = load_sweep(sweep_yaml, {"data.n_train": "8", "method.lora_dropout": "0.0"}, out=tmp_path / "out")
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        with pytest.raises(ZeroDivisionError):
            run_sweep(sweep, store, log=lambda _: None, run=buggy)
        assert store.cell(sweep.cells[0].key).status == "running"  # unfinished, not failed
        outcome = run_sweep(sweep, store, log=lambda _: None)
        assert outcome.ran == [sweep.cells[0].key] and store.cell(sweep.cells[0].key).attempts == 2


def test_a_cell_that_changes_the_base_model_stops_the_sweep(tmp_path, sweep_yaml):
    def leaky(cell, model, tokenizer, progress):
        record = run_cell(cell, model, tokenizer, progress)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # as a merged, never unloaded adapter would
        return record

    def leaky_failure(cell, model, tokenizer, progress):
        leaky(cell, model, tokenizer, progress)
        raise TrainingDiverged("diverged")

    sweep = load_sweep(sweep_yaml, {"data.n_train": "8"}, out=tmp_path / "out")
    calls = []
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        # A failed cell that changed the base: recorded, and the base is loaded again for the next cell.
        outcome = run_sweep(sweep, store, log=lambda _: None, run=leaky_failure, load_model=counting_loader(calls))
        assert len(outcome.failed) == 2 and len(calls) == 2
        with pytest.raises(BaseModelChanged, match="changed the shared base model"):
            run_sweep(sweep, store, log=lambda _: None, run=leaky, retry_failed=True)
        assert "changed the shared base model" in store.cell(sweep.cells[0].key).reason


def test_the_fingerprint_sees_a_change_of_any_tensor(tiny):
    model, _ = tiny
    before = base_fingerprint(model)
    with torch.no_grad():
        list(model.parameters())[-1].view(-1)[0] += 0.5  # the first element is always in the sample
    assert base_fingerprint(model) != before


def test_finished_cells_survive_peftlab_gaining_a_config_field(tmp_path, sweep_yaml):
    sweep = load_sweep(sweep_yaml, {"data.n_train": "8"}, out=tmp_path / "out")
    old_style, changed = sweep.cells[0].config.to_dict(), sweep.cells[1].config.to_dict()
    del old_style["eval"]["max_batch_tokens"]  # as written by a peftlab without that field (default now)
    del changed["eval"]["max_batch_tokens"]
    changed["method"]["lora_alpha"] = 32.0     # ... but this run had other settings
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        for key, config in (("old-key-0", old_style), ("old-key-1", changed)):
            store.start(key, config, "elsewhere")
            store.finish(key, {"accuracy": 0.5})
        ran = []
        outcome = run_sweep(sweep, store, log=lambda _: None,
                            run=lambda cell, *a: ran.append(cell.key) or {"accuracy": 0.5})
        assert outcome.skipped == ["old-key-0"] and ran == [sweep.cells[1].key]
        assert [c.key for c in store.cells("tiny") if c.params["data.n_train"] == 8] == ["old-key-0",
                                                                                        sweep.cells[1].key]


# -- kill -9 in the middle of a cell ---------------------------------------------------------------

def store_counts(path: Path) -> dict:
    """Status counts read as `peftlab report` would, while the sweep writes (WAL readers never block)."""
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return dict(conn.execute("SELECT status, COUNT(*) FROM cells GROUP BY status").fetchall())
    except sqlite3.OperationalError:  # the schema is not there yet
        return {}


def test_a_sweep_killed_with_sigkill_mid_cell_finishes_every_cell_exactly_once(tmp_path, tiny_model_dir, imdb_dir):
    path = write_sweep(tmp_path / "kill.yaml", tiny_model_dir, imdb_dir,
                       {"data.n_train": [8, 16], "method.lora_dropout": [0.0, 0.1]},
                       data={"n_test": 24}, train={"epochs": 2})
    store, out = tmp_path / "r.sqlite", tmp_path / "out"
    command = [sys.executable, "-m", "peftlab", "sweep", str(path), "--store", str(store), "--out", str(out), "--quiet"]
    env = {**os.environ, "PEFTLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        counts = store_counts(store)
        if counts.get("finished", 0) >= 1 and counts.get("running", 0) == 1:
            break
        time.sleep(0.01)
    time.sleep(0.1)  # well inside the cell: it trains for two epochs and evaluates twice
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    with ResultsStore(store) as reader:
        before = {c.key: c for c in reader.cells("kill")}
    killed = [k for k, c in before.items() if c.status == "running"]
    assert len(killed) == 1 and 1 <= sum(c.status == "finished" for c in before.values()) <= 2

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with ResultsStore(store) as reader:
        after = {c.key: c for c in reader.cells("kill")}
        all_rows = reader.cells()
    assert len(after) == 4 and len(all_rows) == 4 and all(c.status == "finished" for c in after.values())
    assert after[killed[0]].attempts == 2
    for key, cell in before.items():
        if cell.status == "finished":  # kept, not run again
            assert after[key].attempts == 1 and after[key].finished_at == cell.finished_at
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name[:12] for p in folders] == sorted(after)  # one run folder per cell, named by its key
    ids = {tuple(json.loads(line)["id"] for line in (p / "predictions.jsonl").read_text().splitlines())
           for p in folders}
    assert len(ids) == 1  # every cell scored on the same test reviews

    # The store feeds the report, and the dry run now knows what is done.
    assert main(["report", str(store), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| N | d=0.0 | d=0.1 |" in md and md.count("\n| 8 |") == 1 and md.count("\n| 16 |") == 1


def test_dry_run_lists_cells_with_their_cost_and_creates_no_store(sweep_yaml, tmp_path, capsys):
    store = tmp_path / "none.sqlite"
    assert main(["sweep", str(sweep_yaml), "--store", str(store), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not store.exists()
    lines = text.splitlines()
    assert lines[1].split()[:5] == ["#", "cell", "status", "N", "d"] and len(lines) == 7
    assert "to run: 4 cells" in text and "speed: model size unknown, SmolLM2's cpu figure assumed" in text
    # (8 + 16 reviews) x 1 epoch + 4 cells x 12 test reviews, at most (53 + 40) tokens each
    assert "to run: 4 cells, 9k tokens" in text


def test_a_sweep_run_one_row_at_a_time_keeps_the_whole_table(tmp_path, sweep_yaml):
    """`--n-train 16` runs one row; the store still holds the sweep as the YAML defines it, so the report
    shows the rows run before (results/study was run row by row, and a row run dropped the others)."""
    from peftlab.report.tables import build_tables

    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        for n in ("8", "16"):
            run_sweep(load_sweep(sweep_yaml, {"data.n_train": n}, out=tmp_path / "out"), store, log=lambda _: None)
        assert len(store.cells("tiny")) == 4 and all(c.status == "finished" for c in store.cells("tiny"))
        [table] = build_tables(store)
        assert table.rows == [8, 16] and all(table.entries[(r, c)].records for r in table.rows for c in table.cols)
        # a value the YAML's grid lacks joins the table beside the YAML's own, none is lost
        run_sweep(load_sweep(sweep_yaml, {"data.n_train": "12", "method.lora_dropout": "0.0"}, out=tmp_path / "out"),
                  store, log=lambda _: None)
        [table] = build_tables(store)
        assert table.rows == [8, 16, 12] and sum(c.status == "finished" for c in store.cells("tiny")) == 5
    dry = load_sweep(sweep_yaml, {"data.n_train": "16"})
    assert [c.params["data.n_train"] for c in dry.cells] == [16, 16] and len(dry.members) == 4


def test_a_flag_that_changes_every_cell_says_which_finished_cells_leave_the_table(tmp_path, tiny_model_dir, imdb_dir,
                                                                                  capsys):
    # --seed on a sweep whose grid has no train.seed changes every cell: the table then lists the new cells
    # and the user is told, once, which finished ones it no longer shows (they stay in the store).
    sweep_yaml = write_sweep(tmp_path / "tiny.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8]})
    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        run_sweep(load_sweep(sweep_yaml, out=tmp_path / "out"), store, log=lambda _: None)
        [first] = store.cells("tiny")
        assert "note:" not in capsys.readouterr().err
        run_sweep(load_sweep(sweep_yaml, {"train.seed": "1"}, out=tmp_path / "out"), store, log=lambda _: None)
        err = capsys.readouterr().err
        assert f"note: 1 finished cells of sweep tiny ({first.key}) are not cells of this run's settings" in err
        [second] = store.cells("tiny")
        assert second.key != first.key and store.status(first.key) == "finished"
        # with train.seed in the grid, the same flag runs one value of it and the table keeps both
        seeds = write_sweep(tmp_path / "seeds.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [8], "train.seed": [0, 1]},
                            sweep={"name": "tiny"})
        run_sweep(load_sweep(seeds, {"train.seed": "1"}, out=tmp_path / "out"), store, log=lambda _: None)
        assert "note:" not in capsys.readouterr().err
        assert [c.key for c in store.cells("tiny")] == [first.key, second.key]


def test_the_command_kept_for_a_table_run_row_by_row_runs_the_whole_table(tmp_path, sweep_yaml):
    store_path = tmp_path / "r.sqlite"
    argv = ["sweep", str(sweep_yaml), "--n-train", "8", "--lora-dropout", "0.0", "--n-test", "8",
            "--store", str(store_path), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    with ResultsStore(store_path) as store:
        [sweep] = store.sweeps()
    assert "--n-test 8" in sweep.command                          # an override of every cell stays
    assert "--n-train" not in sweep.command and "--lora-dropout" not in sweep.command  # the row's flags do not


# -- stores written apart, merged ------------------------------------------------------------------

def test_rows_run_into_two_stores_merge_into_the_whole_table_and_a_sweep_on_it_runs_nothing(tmp_path, sweep_yaml,
                                                                                              capsys):
    """One row on one machine, the other row elsewhere (a GPU box, another worktree): merged, they are the
    table, and the merged store knows every cell is done."""
    from peftlab.report.tables import build_tables

    stores = {n: tmp_path / f"row{n}.sqlite" for n in ("8", "16")}
    for n, path in stores.items():
        assert main(["sweep", str(sweep_yaml), "--n-train", n, "--store", str(path), "--out", str(tmp_path / n),
                     "--quiet"]) == 0
    rows = {}
    for path in stores.values():
        with ResultsStore(path) as store:
            rows.update({c.key: c for c in store.cells() if c.status == "finished"})
    assert len(rows) == 4
    capsys.readouterr()
    merged = tmp_path / "merged.sqlite"
    assert main(["merge-stores", str(merged), *map(str, stores.values())]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("2 finished cells added, 0 already finished there (kept)" in x for x in lines)
    with ResultsStore(merged) as store:
        cells = {c.key: c for c in store.cells("tiny")}
        [table] = build_tables(store)
    assert set(cells) == set(rows) and all(c.status == "finished" for c in cells.values())
    for key, cell in cells.items():  # copied as they were: record, run folder, attempts, times
        source = rows[key]
        assert (cell.record, cell.out, cell.attempts, cell.finished_at) == (source.record, source.out, source.attempts,
                                                                           source.finished_at)
    assert table.rows == [8, 16] and all(table.entries[(r, c)].records for r in table.rows for c in table.cols)

    assert main(["sweep", str(sweep_yaml), "--store", str(merged), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    assert "0 cells run, 4 already done" in capsys.readouterr().out
    assert main(["merge-stores", str(merged), str(stores["8"])]) == 0  # again: nothing added, nothing replaced
    assert "0 finished cells added, 2 already finished there (kept), 0 sweeps added" in capsys.readouterr().out


def test_a_merge_finishes_unfinished_cells_never_replaces_a_finished_one_and_waits_for_a_writer(tmp_path, capsys):
    into, other = tmp_path / "into.sqlite", tmp_path / "other.sqlite"
    config = {"model": {"name": "m"}}
    with ResultsStore(into, writer=True) as store:
        store.start("running", config, "out/r")                       # cut off here, finished elsewhere
        store.start("failed", config, "out/f")
        store.fail("failed", "out of memory")                         # failed here, finished elsewhere
        store.start("done", config, "out/d")
        store.finish("done", {"accuracy": 0.75, "adapter_sha256": "aa"})  # finished in both, differently
    with ResultsStore(other, writer=True) as store:
        for key in ("running", "failed", "done"):
            store.start(key, config, f"gpu/{key}")
            store.finish(key, {"accuracy": 0.5, "adapter_sha256": "bb"})
        store.start("new-running", config, "gpu/n")                   # unfinished and unknown there: copied
        store.start("new-done", config, "gpu/nd")
        store.finish("new-done", {"accuracy": 0.6})
    with ResultsStore(into, writer=True) as target, ResultsStore(other) as source:
        counts = target.merge_from(source)
        after = {c.key: c for c in target.cells()}
    assert (counts.added, counts.kept, counts.differing, counts.unfinished) == (3, 1, 1, 1)
    assert {k: (c.status, c.out) for k, c in after.items()} == {
        "running": ("finished", "gpu/running"), "failed": ("finished", "gpu/failed"), "done": ("finished", "out/d"),
        "new-running": ("running", "gpu/n"), "new-done": ("finished", "gpu/nd")}
    assert after["done"].record == {"accuracy": 0.75, "adapter_sha256": "aa"} and after["failed"].reason is None

    writer = ResultsStore(into, writer=True)  # a sweep writing INTO: refused in one line, nothing changed
    try:
        assert main(["merge-stores", str(into), str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert "being written by another sweep" in err and "\n" not in err
    finally:
        writer.close()
    assert main(["merge-stores", str(into), str(into)]) == 2
    assert "is the store merged into" in capsys.readouterr().err


@pytest.mark.parametrize("bf16_on_resume", [False, True])
def test_a_cut_off_cell_of_another_precision_starts_again_and_keeps_its_old_folder(bf16_on_resume, tmp_path,
                                                                                   tiny_model_dir, imdb_dir,
                                                                                   monkeypatch):
    """`model.dtype: auto` is fp32 on one CPU and bf16 on the next (results/inflight.py carries cut-off cells
    between them): a cell cut off in fp32 resumes on an fp32 machine, and runs again from the start in bf16."""
    import peftlab.models.loading as loading
    import peftlab.train.loop as loop

    class Killed(BaseException):
        pass

    path = write_sweep(tmp_path / "auto.yaml", tiny_model_dir, imdb_dir, {"data.n_train": [16]},
                       model={"dtype": "auto"}, train={"batch_size": 2, "checkpoint_every": 1})
    real, calls = loop.batch_loss, {"n": 0}

    def batch_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return real(*args, **kwargs)

    with ResultsStore(tmp_path / "r.sqlite", writer=True) as store:
        monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
        with monkeypatch.context() as m:
            m.setattr(loop, "batch_loss", batch_loss)
            with pytest.raises(Killed):
                run_sweep(load_sweep(path, out=tmp_path / "out"), store, log=lambda _: None)
        [folder] = (tmp_path / "out").iterdir()
        assert json.loads((folder / "checkpoint" / "state.json").read_text())["fingerprint"]["precision"] == "float32"
        monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: bf16_on_resume)
        run_sweep(load_sweep(path, {"train.resume": True}, out=tmp_path / "out"), store, log=lambda _: None)
        [cell] = store.cells()
    assert cell.status == "finished"
    assert cell.record["model"]["dtype"] == ("bfloat16" if bf16_on_resume else "float32")
    if bf16_on_resume:  # from the start, the cut-off run kept beside it
        assert cell.record["resumed_from"] is None
        aside = folder.with_name(folder.name + ".replaced-1")
        assert json.loads((aside / "checkpoint" / "state.json").read_text())["fingerprint"]["precision"] == "float32"
    else:
        assert cell.record["resumed_from"] == {"epoch": 1, "batch": 4}
