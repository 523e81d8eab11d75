"""Seeds, the facts a run record needs to be rerun (versions, hardware, git commit), and `rerun`."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import PeftlabError

PACKAGES = ("peftlab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gguf")


def set_seed(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices); returns the seed so records can store it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict:
    info = {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit() -> str | None:
    """The commit of the peftlab checkout this code runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak GPU memory allocated on `device` if it is a GPU, else the process's peak resident memory."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    from peftlab.config import build_config, flatten, load_yaml
    from peftlab.runs import run_eval, run_train

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
