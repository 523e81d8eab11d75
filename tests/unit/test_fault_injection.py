"""Fault injection: a sweep killed with SIGKILL at random moments, in every phase, then resumed.

A fork server (a Python process that has imported peftlab once) forks one child per attempt; the
child runs the real CLI, `peftlab sweep ...`, and the test kills it with SIGKILL at a random moment
(seeded) inside a chosen phase: loading the model, training, evaluating, or writing (atomic file
renames, checkpoints, adapters, store commits). Forking saves the ~10 s import per attempt on this
machine; the killed process is still a whole process dying between two instructions. The server
wraps a few functions to append "<pid> <phase>" to a marker file (and to sleep a few ms, so that a
phase lasts long enough to be hit); nothing else changes.

At the end every cell is present exactly once and finished, the store passes SQLite's
integrity_check and our invariants, and every cell's results equal those of an unbroken sweep.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.records import sha256_file

pytestmark = pytest.mark.slow

SERVER = r'''
import json, os, sys, time, traceback
import torch, transformers, peft                      # the ~10 s import, paid once
import peftlab.cli, peftlab.runs, peftlab.models, peftlab.records, peftlab.train.loop, peftlab.train.checkpoint
import peftlab.experiments.store

MARKS = os.environ["PEFTLAB_TEST_MARKS"]


def mark(phase, detail):
    fd = os.open(MARKS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()} {phase} {detail}\n".encode())
    os.close(fd)


def marked(phase, fn, pause, detail=lambda args: "-"):
    def wrapper(*args, **kwargs):
        mark(phase, detail(args))
        time.sleep(pause)  # widens the phase so that a random kill can land in it
        return fn(*args, **kwargs)
    return wrapper


peftlab.models.load_base_model = marked("loading", peftlab.models.load_base_model, 0.3)
peftlab.train.loop.batch_loss = marked("training", peftlab.train.loop.batch_loss, 0.03)
peftlab.runs.evaluate_examples = marked("evaluating", peftlab.runs.evaluate_examples, 0.1)
# Writing: every atomic file write (run files, checkpoints, adapter files) and every store commit.
os.replace = marked("writing", os.replace, 0.02, lambda args: os.path.basename(str(args[1])))
store = peftlab.experiments.store.ResultsStore
store.start = marked("writing", store.start, 0.02, lambda args: "store:start")
store._end = marked("writing", store._end, 0.02, lambda args: "store:" + args[2])

for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 3
        try:
            code = peftlab.cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(status), flush=True)
'''

PHASES = ("loading", "training", "evaluating", "writing")
KILLS = 16


class ForkServer:
    def __init__(self, tmp: Path):
        self.marks = tmp / "marks.txt"
        env = dict(os.environ, PEFTLAB_TEST_MARKS=str(self.marks), OMP_NUM_THREADS="1", PEFTLAB_PROGRESS="0")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def start(self, argv: list[str], log: Path) -> int:
        self.proc.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return int(line)

    def wait(self) -> int:
        """The child's wait status (os.waitpid)."""
        return json.loads(self.proc.stdout.readline())

    def phases(self, pid: int) -> list[tuple[str, str]]:
        """(phase, detail) of each mark the child `pid` made so far."""
        try:
            lines = self.marks.read_text().splitlines()
        except FileNotFoundError:
            return []
        words = [line.split(" ", 2) for line in lines]
        return [(w[1], w[2]) for w in words if len(w) == 3 and int(w[0]) == pid]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def sweep_file(tmp: Path, model_dir: Path, imdb_dir: Path) -> Path:
    config = {"model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
              "data": {"source": str(imdb_dir), "n_test": 8, "n_val": 4}, "prompt": {"max_input_tokens": 32},
              "method": {"method": "lora", "lora_r": 4},
              # resume: a killed cell goes on from its checkpoint, saved after every optimiser step
              "train": {"epochs": 2, "lr": 1e-2, "batch_size": 2, "checkpoint_every": 1, "resume": True,
                        "select_on": "test"},  # test and validation split after every epoch
              "grid": {"data.n_train": [0, 4, 8], "method.lora_dropout": [0.0, 0.1], "train.seed": [0, 1]}}
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def integrity(store: Path) -> str:
    conn = sqlite3.connect(store)  # read-write: replays a WAL a killed writer left behind
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def cells(store: Path) -> dict[str, dict]:
    """The sweep's cells through the store's own reader, after checking each is stored exactly once."""
    from peftlab.experiments import ResultsStore

    conn = sqlite3.connect(store)
    try:
        rows = conn.execute("SELECT key, COUNT(*) FROM cells GROUP BY key").fetchall()
    finally:
        conn.close()
    assert all(n == 1 for _, n in rows) and len(rows) == 12, rows
    with ResultsStore(store) as reader:
        listed = reader.cells("faults")
    assert len(listed) == len({c.key for c in listed}) == 12
    return {c.key: {"status": c.status, "record": c.record, "out": c.out, "attempts": c.attempts} for c in listed}


