"""Experiments: sweep grids expanded into cells, a crash-safe SQLite results store, the runner, tune.

Names are imported on first use (PEP 562), so that `peftlab tune --help` can read the tune YAML's
documentation (experiments.search_space) without importing torch through the runner.
"""

import importlib

_HOMES = {"Cell": "grid", "Sweep": "grid", "SweepSpec": "grid", "cell_key": "grid", "load_sweep": "grid",
          "BaseModelChanged": "runner", "SweepOutcome": "runner", "run_sweep": "runner", "ResultsStore": "store"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'peftlab.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftlab.experiments.{_HOMES[name]}"), name)
