"""Facts about the environment a run record keeps: seeds, versions, hardware, git commit, peak memory.

`peftlab rerun`, which reads them back, lives in peftlab.rerun (above runs.py).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

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
    # Virtual machines often name only the vendor ("AMD EPYC", "Intel(R) Xeon(R) Processor"): family and model
    # tell a Zen 3 from a Zen 4, an Ice Lake from an Emerald Rapids, and with them how fast bf16 runs.
    family, model = cpuinfo_field("cpu family"), cpuinfo_field("model")
    if family and model:
        info["cpu_family_model"] = f"{family}/{model}"
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere): avx512_bf16 and amx decide bf16 speed."""
    return (cpuinfo_field("flags") or "").split()


def cpuinfo_field(name: str) -> str | None:
    """The first `name: value` of /proc/cpuinfo, or None where there is none (not Linux, no such field).
    The name must match whole: "model" is not "model name"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the peftlab checkout this code runs from, if it runs from one; "-dirty" when the code
    there (src/, untracked modules too) differs from it. Only src/ counts: a sweep's results store is often a
    tracked file of the same checkout (results/), and a store being written is no change of the code."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def reset_peak_memory(device: torch.device | None = None) -> float | None:
    """Start peak_memory_mb's count again and return what the process holds as it restarts
    (memory_in_use_mb on `device`): one sweep process runs many cells, and each cell's record should
    hold its own peak, not the highest of every cell before it. On a CPU the figure is the process's peak
    resident set, which Linux resets on a write of 5 to /proc/self/clear_refs (proc(5), "clear_refs");
    elsewhere it stays the process's peak so far.

    The resident set the count restarts from should be the process's live memory, but glibc keeps the pages
    of freed chunks below its mmap threshold in the heap (the test in tests/unit/test_experiments.py keeps
    640 MB of freed 64 KB tensors resident), so a cell's peak would include what earlier cells freed.
    malloc_trim(0) returns those pages to the system first (malloc_trim(3)); where libc is not glibc nothing
    is trimmed. What stays resident after it (the model, the data, what earlier cells still reference) is the
    figure returned, which the runner records beside the peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return memory_in_use_mb(device)


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): no malloc_trim
        pass


def memory_in_use_mb(device: torch.device | None = None) -> float | None:
    """What the process holds now, in peak_memory_mb's terms: GPU memory allocated on `device` if it is a GPU,
    else the resident set (Linux's VmRSS; None where /proc is missing)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    """A memory field of Linux's /proc/self/status (reported in kB) in MB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak GPU memory allocated on `device` if it is a GPU, else the process's peak resident memory
    (since the last reset_peak_memory where the system can reset it)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: VmHWM, the peak of this process's own memory map, which reset_peak_memory resets. Not getrusage's
    # ru_maxrss: it also keeps the peak of the map an exec replaced, i.e. of the parent a subprocess was forked
    # from (a 4.5 GB pytest run made every cell of its subprocess report 4.5 GB), and no reset clears that.
    if (high_water := _proc_status_mb("VmHWM")) is not None:
        return high_water
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
