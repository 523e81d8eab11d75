"""peftlab: parameter-efficient fine-tuning of causal LMs for text classification.

The pipeline, one module per stage: data -> prompts -> models -> train -> evaluate -> runs.

The names below are imported on first use (PEP 562 `__getattr__`), so that `import peftlab.cli` or
`peftlab.errors` does not import torch: `peftlab --help` and a mistyped flag answer at once (issue 15).
`from peftlab import run_train` works as before.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "PeftlabError": "peftlab.errors",
    "RunConfig": "peftlab.config",
    "build_config": "peftlab.config",
    "config_from_dict": "peftlab.config",
    "load_yaml": "peftlab.config",
    "evaluate_examples": "peftlab.runs",
    "load_task": "peftlab.runs",
    "predict": "peftlab.runs",
    "run_eval": "peftlab.runs",
    "run_train": "peftlab.runs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