def outcome(record: dict) -> tuple:
    return (record["accuracy"], record.get("best_epoch"), record.get("adapter_sha256"),
            [(e["accuracy"], e["train_loss"]) for e in record.get("per_epoch", [])])


def test_a_sweep_survives_sigkill_in_every_phase(tmp_path, tiny_model_dir, imdb_dir):
    rng = random.Random(20261127)  # the kill moments; a failure names the seed's kill list below
    yaml_path = sweep_file(tmp_path, tiny_model_dir, imdb_dir)
    server = ForkServer(tmp_path)
    try:
        # The unbroken sweep, for the results every resumed cell must equal.
        ref = tmp_path / "ref"
        server.start(["sweep", str(yaml_path), "--store", str(ref / "store.sqlite"), "--out", str(ref / "runs"),
                      "--quiet"], tmp_path / "ref.log")
        assert os.waitstatus_to_exitcode(server.wait()) == 0, (tmp_path / "ref.log").read_text()
        reference = {k: outcome(c["record"]) for k, c in cells(ref / "store.sqlite").items()}
        assert len(reference) == 12

        store, runs = tmp_path / "store.sqlite", tmp_path / "runs"
        argv = ["sweep", str(yaml_path), "--store", str(store), "--out", str(runs), "--quiet"]
        killed: list[tuple[str, tuple[str, str]]] = []  # (phase aimed at, (phase, detail) it died in)
        attempt = 0
        while len(killed) < KILLS:
            attempt += 1
            assert attempt <= 3 * KILLS, f"could not place {KILLS} kills: {killed}"
            target = PHASES[len(killed) % len(PHASES)]
            # Not always the phase's first moment: skip a random number of its occurrences, so that kills
            # spread over cells, batches, checkpoints, adapter saves, result files and store commits.
            skip = rng.randrange({"loading": 1, "training": 12, "evaluating": 3, "writing": 20}[target])
            pid = server.start(argv, tmp_path / f"attempt-{attempt}.log")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if sum(phase == target for phase, _ in server.phases(pid)) > skip:
                    time.sleep(rng.uniform(0.0, 0.04))  # a random moment inside (or just after) the phase
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
            status = server.wait()
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                killed.append((target, server.phases(pid)[-1]))
                assert integrity(store) == "ok" if store.exists() else True
            else:  # the sweep finished before the phase came: start again on a fresh store
                assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / f"attempt-{attempt}.log").read_text()
                for path in [store, *store.parent.glob(store.name + "-*"), store.with_name(store.name + ".lock")]:
                    path.unlink(missing_ok=True)
        final = server.start(argv, tmp_path / "final.log")
        status = server.wait()
        assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "final.log").read_text()
        assert final
    finally:
        server.close()

    print(f"{len(killed)} kills (aimed at, died in): {killed}")
    died_in = {actual for _, (actual, _) in killed}
    assert len(killed) >= 10 and died_in >= set(PHASES), killed

    # The store: SQLite's own check, then ours.
    assert integrity(store) == "ok"
    stored = cells(store)
    assert set(stored) == set(reference)                       # every cell exactly once (key is the primary key)
    assert all(c["status"] == "finished" for c in stored.values()), {k: c["status"] for k, c in stored.items()}
    assert sum(c["attempts"] for c in stored.values()) > len(stored)  # kills did cut cells off
    print(f"attempts per cell: {sorted(c['attempts'] for c in stored.values())}")
    for key, cell in stored.items():
        record, out = cell["record"], Path(cell["out"])
        assert outcome(record) == reference[key], key       # resumed cells end as unbroken ones
        metrics = json.loads((out / "metrics.json").read_text())
        assert outcome(metrics) == outcome(record)
        assert len((out / "predictions.jsonl").read_text().splitlines()) == record["n"] == 8
        if record.get("adapter_sha256"):
            assert sha256_file(out / "adapter" / "adapter_model.safetensors") == record["adapter_sha256"]
        assert not (out / "checkpoint").exists()
        leftovers = [p.name for p in out.rglob(".*")]
        assert not leftovers, (key, leftovers)
    # The lock went with the killed writers: a new writer opens the store at once.
    from peftlab.experiments import ResultsStore

    with ResultsStore(store, writer=True):
        pass
