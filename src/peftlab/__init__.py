"""peftlab: parameter-efficient fine-tuning of causal LMs for text classification.

The pipeline, one module per stage: data -> prompts -> models -> train -> evaluate -> runs.
"""

__version__ = "0.1.0"

from peftlab.config import RunConfig, build_config, config_from_dict, load_yaml  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.runs import evaluate_examples, load_task, predict, run_eval, run_train  # noqa: E402

__all__ = ["PeftlabError", "RunConfig", "build_config", "config_from_dict", "evaluate_examples", "load_task",
           "load_yaml", "predict", "run_eval", "run_train"]
