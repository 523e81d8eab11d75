"""A running sweep's store can be read at any time: reports of it show finished and running cells, and the
readers neither block nor damage the writer (issue 14)."""

import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from peftlab.experiments.store import ResultsStore
from peftlab.report import write_report
from peftlab.report.tables import build_tables

pytestmark = pytest.mark.slow


def test_reports_of_a_store_being_written_see_its_cells_and_leave_it_intact(tiny_model_dir, imdb_dir, tmp_path):
    config = {"model": {"name": str(tiny_model_dir), "dtype": "fp32"},
              "data": {"source": str(imdb_dir), "n_test": 8}, "prompt": {"max_input_tokens": 32},
              "train": {"epochs": 1, "batch_size": 2, "select_on": "test"},
              "grid": {"data.n_train": [4, 8, 12], "train.seed": [0, 1]}}
    path, store = tmp_path / "live.yaml", tmp_path / "live.sqlite"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PEFTLAB_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "sweep", str(path), "--store", str(store), "--out",
                             str(tmp_path / "cells"), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reads, seen_running, seen_finished, deadline = 0, False, set(), time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if not store.is_file():
            time.sleep(0.05)
            continue
        try:
            with ResultsStore(store) as reader:
                tables = build_tables(reader)
            statuses = {c.key: c.status for t in tables for c in t.cells}  # one query: one snapshot
        except Exception as exc:  # a store being created: only its first instants may not have the schema yet
            assert "schema" in str(exc) or "no such table" in str(exc) or "not a peftlab" in str(exc), exc
            continue
        reads += 1
        seen_running |= "running" in statuses.values()
        seen_finished |= {k for k, s in statuses.items() if s == "finished"}
        if reads % 10 == 0:
            write_report(store, tmp_path / "report", plots=False)  # the whole report, while it runs
            text = (tmp_path / "report" / "report.md").read_text()
            assert "peftlab results" in text
        if "running" in statuses.values():  # the report marks the running cell as running
            assert any(e.unfinished for t in tables for e in t.entries.values())
            assert sum(e.unfinished for t in tables for e in t.entries.values()) == \
                list(statuses.values()).count("running")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "6 cells run" in out.decode()
    assert reads >= 20 and seen_running and seen_finished  # read often, and while cells were running
    conn = sqlite3.connect(store)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*), SUM(status = 'finished'), SUM(attempts) FROM cells").fetchone() == (6, 6, 6)
    finally:
        conn.close()
