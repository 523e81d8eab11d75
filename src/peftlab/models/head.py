"""A classification head (`train.objective: head`, issue 13): `AutoModelForSequenceClassification`'s recipe.

The head is what transformers puts on these architectures for sequence classification: a bias-free
`nn.Linear(hidden_size, k)` named `score` on the final hidden state (after the final norm). peftlab
builds that very model, `XForSequenceClassification`, around the causal LM's own decoder (shared, not
copied: the LM head is left out, nothing is loaded twice), and peft wraps it as it wraps any sequence
classifier (task_type SEQ_CLS): `score` becomes one of peft's `modules_to_save`, trained with the
adapter and saved into adapter_model.safetensors beside it. So the adapter folder is what plain
`AutoModelForSequenceClassification.from_pretrained(base, num_labels=k, pad_token_id=...)` +
`PeftModel.from_pretrained(model, adapter)` reloads (README, "A classification head"); the best-known
bug of this recipe, a head that is not saved or not reloaded (peft #310, #577, #876, #1070), is what
tests/unit/test_head.py checks against.

peftlab reads the head's class logits at the last prompt token itself (evaluate.scoring.position_outputs),
the position where label-word scoring reads its next-token distribution, instead of taking
transformers' pooled logits: those pick the last non-pad token of `input_ids`, and cannot see padding
when the input comes as embeddings (prompt tuning) or behind a shared prefix cache.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.errors import PeftlabError

HEAD_MODULE = "score"  # the name transformers gives the head of LLaMA, Gemma, Qwen2, Mistral, GPT-2, ...
HEAD_TASK_TYPE = "SEQ_CLS"


@dataclass(frozen=True)
class HeadSpec:
    """The head a run trains: one output per class, and the pad id transformers' own pooling needs."""

    classes: list[str]
    pad_token_id: int | None


def with_class_head(causal_lm, spec: HeadSpec):
    """`XForSequenceClassification` sharing `causal_lm`'s decoder, with a fresh `score` head (seeded by the
    caller's torch seed, initialised as transformers initialises a missing head: normal, std initializer_range).

    The decoder's modules are the causal LM's own, so an adapter injected into them (LoRA) and removed again
    (methods.detach_method) leaves the causal LM as it was.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = len(spec.classes)
    config.id2label = dict(enumerate(spec.classes))
    config.label2id = {c: i for i, c in enumerate(spec.classes)}
    text = config.get_text_config()
    if spec.pad_token_id is not None:
        config.pad_token_id = text.pad_token_id = spec.pad_token_id
    try:
        with torch.device("meta"):  # the class's own layout, without allocating a second decoder
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:  # an architecture transformers has no sequence classifier for
        raise PeftlabError(f"train.objective=head needs a sequence-classification model of the base's architecture "
                           f"({config.model_type}), and transformers has none ({str(exc).splitlines()[0]}); use "
                           "train.objective=label-words") from None
    prefix = model.base_model_prefix
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if decoder is None or not hasattr(model, prefix) or not hasattr(model, HEAD_MODULE):
        raise PeftlabError(f"train.objective=head: {type(model).__name__} has no `{HEAD_MODULE}` head on a "
                           f"`{prefix}` decoder; use train.objective=label-words for this architecture")
    setattr(model, prefix, decoder)
    weight = next(decoder.parameters())
    head = torch.nn.Linear(text.hidden_size, len(spec.classes), bias=False, device=weight.device,
                           dtype=torch.float32)  # trainable weights stay fp32 on a bf16 base (GUIDE, section 3)
    torch.nn.init.normal_(head.weight, std=getattr(text, "initializer_range", 0.02))
    setattr(model, HEAD_MODULE, head)
    model.eval()
    return model


def class_head(model):
    """The classification head of a peft model built on `with_class_head` (peft's wrapper of `score`),
    else None: the model answers with its LM head, over the vocabulary."""
    config = getattr(model, "active_peft_config", None)
    if config is None or config.task_type != HEAD_TASK_TYPE:
        return None
    return getattr(model.get_base_model(), HEAD_MODULE, None)


def refuse_headless_method(peft_type: str) -> None:
    """A peft method that cannot carry a head here: one clear line.

    peft's SEQ_CLS forward for prefix tuning hands the prefix over as `past_key_values`, and looks for that
    argument in the model's forward; transformers 5 renamed it `cache`, so peft falls back to a BERT-style
    pooler path that raises for every decoder model. Checked on the installed transformers, so that a release
    that agrees again with peft lifts the refusal.
    """
    if peft_type not in ("PREFIX_TUNING", "CARTRIDGE"):
        return
    from transformers.modeling_layers import GenericForSequenceClassification

    if "past_key_values" not in inspect.signature(GenericForSequenceClassification.forward).parameters:
        import peft
        import transformers

        raise PeftlabError(f"{peft_type.lower().replace('_', '-')} cannot carry a classification head: peft "
                           f"{peft.__version__}'s sequence-classification path passes the prefix as past_key_values, "
                           f"which transformers {transformers.__version__} models no longer take; use --method "
                           "prompt-tuning, p-tuning or lora with --objective head, or --objective label-words")


def adapter_head_size(adapter_dir: Path) -> int | None:
    """The number of classes of a saved SEQ_CLS adapter's `score` head (read from the safetensors header),
    None for an adapter without a head (task_type CAUSAL_LM)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    try:
        task_type = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None  # methods.load_adapter names the problem
    if task_type != HEAD_TASK_TYPE:
        return None
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys() if k.endswith(f"{HEAD_MODULE}.weight")}
    except Exception:  # noqa: BLE001 - a damaged file: load_adapter reports it with its fix
        return None
    if not shapes:
        raise PeftlabError(f"{adapter_dir} is a sequence-classification adapter without a `{HEAD_MODULE}` head in "
                           "adapter_model.safetensors; peftlab reads heads named score (AutoModelForSequenceClassification "
                           "of decoder models)")
    return int(next(iter(shapes.values()))[0])


def head_record(model) -> dict | None:
    """What a plain transformers + peft user needs to rebuild the classifier (peftlab.json "head")."""
    head = class_head(model)
    if head is None:
        return None
    config = model.get_base_model().config
    return {"module": HEAD_MODULE, "task_type": HEAD_TASK_TYPE, "num_labels": config.num_labels,
            "id2label": {str(i): c for i, c in config.id2label.items()}, "label2id": dict(config.label2id),
            "pad_token_id": config.get_text_config().pad_token_id, "reads": "the last prompt token",
            "class_scores": "log-softmax of the head's logits"}
