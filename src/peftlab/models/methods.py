"""Attaching a peft method to the frozen base: LoRA, prompt tuning, or any other peft method.

All method differences live here, so that the training loop (train/loop.py) is one for every method.
Trainable weights are kept in fp32 on a bf16 base (peft's `autocast_adapter_dtype`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftlab.config import MethodConfig
from peftlab.errors import PeftlabError
from peftlab.models.head import HeadSpec, adapter_head_size, refuse_headless_method, with_class_head

# Methods that prepend virtual tokens to the input embeddings, shifting every position by V.
# Prefix tuning puts its virtual tokens in the KV cache instead and shifts nothing.
SHIFTING_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def peft_type_name(method: str) -> str:
    """'prompt-tuning' -> 'PROMPT_TUNING', the name of peft's PeftType member."""
    import peft

    name = method.upper().replace("-", "_")
    if name not in peft.PeftType.__members__:
        known = sorted(m.lower().replace("_", "-") for m in peft.PeftType.__members__)
        raise PeftlabError(f"unknown peft method {method!r}; choose one of: {', '.join(known)}")
    return name


def build_peft_config(config: MethodConfig, head: bool = False):
    """The peft config object for `config.method`, filled from the method's fields and peft_options; with
    `head`, of task type SEQ_CLS (peft then trains and saves the `score` head with the adapter)."""
    import peft

    name = peft_type_name(config.method)
    if name == "ADALORA":
        # AdaLoRA's rank budget moves only when the training loop calls update_and_allocate(step) after each
        # optimiser step, and its orthogonality penalty joins the loss only inside peft's forward with labels;
        # peftlab's loop does neither, so it would train a plain SVD-shaped LoRA under AdaLoRA's name.
        raise PeftlabError("method adalora is not supported: its rank allocation needs a training loop that calls "
                           "update_and_allocate at every step; use lora (or lora with peft_options {use_rslora: "
                           "true}, or use_dora)")
    options = dict(config.peft_options or {})
    if name == "LORA":
        kwargs = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules)
    elif name == "PROMPT_TUNING":
        # Initialised by peftlab (init_prompt_embeddings), not by peft: peft's TEXT init reloads the
        # tokenizer from a path, which a GGUF or in-memory model cannot give it.
        kwargs = dict(num_virtual_tokens=config.virtual_tokens,
                      prompt_tuning_init=peft.PromptTuningInit.RANDOM)
    elif name in ("PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        kwargs = dict(num_virtual_tokens=config.virtual_tokens)
    else:
        kwargs = {}
    kwargs.update(options)
    config_class = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType[name]]
    try:
        return config_class(task_type=peft.TaskType.SEQ_CLS if head else peft.TaskType.CAUSAL_LM, **kwargs)
    except (TypeError, ValueError) as exc:
        glued = [k for k in options if isinstance(k, str) and ":" in k]
        # YAML reads {r:8} as the key "r:8" with no value: a flow mapping needs a space after each colon.
        hint = f"; write {{{glued[0].split(':')[0]}: ...}} with a space after the colon" if glued else ""
        raise PeftlabError(f"invalid options for peft method {config.method!r}: {exc}{hint}") from None


def attach_method(model, config: MethodConfig, init_ids: list[int] | None = None, seed: int = 0,
                  head: HeadSpec | None = None):
    """Wrap `model` in a fresh trainable peft model; for prompt tuning, initialise the prompt. With `head`
    (train.objective=head), the model becomes a sequence classifier with a fresh `score` head (models.head)."""
    import peft

    from peftlab.models.quantization import is_quantized, prepare_quantized_for_training

    peft_config = build_peft_config(config, head=head is not None)
    if head is not None:
        refuse_headless_method(peft_config.peft_type.name)
    if is_quantized(model):
        prepare_quantized_for_training(model)
    torch.manual_seed(seed)  # adapter initialisation is part of the run's seed, not of import order
    if head is not None:
        model = with_class_head(model, head)
    try:
        peft_model = peft.get_peft_model(model, peft_config)
    except ValueError as exc:
        raise PeftlabError(f"cannot apply {config.method} to this model: {exc}") from None
    if peft_model.peft_config["default"].peft_type.name == "PROMPT_TUNING":
        init_prompt_embeddings(peft_model, config, init_ids or [], seed)
    return peft_model


def enable_gradient_checkpointing(peft_model) -> None:
    """Keep only each decoder layer's input for backward and recompute the rest (`train.gradient_checkpointing`).

    Non-reentrant checkpointing: it needs no input that requires grad, so the frozen embeddings
    stay as they are. transformers applies it in training mode only; scoring runs without it.
    """
    base = peft_model.get_base_model()
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the transformers 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def detach_method(peft_model):
    """The base model without the adapter, as it was before `attach_method` (LoRA is injected in place)."""
    if peft_model.peft_config["default"].is_prompt_learning:
        return peft_model.get_base_model()
    return peft_model.unload()


