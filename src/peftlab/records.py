"""Run folders: everything a run writes, written atomically so a crash never leaves half a file.

    <out>/config.yaml        the resolved config (rerun with `peftlab <command> --config <out>/config.yaml`)
    <out>/metrics.json       metrics, per-epoch history, timings, versions, hardware, git commit
    <out>/predictions.jsonl  one line per example: id, label, pred, correct, scores
    <out>/adapter/           adapter_config.json + adapter_model.safetensors (plain peft) + peftlab.json
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from peftlab.errors import PeftlabError

RECORD_FILE = "peftlab.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return out


def read_adapter_record(adapter_dir: str | Path) -> dict | None:
    """peftlab's record beside a saved adapter (None for adapters made by other tools)."""
    path = Path(adapter_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"{path} is not valid JSON ({exc.msg}); the adapter folder is damaged") from None
