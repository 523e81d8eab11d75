"""A quantised frozen base (QLoRA, Dettmers et al. 2023): bitsandbytes 4-bit NF4 or 8-bit LLM.int8.

    peftlab train --model meta-llama/Llama-2-70b-hf --quantization 4bit --gradient-checkpointing ...

4bit is the QLoRA recipe: NF4 weights, double quantisation of the block scales, bf16 compute (a
70B base takes ~35 GiB; `peftlab plan` gives the whole budget). The adapter stays fp32 on top.
bitsandbytes' kernels run on CUDA GPUs only, so the choice is refused at once elsewhere.
"""

from __future__ import annotations

import importlib.util

import torch

from peftlab.errors import PeftlabError


def quantized_loading(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> dict:
    """Extra from_pretrained arguments that load the base quantised on `device` ({} for none)."""
    if quantization == "none":
        return {}
    if device.type != "cuda":
        raise PeftlabError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes' kernels run only "
                           f"there) but this run is on {device.type}; use --quantization none here, or "
                           "`peftlab plan` to size a GPU run")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeftlabError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16 if compute_dtype == torch.float32
                                    else compute_dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Quantised weights cannot be moved after loading: they are placed on the device as they load.
    return {"quantization_config": config, "device_map": {"": device}}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_for_training(model) -> None:
    """peft's k-bit preparation: freeze the base, cast norms and embeddings to fp32 for stable training.

    Gradient checkpointing is left to `train.gradient_checkpointing` (peft would switch it on).
    """
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
