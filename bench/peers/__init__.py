"""Peer implementations that peftlab's benchmarks compare against.

Each peer is the "standard way" an ML engineer would do the job without
peftlab, following the tools' own documentation / source:

* :func:`predict_by_generate` -- batched greedy ``model.generate()`` and
  parsing the first label word out of the decoded answer.
* :func:`predict_with_lm_eval` -- EleutherAI lm-evaluation-harness ``HFLM``
  ``loglikelihood`` scoring of each label word as continuation.
* :func:`train_with_trainer` -- ``peft.get_peft_model`` + ``transformers.Trainer``.

Every function takes already-loaded objects (model, tokenizer) and
already-rendered prompt strings, so the bench can feed identical inputs to
the peer and to peftlab.  Imports are lazy so importing this package does not
require lm-eval to be installed.
"""

from __future__ import annotations

__all__ = ["predict_by_generate", "predict_with_lm_eval", "train_with_trainer"]


def __getattr__(name):  # PEP 562 lazy attributes
    if name == "predict_by_generate":
        from .generate_peer import predict_by_generate

        return predict_by_generate
    if name == "predict_with_lm_eval":
        from .lm_eval_peer import predict_with_lm_eval

        return predict_with_lm_eval
    if name == "train_with_trainer":
        from .trainer_peer import train_with_trainer

        return train_with_trainer
    raise AttributeError(name)
