"""Run folders: everything a run writes, written atomically so a crash never leaves half a file.

    <out>/config.yaml        the resolved config, written first (rerun with `peftlab rerun <out>`)
    <out>/metrics.json       metrics, per-epoch history, timings, versions, hardware, git commit;
                             written last: its presence marks a finished run
    <out>/predictions.jsonl  one line per example: id, label, pred, correct, scores
    <out>/adapter/           adapter_config.json + adapter_model.safetensors (plain peft) + peftlab.json
    <out>/checkpoint/        while training: what --resume continues from (peftlab.train.checkpoint)

`RunFolder` owns this layout: nothing else names these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from peftlab.errors import DISK_FULL_ERRNOS, DiskFull, PeftlabError

# A record's `peak_memory_scope`: "cell" where peak_memory_mb counts from repro.reset_peak_memory before the cell
# (a sweep's cell, a tune's trial). Sweep cells' records without it were written before 1bef9b3, when the figure
# was the sweep process's peak so far (report/tables.py marks them).
PEAK_SCOPE_CELL = "cell"

RECORD_FILE = "peftlab.json"
ADAPTER_FILE = "adapter_model.safetensors"
TRACKER_FOLDERS = ("tensorboard", "wandb")  # peftlab.tracking writes these as a run starts


@dataclass(frozen=True)
class RunFolder:
    """The folder of one run and the files in it (see the module docstring)."""

    path: Path

    @classmethod
    def create(cls, out: str | Path) -> "RunFolder":
        return cls(prepare_out_dir(out))

    @classmethod
    def claim(cls, out: str | Path, resume: bool = False, overwrite: bool = False) -> "RunFolder":
        """The folder for a new run (or the one `resume` continues): a folder holding a run already is
        refused, never replaced silently; with `overwrite` the old run is moved aside, not deleted."""
        folder = cls(Path(out).expanduser())
        held = folder.held_run()
        if resume and held is None:
            raise PeftlabError(f"--resume: {folder.path} holds no run to resume (no config.yaml); check --out, "
                               "or drop --resume to start a new run")
        if held is not None and not resume:
            if not overwrite:
                raise PeftlabError(f"--out {folder.path} holds {held}; choose a new --out, add --resume to "
                                   f"{'return' if held.startswith('a finished') else 'continue'} it, or "
                                   "--overwrite to move it aside and start again")
            aside = next(folder.path.with_name(f"{folder.path.name}.replaced-{n}") for n in range(1, 10**6)
                         if not folder.path.with_name(f"{folder.path.name}.replaced-{n}").exists())
            os.replace(folder.path, aside)
        return cls.create(folder.path)

    def held_run(self) -> str | None:
        """What run the folder holds already, in words; None for a missing or empty folder.

        Any other content counts too: a folder of someone else's files is not a run folder to write into.
        """
        # What trackers (peftlab.tracking) write into the folder as the run starts is part of the run.
        if not self.path.is_dir() or all(p.name in TRACKER_FOLDERS for p in self.path.iterdir()):
            return None
        if self.metrics_file.is_file():
            return "a finished run (metrics.json)"
        if self.interrupted_file.is_file():
            return "a run interrupted by a signal (interrupted.json)"
        if self.config_file.is_file():
            return "an unfinished run (config.yaml, no metrics.json)"
        return "files that are not a peftlab run"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def predictions_file(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def write_config(self, config_yaml: str, command: str) -> None:
        """config.yaml, headed by the command that reruns it; written first, so a killed run says what it was."""
        header = f"# peftlab {command} --config config.yaml   (or: peftlab rerun <this folder>)\n"
        atomic_write_text(self.config_file, header + config_yaml)

    @property
    def interrupted_file(self) -> Path:
        return self.path / "interrupted.json"

    def journal_file(self, desc: str) -> Path:
        """Where the scores of a cut-off evaluation are kept for --resume (ScoreJournal)."""
        return self.path / f"scores-{safe_name(desc)}.partial.jsonl"

    def mark_interrupted(self, info: dict) -> None:
        """Say that the run stopped on a signal with its checkpoint saved (train.preemption)."""
        write_json(self.interrupted_file, info)

    def finish(self, metrics: dict, predictions: list[dict]) -> None:
        """Predictions, then metrics.json (last: it marks the run finished), then drop the checkpoint."""
        write_jsonl(self.predictions_file, predictions)
        write_json(self.metrics_file, metrics)
        shutil.rmtree(self.checkpoint, ignore_errors=True)  # a finished run needs none
        self.interrupted_file.unlink(missing_ok=True)
        for journal in self.path.glob("scores-*.partial.jsonl"):  # their scores are in predictions.jsonl now
            journal.unlink()

    def finished_metrics(self) -> dict | None:
        """metrics.json of a finished run in this folder; None if there is none (or it is damaged)."""
        try:
            return json.loads(self.metrics_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def save_adapter(self, peft_model, record: dict) -> str:
        """The adapter in plain peft format plus peftlab's `record` of it; returns the weights' sha256.

        Written to a temporary folder first, then moved file by file with os.replace (weights first,
        the record last), so that a kill or a full disk never leaves half a file in adapter/.
        """
        folder = self.adapter
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".adapter-"))
        try:
            try:
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
            except Exception as exc:  # safetensors reports a full disk as its own error type
                if "No space left" not in str(exc):
                    raise
                raise DiskFull(f"disk full while saving the adapter to {folder}: free space on that disk or "
                               "choose another --out; files written before are intact") from None
            write_json(tmp / RECORD_FILE, record)
            folder.mkdir(exist_ok=True)
            names = sorted(p.name for p in tmp.iterdir())
            for name in sorted(names, key=lambda n: (n == RECORD_FILE, n != ADAPTER_FILE)):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp / name, folder / name)
            fsync_dir(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return sha256_file(folder / ADAPTER_FILE)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A kill at any moment leaves the old file or the new one, never half of one; a full disk raises
    DiskFull and leaves the old file as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(f"disk full while writing {path}: free space on that disk or choose another "
                           "--out; files written before are intact") from None
        raise


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in rows))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def prepare_out_dir(out: str | Path) -> Path:
    """Create the run folder; refuse a path that is a file."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeftlabError(f"cannot create output folder {out}: {exc.strerror}; choose another --out") from None
    remove_leftovers(out)
    return out


