"""The results store: one SQLite file, one row per cell, written the moment a cell ends.

SQLite in WAL mode with synchronous=FULL: a committed row survives kill -9 and power loss, a
half-done write is rolled back, and `peftlab report` can read while a sweep writes. A cell is
`running` from its start until it is `finished` (with its full record) or `failed` (with the
reason); a `running` row that no live sweep owns was cut off and is redone by the next sweep.

Only one sweep writes a store at a time: a writer holds an exclusive flock on `<store>.lock` for
as long as it runs. The kernel drops the lock when the process dies, however it dies, so a
killed sweep never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError

APPLICATION = "peftlab-results"
SCHEMA_VERSION = 1
STATUSES = ("running", "finished", "failed")

SCHEMA = """
CREATE TABLE peftlab_schema (application TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE cells (
    key         TEXT PRIMARY KEY,          -- hash of the resolved config (experiments.grid.cell_key)
    status      TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    reason      TEXT,                      -- why it failed
    config      TEXT NOT NULL,             -- JSON: the resolved RunConfig
    record      TEXT,                      -- JSON: the run's metrics.json (finished cells)
    out         TEXT,                      -- the cell's run folder
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  REAL,
    finished_at REAL,
    host        TEXT,
    pid         INTEGER
);
CREATE TABLE sweeps (name TEXT PRIMARY KEY, source TEXT, command TEXT, grid TEXT NOT NULL,
                     spec TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE sweep_cells (sweep TEXT NOT NULL, key TEXT NOT NULL, position INTEGER NOT NULL,
                          params TEXT NOT NULL, PRIMARY KEY (sweep, key));
"""


@dataclass
class StoredCell:
    key: str
    status: str
    reason: str | None
    config: dict
    record: dict | None
    out: str | None
    attempts: int
    started_at: float | None
    finished_at: float | None
    params: dict | None = None   # the grid values, when read through a sweep
    sweep: str | None = None


@dataclass
class StoredSweep:
    name: str
    source: str | None
    command: str | None   # the command line that ran it last
    grid: dict
    spec: dict


class ResultsStore:
    """Open (or create, when `writer`) a results store; a writer holds the store's lock until close()."""

    def __init__(self, path: str | Path, writer: bool = False):
        self.path = Path(path).expanduser()
        self.writer = writer
        self._lock_fd: int | None = None
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        elif not self.path.is_file():
            raise PeftlabError(f"no results store at {self.path}; run `peftlab sweep CONFIG --store {self.path}` first")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        uri = self.path.resolve().as_uri() + ("" if self.writer else "?mode=ro")
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise PeftlabError(f"{self.path} is not a peftlab results store ({exc}); give another --store") from None
        if not tables and self.writer:
            self._create()
        else:
            self._check_schema(tables)  # before any write: a foreign file is left exactly as it was
        if self.writer:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # a finished cell survives power loss too

    def _create(self) -> None:
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute("INSERT INTO peftlab_schema VALUES (?, ?)", (APPLICATION, SCHEMA_VERSION))

    def _check_schema(self, tables: set[str]) -> None:
        if "peftlab_schema" not in tables:
            listed = ", ".join(sorted(tables)) or "none"
            raise PeftlabError(f"{self.path} is an SQLite file but not a peftlab results store (tables: {listed}); "
                               "it was left untouched; give another --store")
        row = self.conn.execute("SELECT application, version FROM peftlab_schema").fetchone()
        if row is None or row[0] != APPLICATION:
            raise PeftlabError(f"{self.path} belongs to another application ({row and row[0]}); it was left "
                               "untouched; give another --store")
        if row[1] > SCHEMA_VERSION:
            raise PeftlabError(f"{self.path} was written by a newer peftlab (store schema {row[1]}, this peftlab "
                               f"reads {SCHEMA_VERSION}); upgrade peftlab, or give another --store")
        if row[1] < SCHEMA_VERSION:
            raise PeftlabError(f"{self.path} has the older store schema {row[1]} (this peftlab reads "
                               f"{SCHEMA_VERSION}) and there is no migration; report it with the peftlab "
                               "that wrote it, and start a new --store")

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise PeftlabError(f"results store {self.path} is being written by another sweep ({owner}); wait "
                               "for it to end, or give another --store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
            self.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        return _Transaction(self.conn)

    # -- writing (a writer only) ---------------------------------------------------------------------
    def _check_writer(self) -> None:
        if not self.writer:
            raise RuntimeError("this ResultsStore was opened read-only")

    def register_sweep(self, name: str, source: str | None, command: str | None, grid: dict, spec: dict,
                       cells: list[tuple[str, dict]]) -> None:
        """Record the sweep and its cells (key, grid values); a changed grid replaces the old list."""
        self._check_writer()
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO sweeps VALUES (?, ?, ?, ?, ?, ?)",
                              (name, source, command, _dumps(grid), _dumps(spec), time.time()))
            self.conn.execute("DELETE FROM sweep_cells WHERE sweep = ?", (name,))
            self.conn.executemany("INSERT INTO sweep_cells VALUES (?, ?, ?, ?)",
                                  [(name, key, i, _dumps(params)) for i, (key, params) in enumerate(cells)])

    def start(self, key: str, config: dict, out: str | None) -> None:
        """Mark a cell running (a new row, or a retry of an unfinished or failed one)."""
        self._check_writer()
        with self.transaction():
            row = self.conn.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
            if row and row[0] == "finished":
                raise RuntimeError(f"cell {key} is finished; a finished cell is never run again")
            self.conn.execute(
                "INSERT INTO cells (key, status, config, out, attempts, started_at, host, pid) "
                "VALUES (?, 'running', ?, ?, 1, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET status='running', "
                "reason=NULL, record=NULL, config=excluded.config, out=excluded.out, attempts=attempts+1, "
                "started_at=excluded.started_at, finished_at=NULL, host=excluded.host, pid=excluded.pid",
                (key, _dumps(config), out, time.time(), socket.gethostname(), os.getpid()))

    def interrupt(self, key: str, reason: str) -> None:
        """A running cell stopped on a signal with its checkpoint saved: it stays `running` (the next sweep
        redoes it, from that checkpoint with --resume) and keeps why, so that reports say "interrupted"."""
        self._check_writer()
        with self.transaction():
            self.conn.execute("UPDATE cells SET reason=? WHERE key=? AND status='running'", (reason, key))

    def finish(self, key: str, record: dict) -> None:
        self._end(key, "finished", None, record)

    def fail(self, key: str, reason: str, record: dict | None = None) -> None:
        self._end(key, "failed", reason, record)

    def _end(self, key: str, status: str, reason: str | None, record: dict | None) -> None:
        self._check_writer()
        with self.transaction():
            done = self.conn.execute("UPDATE cells SET status=?, reason=?, record=?, finished_at=? WHERE key=? "
                                     "AND status='running'",
                                     (status, reason, None if record is None else _dumps(record), time.time(), key))
            if done.rowcount != 1:
                raise RuntimeError(f"cell {key} was not running; cannot mark it {status}")

    def merge_from(self, other: "ResultsStore") -> "MergeCounts":
        """Copy `other`'s cells and sweeps into this store, in one transaction: the way cells run on another
        machine (a GPU box, a second worktree) join a table. A finished cell replaces a missing, running or
        failed one here; a cell finished here is kept (and counted as differing when the other's accuracy or
        adapter differs); an unfinished cell is copied only where this store lacks the key, so the next sweep
        redoes it. A sweep new here is copied whole; a known one gains the members it lacks."""
        self._check_writer()
        counts = MergeCounts()
        columns = f"{_CELL_COLUMNS}, host, pid"  # the whole row: who ran it, too
        with self.transaction():
            for row in other.conn.execute(f"SELECT {columns} FROM cells").fetchall():
                key, status, record = row[0], row[1], row[4]
                mine = self.conn.execute("SELECT status, record FROM cells WHERE key = ?", (key,)).fetchone()
                if mine is not None and mine[0] == "finished":
                    if status == "finished":
                        counts.kept += 1
                        counts.differing += _outcome(mine[1]) != _outcome(record)
                    continue
                if status != "finished" and mine is not None:
                    continue
                self.conn.execute(f"INSERT OR REPLACE INTO cells ({columns}) VALUES ({', '.join('?' * len(row))})", row)
                counts.added += status == "finished"
                counts.unfinished += status != "finished"
            for sweep in other.conn.execute("SELECT name, source, command, grid, spec, updated_at FROM sweeps"):
                known = self.conn.execute("SELECT 1 FROM sweeps WHERE name = ?", (sweep[0],)).fetchone()
                if not known:
                    self.conn.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?, ?, ?)", sweep)
                    counts.sweeps += 1
                last = self.conn.execute("SELECT COALESCE(MAX(position), -1) FROM sweep_cells WHERE sweep = ?",
                                         (sweep[0],)).fetchone()[0]
                members = other.conn.execute("SELECT key, params FROM sweep_cells WHERE sweep = ? ORDER BY position",
                                             (sweep[0],)).fetchall()
                for key, params in members:
                    inserted = self.conn.execute("INSERT OR IGNORE INTO sweep_cells VALUES (?, ?, ?, ?)",
                                                 (sweep[0], key, last + 1, params))
                    last += inserted.rowcount
        return counts

    # -- reading -------------------------------------------------------------------------------------
    def status(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def cell(self, key: str) -> StoredCell | None:
        row = self.conn.execute(f"SELECT {_CELL_COLUMNS} FROM cells WHERE key = ?", (key,)).fetchone()
        return _cell(row) if row else None

    def cells(self, sweep: str | None = None) -> list[StoredCell]:
        """All cells, or a sweep's cells in grid order with their grid values (never started: 'pending')."""
        if sweep is None:
            rows = self.conn.execute(f"SELECT {_CELL_COLUMNS} FROM cells ORDER BY started_at").fetchall()
            return [_cell(r) for r in rows]
        rows = self.conn.execute(
            f"SELECT {', '.join('c.' + c for c in _CELL_COLUMNS.split(', '))}, s.key, s.params FROM sweep_cells s "
            "LEFT JOIN cells c ON c.key = s.key WHERE s.sweep = ? ORDER BY s.position", (sweep,)).fetchall()
        out = []
        for r in rows:
            if r[0] is None:  # registered but never started
                cell = StoredCell(key=r[-2], status="pending", reason=None, config={}, record=None, out=None,
                                  attempts=0, started_at=None, finished_at=None)
            else:
                cell = _cell(r[:-2])
            cell.params, cell.sweep = json.loads(r[-1]), sweep
            out.append(cell)
        return out

    def sweeps(self) -> list[StoredSweep]:
        rows = self.conn.execute("SELECT name, source, command, grid, spec FROM sweeps ORDER BY updated_at").fetchall()
        return [StoredSweep(name=r[0], source=r[1], command=r[2], grid=json.loads(r[3]), spec=json.loads(r[4]))
                for r in rows]

    def sweep_size(self, sweep: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM sweep_cells WHERE sweep = ?", (sweep,)).fetchone()[0]

    def finished_configs(self) -> list[tuple[str, dict]]:
        """(key, config) of every finished cell."""
        rows = self.conn.execute("SELECT key, config FROM cells WHERE status='finished'").fetchall()
        return [(key, json.loads(config)) for key, config in rows]

    def recent_finished(self, limit: int = 5, model: str | None = None) -> list[StoredCell]:
        """The most recently finished cells (of one model.name if given), newest first."""
        cells = [c for c in self.conn.execute(f"SELECT {_CELL_COLUMNS} FROM cells WHERE status='finished' "
                                              "ORDER BY finished_at DESC").fetchall()]
        out = [_cell(r) for r in cells]
        if model is not None:
            out = [c for c in out if c.config.get("model", {}).get("name") == model]
        return out[:limit]


_CELL_COLUMNS = "key, status, reason, config, record, out, attempts, started_at, finished_at"


# `peftlab compare results/study/lora.sqlite:7f2f9bfdb565 ...`: a finished cell of a store, by its key.
STORED_CELL = re.compile(r"^(?P<store>.+\.(?:sqlite|sqlite3|db)):(?P<key>[0-9a-f]{12})$")


def stored_correct_bits(spec: str) -> dict | None:
    """The correct_bits (evaluate/paired.py) of the finished cell `STORE:KEY` names; None for anything else
    (a run folder). A store keeps them in every record since 71f43a8, so cells whose run folders are gone
    (another machine, a GPU) can still be paired."""
    match = STORED_CELL.match(spec)
    if match is None:
        return None
    path, key = match["store"], match["key"]
    with ResultsStore(path) as store:
        cell = store.cell(key)
    if cell is None:
        raise PeftlabError(f"{path} holds no cell {key}; the keys are in the report's tables/cells.csv "
                           f"(`peftlab report {path}`)")
    if cell.status != "finished" or not cell.record:
        raise PeftlabError(f"cell {key} of {path} is {cell.status}, not finished: there is nothing to compare yet")
    if not cell.record.get("correct_bits"):
        raise PeftlabError(f"cell {key} of {path} has no correct_bits (a record from before 71f43a8); compare "
                           "its run folder instead")
    return cell.record["correct_bits"]


@dataclass
class MergeCounts:
    added: int = 0        # finished cells copied in
    kept: int = 0         # finished in both: this store's record kept
    differing: int = 0    # of those, with another accuracy or adapter
    unfinished: int = 0   # running or failed cells copied in (the next sweep redoes them)
    sweeps: int = 0       # sweeps copied in

    def describe(self) -> str:
        text = (f"{self.added} finished cell{'s' * (self.added != 1)} added, {self.kept} already finished there "
                f"(kept)")
        if self.differing:
            text += f", {self.differing} of them with another accuracy or adapter in the source"
        if self.unfinished:
            text += f", {self.unfinished} unfinished cell{'s' * (self.unfinished != 1)} added (a sweep redoes them)"
        return text + f", {self.sweeps} sweep{'s' * (self.sweeps != 1)} added"


def _outcome(record: str | None) -> tuple:
    """What makes two runs of one cell the same result: the accuracy and the adapter's bytes."""
    data = json.loads(record) if record else {}
    return data.get("accuracy"), data.get("adapter_sha256")


def _cell(row) -> StoredCell:
    return StoredCell(key=row[0], status=row[1], reason=row[2], config=json.loads(row[3]),
                      record=json.loads(row[4]) if row[4] else None, out=row[5], attempts=row[6],
                      started_at=row[7], finished_at=row[8])


def _dumps(value) -> str:
    from peftlab.records import _jsonable

    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_jsonable)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the connection is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
