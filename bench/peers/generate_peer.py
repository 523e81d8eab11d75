"""Peer 1: classify by free generation (``model.generate``) and answer parsing.

This is how the study and most fine-tuning notebooks score a sentiment
classifier: render the Alpaca prompt, let the model greedily write a few
tokens, decode only the *new* tokens and look for a label word in them.

It follows the transformers docs for batched generation with decoder-only
models ("LLM prompting guide" / "Generation with LLMs", section *Wrong padding
side*): the tokenizer must pad on the **left** so every row's last prompt
token sits right before the first generated one, the ``attention_mask`` is
passed to ``generate`` and a ``pad_token_id`` is set (``eos`` if the
tokenizer has no pad token).  Greedy decoding = ``do_sample=False,
num_beams=1``.  The model runs in whatever dtype/device the caller loaded it
in; nothing is cast here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import Timer, model_device


def parse_label(text: str, label_words: Sequence[str]) -> Optional[int]:
    """Index of the label word that appears first in ``text`` (case-insensitive).

    ``None`` when no label word occurs: the bench counts that answer as wrong.
    Ties at the same position (one label a prefix of another) go to the longer word.
    """
    low = text.lower()
    best = None  # (position, -len, index)
    for i, w in enumerate(label_words):
        pos = low.find(w.lower())
        if pos >= 0:
            key = (pos, -len(w), i)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


def predict_by_generate(
    model,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    batch_size: int = 8,
    max_new_tokens: int = 4,
) -> dict:
    """Greedy batched ``generate`` + "first label word in the answer" parsing.

    Returns ``{"preds", "texts", "seconds", "prompt_tokens", "generated_tokens"}``:

    * ``preds``: index into ``label_words`` per prompt, ``None`` if no label word was produced;
    * ``texts``: the decoded new tokens per prompt (for inspection);
    * ``seconds``: wall time of tokenisation + generation + decoding for all prompts;
    * ``prompt_tokens``: real (non-pad) prompt tokens, summed over prompts;
    * ``generated_tokens``: new tokens the model actually produced, summed over
      prompts -- up to and including the first EOS; the pad filler that
      ``generate`` appends to rows that finished early is not counted.
    """
    device = model_device(model)
    eos = _eos_ids(model, tokenizer)

    old_side = tokenizer.padding_side
    old_pad = tokenizer.pad_token
    tokenizer.padding_side = "left"  # required for batched decoder-only generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()

    preds: list[Optional[int]] = []
    texts: list[str] = []
    prompt_tokens = 0
    generated_tokens = 0
    try:
        with Timer(device) as t, torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
                prompt_tokens += int(enc["attention_mask"].sum())
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for row in new:
                    n = len(row)
                    for j, tok_id in enumerate(row):
                        if tok_id in eos:
                            n = j + 1
                            break
                    generated_tokens += n
                    text = tokenizer.decode(row[:n], skip_special_tokens=True)
                    texts.append(text)
                    preds.append(parse_label(text, label_words))
    finally:
        tokenizer.padding_side = old_side
        tokenizer.pad_token = old_pad
        if was_training:
            model.train()

    return {
        "preds": preds,
        "texts": texts,
        "seconds": t.seconds,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
    }
