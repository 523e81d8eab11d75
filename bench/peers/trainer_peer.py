"""Peer 3: LoRA fine-tuning with ``peft.get_peft_model`` + ``transformers.Trainer``.

The recipe the peft docs show (Quicktour, "Train" section; "LoRA" task guides):
wrap the base model with ``get_peft_model(model, peft_config)``, build a
``datasets.Dataset``, a padding data collator and ``TrainingArguments``, and
call ``Trainer(...).train()``.  Prompt masking follows the Stanford Alpaca
training script (``train.py::preprocess``): tokenise ``prompt`` and
``prompt + target + eos``, then set ``labels = -100`` on the prompt tokens.
Padding is done per batch by ``DataCollatorForSeq2Seq``, which pads
``labels`` with ``-100`` (``DataCollatorForLanguageModeling`` would instead
mask every token equal to ``pad_token_id`` -- and SmolLM2's pad token *is*
its EOS, so it would silently drop the EOS target).

Precision: the caller passes ``bf16``; on CPU ``Trainer`` (via accelerate)
then runs the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``
with fp32 master weights -- it does not cast the model.

Note: ``get_peft_model`` injects LoRA layers into ``model`` *in place*; give
this function a fresh copy of the base model.

GGUF checkpoints: transformers 5.x loads a ``.gguf`` file through
``GgufHfQuantizer``; the weights are de-quantized to ordinary float tensors at
load time, but the model keeps ``is_quantized=True`` and ``hf_quantizer``, and
``Trainer.__init__`` then refuses it ("quantized with QuantizationMethod.GGUF
but that quantization method do not support training").  ``model.dequantize()``
is not implemented for GGUF either.  Since nothing is actually quantized, we
drop the stale marker with the quantizer's own ``remove_quantization_config``
(only for GGUF, and only when every parameter is a float tensor).
"""

from __future__ import annotations

import math
import tempfile
from typing import Optional

import torch

from ._common import Timer, model_device, peak_rss_mb


def build_dataset(tokenizer, prompts, targets, add_eos=True, max_length=None):
    """Alpaca-style supervised examples: labels are -100 on the prompt tokens."""
    from datasets import Dataset

    eos = tokenizer.eos_token if (add_eos and tokenizer.eos_token) else ""
    trunc = {"truncation": True, "max_length": max_length} if max_length else {}

    def tokenize(ex):
        prompt_ids = tokenizer(ex["prompt"], **trunc)["input_ids"]
        full = tokenizer(ex["prompt"] + ex["target"] + eos, **trunc)
        labels = list(full["input_ids"])
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [-100] * n
        return {
            "input_ids": full["input_ids"],
            "attention_mask": full["attention_mask"],
            "labels": labels,
        }

    ds = Dataset.from_dict({"prompt": list(prompts), "target": list(targets)})
    return ds.map(tokenize, remove_columns=["prompt", "target"])


def strip_gguf_quantization_marker(model) -> bool:
    """Make a GGUF-loaded (already de-quantized) model acceptable to ``Trainer``.

    Returns True when a marker was removed.  Other quantization methods are left
    alone (``Trainer`` keeps its own checks for them).
    """
    q = getattr(model, "hf_quantizer", None)
    if q is None or not getattr(model, "is_quantized", False):
        return False
    method = str(getattr(q.quantization_config, "quant_method", "")).lower()
    if "gguf" not in method:
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False
    q.remove_quantization_config(model)
    return True


def train_with_trainer(
    model,
    tokenizer,
    prompts: list[str],
    targets: list[str],
    peft_config,
    epochs: int = 1,
    lr: float = 5e-4,
    batch_size: int = 8,
    seed: int = 0,
    bf16: bool = False,
    max_steps: Optional[int] = None,
    logging_steps: int = 10,
    max_length: Optional[int] = None,
    add_eos: bool = True,
    output_dir: Optional[str] = None,
) -> dict:
    """Fine-tune ``model`` with ``peft_config`` through ``transformers.Trainer``.

    Returns ``{"model", "seconds", "tokens", "target_tokens", "tokens_per_s",
    "peak_rss_mb", "peak_gpu_mb", "final_loss", "train_loss", "steps", "log_history"}``:

    * ``seconds``: wall time of ``trainer.train()`` (dataloading, forward, backward, optimizer);
    * ``tokens``: real (non-pad) input tokens trained on, from the Trainer's own
      ``include_num_input_tokens_seen="non_padding"`` counter;
    * ``target_tokens``: supervised (label != -100) tokens in those steps;
    * ``peak_rss_mb``: process peak RSS (``ru_maxrss``: a lifetime peak, so it
      includes loading the model); ``peak_gpu_mb``: ``torch.cuda.max_memory_allocated``
      during training on CUDA, else ``None``;
    * ``final_loss``: last logged training loss (mean over the last
      ``logging_steps`` steps); ``train_loss``: Trainer's mean over the whole run.
    """
    from peft import get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    if tokenizer.pad_token is None:  # the usual notebook fix-up
        tokenizer.pad_token = tokenizer.eos_token

    strip_gguf_quantization_marker(model)
    set_seed(seed)  # LoRA init happens in get_peft_model, before Trainer seeds
    model = get_peft_model(model, peft_config)
    train_ds = build_dataset(tokenizer, prompts, targets, add_eos=add_eos, max_length=max_length)

    collator = DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
    )
    on_cuda = torch.cuda.is_available() and model_device(model).type == "cuda"

    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trainer_peer_")
        output_dir = tmp.name
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        learning_rate=lr,
        bf16=bf16,
        use_cpu=not on_cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=logging_steps,
        seed=seed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )

    # count supervised tokens per *training* forward (not per collated batch: accelerate's
    # dataloader collates one batch ahead)
    target_tokens = [0]

    def _count(_module, _args, kwargs):
        if _module.training and kwargs.get("labels") is not None:
            target_tokens[0] += int((kwargs["labels"][:, 1:] != -100).sum())

    hook = model.register_forward_pre_hook(_count, with_kwargs=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with Timer(model_device(model)) as t:
            result = trainer.train()
    finally:
        hook.remove()
        if tmp is not None:
            tmp.cleanup()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "model": trainer.model,
        "seconds": t.seconds,
        "tokens": tokens,
        "target_tokens": target_tokens[0],
        "tokens_per_s": tokens / t.seconds if t.seconds > 0 else math.nan,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "final_loss": float(losses[-1]) if losses else float(result.training_loss),
        "train_loss": float(result.training_loss),
        "steps": int(trainer.state.global_step),
        "log_history": list(trainer.state.log_history),
    }