# What a kill in the middle of atomic_write_bytes (mkstemp's 8 random characters) or save_adapter leaves.
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.adapter-[a-z0-9_]{8}$")


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files and folders a killed run left in its folder (never finished files)."""
    for folder in (out, out / "adapter"):
        for path in folder.iterdir() if folder.is_dir() else ():
            if _LEFTOVER.match(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif _LEFTOVER.match(path.name):
                path.unlink(missing_ok=True)


def read_adapter_record(adapter_dir: str | Path) -> dict | None:
    """peftlab's record beside a saved adapter (None for adapters made by other tools)."""
    path = Path(adapter_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"{path} is not valid JSON ({exc.msg}); the adapter folder is damaged") from None


# Characters kept in a file name made from untrusted text; everything else becomes "_".
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")
_MAX_NAME = 100


def safe_name(text: str) -> str:
    """One safe path component from untrusted text (an example id, a cell id).

    No separators, no leading dot (so never "." or ".."), ASCII only, at most ~110 characters.
    A name that had to be changed gets a hash of the original appended, so distinct texts keep
    distinct names ("a/b" and "a_b" do not collide).
    """
    name = _NAME_CHARS.sub("_", str(text)).lstrip(".")[:_MAX_NAME] or "_"
    if name != text:
        name += "-" + hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return name


def child_path(root: str | Path, name: str) -> Path:
    """`root / safe_name(name)`, checked to lie inside `root` even through symlinks."""
    root = Path(root)
    path = root / safe_name(name)
    if os.path.commonpath([root.resolve(), path.resolve()]) != str(root.resolve()):
        raise PeftlabError(f"{path} is a link that leads out of {root}; remove it or choose another folder")
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ScoreJournal:
    """The scores of an evaluation's finished batches, appended as they come, so a killed evaluation
    continues where it stopped (`--resume`) instead of starting over.

    One JSON line per batch ({"ids": [...], "scores": [[...], ...]}) after a header line holding the
    evaluation's fingerprint (what was scored, with which weights) and the base's `precision`
    (models.loading.base_dtype: `model.dtype: auto` differs by machine); each line is flushed and fsync'd. A
    torn last line (a kill mid-write) is ignored, and a journal of another evaluation, or of a base of another
    precision, is discarded (one that predates the precision field is taken as it is, as checkpoints are).
    float32 scores survive the round trip through JSON exactly, so a resumed evaluation is bitwise equal.
    """

    def __init__(self, path: Path, fingerprint: str, resume: bool, precision: str | None = None):
        self.path, self.fingerprint, self.precision = Path(path), fingerprint, precision
        self.known: dict[str, list[float]] = self._read() if resume else {}
        if not self.known:
            atomic_write_text(self.path, json.dumps({"fingerprint": fingerprint, "precision": precision}) + "\n")

    def _read(self) -> dict[str, list[float]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return {}
        try:
            header = json.loads(lines[0]) if lines else {}
            scored_in = header.get("precision")
            if header.get("fingerprint") != self.fingerprint or (scored_in and self.precision
                                                                  and scored_in != self.precision):
                return {}
        except json.JSONDecodeError:
            return {}
        known = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a kill cut off: everything before it is whole
            known.update(zip(entry["ids"], entry["scores"]))
        return known

    def append(self, ids: list[str], scores: list[list[float]]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"ids": ids, "scores": scores}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
