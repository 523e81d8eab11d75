"""Peer 2: score label words with EleutherAI lm-evaluation-harness (HF backend).

This is how a ``multiple_choice`` task in lm-eval is scored: for every
document, one ``loglikelihood`` request per choice with the rendered prompt as
*context* and the choice as *continuation*; the prediction is the argmax of the
summed continuation log-probabilities (lm-eval's ``acc`` metric).

Followed source (lm-eval 0.4.13):

* ``lm_eval/api/instance.py`` -- ``Instance(request_type, doc, arguments, idx, metadata)``;
  ``Instance.args`` is the ``(context, continuation)`` tuple the model sees.
* ``lm_eval/api/task.py`` -- ``ConfigurableTask.construct_requests`` builds one
  ``Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, cont), idx=i,
  metadata=(task_name, doc_id, repeats))`` per choice; we do the same.
* ``lm_eval/api/model.py`` -- ``TemplateLM.loglikelihood`` / ``_encode_pair``:
  trailing whitespace of the context (including our prompt's final ``"\\n"``)
  is moved to the front of the continuation, then ``context+continuation`` is
  encoded once and split at ``len(encode(context))``.
* ``lm_eval/models/huggingface.py`` -- ``HFLM(pretrained=<PreTrainedModel>,
  tokenizer=..., batch_size=...)`` wraps an already-loaded model (device taken
  from ``model.device``, dtype left as is); ``_loglikelihood_tokens`` sorts by
  length, right-pads, and reuses one forward pass for choices that share
  ``context + continuation[:-1]`` (``logits_cache=True``, the default).

The prompt ends with a newline, so the label words are passed without a leading
space (``target_delimiter=""`` in lm-eval task terms).
"""

from __future__ import annotations

import logging

from ._common import Timer, model_device


def _make_requests(prompts, label_words, task_name="peftlab_peer"):
    from lm_eval.api.instance import Instance

    requests = []
    for doc_id, prompt in enumerate(prompts):
        doc = {"prompt": prompt, "choices": list(label_words)}
        for i, word in enumerate(label_words):
            requests.append(
                Instance(
                    request_type="loglikelihood",
                    doc=doc,
                    arguments=(prompt, word),
                    idx=i,
                    metadata=(task_name, doc_id, 1),
                )
            )
    return requests


def predict_with_lm_eval(
    model,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    batch_size: int = 8,
    quiet: bool = True,
) -> dict:
    """Argmax over label words of lm-eval ``HFLM.loglikelihood``.

    Returns ``{"preds", "scores", "is_greedy", "seconds", "setup_seconds",
    "prompt_tokens", "input_tokens", "sequences", "max_length"}``:

    * ``scores[k][i]``: summed log-prob of ``label_words[i]`` after ``prompts[k]``
      as lm-eval computes it (its continuation also carries the prompt's
      trailing whitespace, a constant shift across label words);
    * ``seconds``: wall time of the ``loglikelihood`` call (tokenisation + forward);
      ``setup_seconds``: building the ``HFLM`` wrapper;
    * ``prompt_tokens``: real prompt tokens (``HFLM.tok_encode``), summed over prompts;
    * ``input_tokens``: tokens lm-eval actually feeds the model, after its
      one-forward-per-shared-prefix grouping;
    * ``sequences[k][i]``: the token ids lm-eval scores for ``label_words[i]`` after
      ``prompts[k]`` (context + continuation, as ``_encode_pair`` splits them), so a
      caller can check that lm-eval saw the ids it meant (bench/kshot_bench.py);
    * ``max_length``: lm-eval's window; longer sequences are cut from the left.
    """
    from lm_eval.models.huggingface import HFLM

    device = model_device(model)
    was_training = model.training
    # HFLM's configure_pad_token sets a pad token on the caller's tokenizer if it has none
    old_pad = tokenizer.pad_token
    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    if quiet:
        lm_logger.setLevel(logging.ERROR)
    try:
        with Timer(device) as setup:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        requests = _make_requests(prompts, label_words)
        with Timer(device) as t:
            out = lm.loglikelihood(requests, disable_tqdm=quiet)
        # token accounting outside the timed region
        prompt_tokens = sum(len(lm.tok_encode(p)) for p in prompts)
        groups, sequences = set(), []
        for req in requests:
            ctx, cont = lm._encode_pair(*req.args)
            groups.add(tuple(ctx + cont[:-1]))
            sequences.append(ctx + cont)
        input_tokens = sum(len(g) for g in groups)
        max_length = lm.max_length
    finally:
        lm_logger.setLevel(old_level)
        if old_pad is None and tokenizer.pad_token is not None:
            tokenizer.pad_token = None
        if was_training:  # HFLM puts the model in eval mode
            model.train()

    n = len(label_words)
    scores = [[float(out[k * n + i][0]) for i in range(n)] for k in range(len(prompts))]
    greedy = [[bool(out[k * n + i][1]) for i in range(n)] for k in range(len(prompts))]
    preds = [max(range(n), key=row.__getitem__) for row in scores]
    return {
        "preds": preds,
        "scores": scores,
        "is_greedy": greedy,
        "seconds": t.seconds,
        "setup_seconds": setup.seconds,
        "prompt_tokens": prompt_tokens,
        "input_tokens": input_tokens,
        "sequences": [sequences[k * n:(k + 1) * n] for k in range(len(prompts))],
        "max_length": max_length,
    }
