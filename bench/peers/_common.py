"""Small helpers shared by the peers (timing, memory)."""

from __future__ import annotations

import resource
import sys
import time

import torch


def model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:  # plain nn.Module
        return next(model.parameters()).device


def sync(device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def peak_rss_mb() -> float:
    """Process peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
