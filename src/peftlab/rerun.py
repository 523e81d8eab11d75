"""`peftlab rerun RUN_DIR`: run a run folder's config.yaml again and say what came out the same.

It sits above runs.py (it calls run_train / run_eval), so runs.py never imports it: no cycle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftlab.config import build_config, flatten, load_yaml
from peftlab.errors import PeftlabError
from peftlab.runs import run_eval, run_train


def next_rerun_folder(run_dir: Path) -> Path:
    """<run_dir>-rerun-<n> with the smallest n not taken yet."""
    n = 1
    while (run_dir.parent / f"{run_dir.name}-rerun-{n}").exists():
        n += 1
    return run_dir.parent / f"{run_dir.name}-rerun-{n}"


def run_command_of(run_dir: Path) -> str:
    """'train' or 'eval': from config.yaml's first line (`# peftlab train --config ...`), else metrics.json."""
    first = (run_dir / "config.yaml").read_text(encoding="utf-8").split("\n", 1)[0]
    match = re.match(r"# peftlab (train|eval)\b", first)
    if match:
        return match.group(1)
    try:
        command = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError):
        command = None
    if command not in ("train", "eval"):
        raise PeftlabError(f"cannot tell whether {run_dir} was a train or an eval run (no '# peftlab <command>' "
                           "line in config.yaml, no metrics.json); run `peftlab train --config "
                           f"{run_dir / 'config.yaml'}` or `peftlab eval --config ...` instead")
    return command


def rerun(run_dir: str | Path, out: str | Path | None = None, progress: bool | None = None) -> tuple[dict, dict]:
    """Run a run folder's config.yaml again into a new folder; returns (metrics, comparison with the original).

    Relative paths in the config (data, model) are read from the current folder, as in the original run.
    """
    run_dir = Path(run_dir).expanduser()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run folder (it has no config.yaml); give the --out "
                           "folder of a train or eval run")
    command = run_command_of(run_dir)
    out = Path(out).expanduser() if out else next_rerun_folder(run_dir)
    if out.resolve() == run_dir.resolve():
        raise PeftlabError(f"--out {out} is the run being rerun; choose a new folder")
    config = build_config(flatten(load_yaml(config_file), str(config_file)), {"out": str(out), "train.resume": False})
    metrics = (run_train if command == "train" else run_eval)(config, progress=progress)
    return metrics, compare_runs(run_dir, out)


def compare_runs(original: Path, new: Path) -> dict:
    """Which of sample, metrics and adapter a rerun reproduced exactly (None: the original lacks it)."""
    def load(folder: Path) -> dict:
        try:
            return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def test_ids(folder: Path) -> list | None:
        try:
            return [json.loads(line)["id"] for line in (folder / "predictions.jsonl").read_text("utf-8").splitlines()]
        except (OSError, ValueError, KeyError):
            return None

    a, b = load(original), load(new)

    def same(value_a, value_b):
        return None if value_a is None else value_a == value_b

    per_epoch = [[e.get(k) for k in ("accuracy", "train_loss")] for e in a.get("per_epoch", [])] or None
    return {"original_finished": bool(a),
            "same_train_sample": same(a.get("train_ids_sha256"), b.get("train_ids_sha256")),
            "same_test_sample": same(test_ids(original), test_ids(new)),
            "same_accuracy": same(a.get("accuracy"), b.get("accuracy")),
            "same_per_epoch": same(per_epoch, [[e.get(k) for k in ("accuracy", "train_loss")]
                                               for e in b.get("per_epoch", [])] or None),
            "same_adapter": same(a.get("adapter_sha256"), b.get("adapter_sha256")),
            "changed_versions": sorted(k for k, v in a.get("versions", {}).items()
                                       if b.get("versions", {}).get(k) != v)}
