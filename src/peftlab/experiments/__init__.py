"""Experiments: sweep grids expanded into cells, a crash-safe SQLite results store, the runner."""

from peftlab.experiments.grid import Cell, Sweep, SweepSpec, cell_key, load_sweep
from peftlab.experiments.runner import BaseModelChanged, SweepOutcome, run_sweep
from peftlab.experiments.store import ResultsStore

__all__ = ["BaseModelChanged", "Cell", "ResultsStore", "Sweep", "SweepOutcome", "SweepSpec", "cell_key",
           "load_sweep", "run_sweep"]