def prompt_init_ids(config: MethodConfig, tokenizer, instruction: str, label_ids: list[list[int]]) -> list[int]:
    """Token ids whose embeddings start the virtual tokens (Lester et al. 2021, section 3.1)."""
    if config.prompt_init == "text":
        return tokenizer(config.prompt_init_text or instruction, add_special_tokens=False)["input_ids"]
    if config.prompt_init == "labels":
        text = tokenizer(config.prompt_init_text or instruction, add_special_tokens=False)["input_ids"]
        return [i for ids in label_ids for i in ids] + text
    return []


def init_prompt_embeddings(peft_model, config: MethodConfig, init_ids: list[int], seed: int) -> None:
    """Set the V virtual-token embeddings from token ids (repeated to fill V) or vocabulary samples."""
    embedding = peft_model.prompt_encoder["default"].embedding
    word_embeddings = peft_model.word_embeddings
    v = config.virtual_tokens
    if config.prompt_init in ("text", "labels"):
        if not init_ids:
            raise PeftlabError("prompt_init_text tokenises to nothing; give a non-empty text")
        ids = (init_ids * (v // len(init_ids) + 1))[:v]  # as peft's TEXT init: repeat, then cut to V
    elif config.prompt_init == "vocab":
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, word_embeddings.num_embeddings, (v,), generator=generator).tolist()
    else:
        return  # random: peft's own normal initialisation
    with torch.no_grad():
        vectors = word_embeddings(torch.tensor(ids, device=word_embeddings.weight.device))
        embedding.weight.copy_(vectors.to(embedding.weight.dtype))


def position_offset(model) -> int:
    """How many virtual tokens the active peft method puts in front of the input ids."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is None or not peft_config.is_prompt_learning:
        return 0
    return peft_config.num_virtual_tokens if peft_config.peft_type.name in SHIFTING_PEFT_TYPES else 0


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(base_model, adapter_dir: str | Path):
    """A saved adapter on top of `base_model`, as plain peft would load it; mismatches are named. An adapter
    with a classification head (task_type SEQ_CLS) goes on `base_model`'s sequence classifier (models.head)."""
    import peft

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise PeftlabError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json); "
                           "give the adapter/ folder of a training run")
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise PeftlabError(f"{adapter_dir} holds adapter_model.bin, a pickle file that can run code when "
                               "loaded; peftlab loads adapters only from adapter_model.safetensors: convert it "
                               "once where you trust the file (peft: from_pretrained, then save_pretrained)")
        raise PeftlabError(f"{adapter_dir} has no adapter_model.safetensors; peftlab loads adapters "
                           "only in the safetensors format (pickled .bin files can run code)")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
        raise PeftlabError(f"{config_file} is not valid JSON ({reason}); the adapter is damaged") from None
    peft_type = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
    if str(peft_type).upper() not in peft.PeftType.__members__:
        raise PeftlabError(f"{config_file} names peft_type {peft_type!r}, which peft {peft.__version__} does not "
                           "know; the adapter is damaged or was made by another tool")
    n_classes = adapter_head_size(adapter_dir)
    if n_classes is not None:
        base_model = with_class_head(base_model, adapter_head_spec(adapter_dir, base_model, n_classes))
    try:
        model = peft.PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except (TypeError, KeyError) as exc:  # fields of adapter_config.json that peft's config class rejects
        raise PeftlabError(f"{config_file} does not describe a valid {peft_type} adapter ({type(exc).__name__}: "
                           f"{exc}); the adapter is damaged") from None
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise PeftlabError(f"adapter {adapter_dir} was trained on a different base model (weight "
                               "shapes differ); pass the --model it was trained with") from None
        raise
    except Exception as exc:
        if "safetensors" in type(exc).__module__ or "header" in str(exc).lower():
            raise PeftlabError(f"{weights} is corrupt ({exc}); retrain or restore the adapter") from None
        raise
    model.eval()
    return model


def adapter_head_spec(adapter_dir: Path, base_model, n_classes: int) -> HeadSpec:
    """The head of a saved SEQ_CLS adapter: its classes and pad id from peftlab.json, else generic ones."""
    from peftlab.records import read_adapter_record

    head = (read_adapter_record(adapter_dir) or {}).get("head") or {}
    names = head.get("id2label") or {}
    classes = [str(names.get(str(i), f"LABEL_{i}")) for i in range(n_classes)]
    config = base_model.config.get_text_config()
    pad = head.get("pad_token_id", config.pad_token_id if config.pad_token_id is not None else config.eos_token_id)
    return HeadSpec(classes, pad[0] if isinstance(pad, (list, tuple)) else pad)
