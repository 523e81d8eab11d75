"""peftlab: parameter-efficient fine-tuning of causal LMs for text classification.

The pipeline, one module per stage: data -> prompts -> models -> train -> evaluate -> runs.
"""

__version__ = "0.1.0"

import os

# Expandable segments let the CUDA caching allocator grow a segment instead of carving new blocks
# for every new batch shape. Length-grouped batches change shape at every step; with the default
# allocator some of those steps stalled 1.4-2.4 s on an H100 (7B LoRA: 4,985 -> 8,042 tok/s over
# 24 fresh batch widths, bench/gpu_shapes.py). Set before torch first touches the GPU; a value the
# user gives wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from peftlab.config import RunConfig, build_config, config_from_dict, load_yaml  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.runs import evaluate_examples, load_task, predict, run_eval, run_train  # noqa: E402

__all__ = ["PeftlabError", "RunConfig", "build_config", "config_from_dict", "evaluate_examples", "load_task",
           "load_yaml", "predict", "run_eval", "run_train"]
