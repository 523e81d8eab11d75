"""From label-word scores to decisions: length normalisation and calibration of the label prior.

Scores are summed log-probabilities of each label word (evaluate/scoring.py), which penalise words
of many tokens, and a small model's prior favours some words outright (issue 13: a zero-shot model
answered the first class for 77 of 80 examples). Two remedies from the field, applied in this order:

- `eval.score_norm`: sum (lm-evaluation-harness `acc`), token (the mean log-probability per token), or
  byte (`acc_norm`: the sum divided by the word's length; lm-evaluation-harness counts characters of
  the choice, we count its UTF-8 bytes, the same for ASCII words).
- `eval.calibration`: content-free (Zhao et al. 2021, "Calibrate Before Use": the class probabilities
  p_cf of inputs with no content, "N/A", "" and "[MASK]", through the same prompt; each example's
  class probabilities are divided by p_cf, i.e. log p_cf is subtracted before the argmax) or val (a
  log-prior offset per class fitted on validation scores with `fit_prior`).

The decision scores are log-softmax over the classes minus the offsets, so softmax of them is the
calibrated class distribution; scores in predictions.jsonl stay the raw summed log-probabilities.
"""

from __future__ import annotations

import torch

from peftlab.errors import PeftlabError

SCORE_NORMS = ("sum", "token", "byte")
CALIBRATIONS = ("none", "content-free", "val")
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")  # Zhao et al. 2021, section 5


def normalise_scores(scores: torch.Tensor, label_ids: list[list[int]], words: list[str], norm: str) -> torch.Tensor:
    """(N, C) summed log-probabilities divided per class by its token count (token) or byte length (byte)."""
    if norm == "sum":
        return scores
    if norm == "token":
        lengths = [len(ids) for ids in label_ids]
    elif norm == "byte":
        lengths = [len(word.strip().encode("utf-8")) or 1 for word in words]
    else:
        raise PeftlabError(f"eval.score_norm={norm!r} is not one of {', '.join(SCORE_NORMS)}")
    return scores / torch.tensor(lengths, dtype=scores.dtype)


def class_log_probs(scores: torch.Tensor) -> torch.Tensor:
    """Scores renormalised over the label words: log p(class | input) among the classes."""
    return torch.log_softmax(scores.double(), dim=-1)


def content_free_offsets(scores: torch.Tensor) -> torch.Tensor:
    """log p_cf: the log of the mean class distribution of the content-free inputs' (normalised) scores."""
    return torch.log(class_log_probs(scores).exp().mean(dim=0))


def fit_prior(scores: torch.Tensor, gold: list[int] | torch.Tensor, steps: int = 200) -> torch.Tensor:
    """Log-prior offsets b (C,) fitted on validation scores: b minimises the cross entropy of
    softmax(log p - b) against the gold classes (one bias per class, no weights: the prior is all it
    changes). Centred to sum 0. Convex, solved with L-BFGS. Decisions subtract b."""
    gold = torch.as_tensor(gold, dtype=torch.long)
    if len(gold) == 0 or len(gold) != len(scores):
        raise PeftlabError("eval.calibration=val needs validation scores and their gold classes; the validation "
                           "split is empty (set data.n_val)")
    logp = class_log_probs(scores).detach()
    bias = torch.zeros(scores.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp - bias, gold)
        loss.backward()
        return loss

    optimizer.step(closure)
    offsets = bias.detach()
    return offsets - offsets.mean()


def decision_scores(scores: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """log p(class) among the label words minus the calibration offsets (None: uncalibrated)."""
    logp = class_log_probs(scores)
    return logp if offsets is None else logp - offsets.to(logp.dtype)


def decide(scores: torch.Tensor, encoder, config, score_rows, tokenizer, val_offsets: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, dict]:
    """Decision scores (N, C) of raw label-word scores under `config` (EvalConfig), and what was done.

    `score_rows(rows) -> (n, C) scores` scores more examples with the same model (the content-free
    inputs); `val_offsets` come from `fit_prior` on the validation split (eval.calibration=val).
    """
    from peftlab.data.examples import Example
    from peftlab.evaluate.scoring import build_rows

    norm = lambda s: normalise_scores(s, encoder.label_ids, encoder.bare_words, config.score_norm)  # noqa: E731
    info = {"score_norm": config.score_norm, "calibration": config.calibration}
    offsets = None
    if config.calibration == "content-free":
        # label=None: these examples belong to no class; encode() leaves their label unset.
        free = [Example(id=f"content-free:{i}", text=text, label=None) for i, text in enumerate(CONTENT_FREE_INPUTS)]
        offsets = content_free_offsets(norm(score_rows(build_rows(encoder.encode(free, tokenizer),
                                                                  encoder.label_ids))))
        info["content_free_inputs"] = list(CONTENT_FREE_INPUTS)
    elif config.calibration == "val":
        if val_offsets is None:
            raise PeftlabError("eval.calibration=val needs a validation split to fit the prior on; set data.n_val "
                               "(or use eval.calibration=content-free)")
        offsets = val_offsets
    if offsets is not None:
        info["log_prior_offsets"] = dict(zip(encoder.classes, [round(float(v), 6) for v in offsets]))
    return decision_scores(norm(scores), offsets), info


def fit_validation_prior(model, tokenizer, encoder, val_examples, config) -> torch.Tensor:
    """eval.calibration=val: `fit_prior` on the validation split as scored by the model as it is now
    (after each epoch the prior is fitted again), normalised as `config.score_norm` says."""
    from peftlab.evaluate.scoring import build_rows, read_ids, score_examples
    from peftlab.models import position_offset

    encoded = encoder.encode(val_examples, tokenizer)
    rows = build_rows(encoded, read_ids(model, encoder.label_ids))
    scores = score_examples(model, rows, len(encoder.classes), tokenizer.pad_token_id, position_offset(model),
                            config.eval_batch_size, config.max_batch_tokens, progress=False).scores
    normalised = normalise_scores(scores, encoder.label_ids, encoder.bare_words, config.score_norm)
    return fit_prior(normalised, [e.label for e in encoded])
