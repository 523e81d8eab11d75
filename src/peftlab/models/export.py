"""`peftlab export`: the base model with a LoRA-family adapter merged into its weights, as a plain
Hugging Face folder (safetensors, config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads
without peft or peftlab.

peft's `merge_and_unload` adds each adapter's update to the weight it adapts (W + B A * alpha/r for
LoRA), so the merged model computes what base plus adapter computed. Prompt-learning adapters
(prompt tuning, p-tuning, prefix tuning) change the model's inputs, not its weights: there is nothing
to merge, and they are refused with what to do instead. An adapter with a classification head (train.objective=head,
models.head) merges into the sequence classifier it was trained on: the export is an
`XForSequenceClassification` folder for `AutoModelForSequenceClassification.from_pretrained`. The embedded smollm2 base comes from a GGUF
file; the export is a normal safetensors folder all the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.errors import PeftlabError

EXPORT_RECORD = "peftlab_export.json"
EXPORT_DTYPES = ("fp32", "bf16", "fp16")


def adapter_peft_type(adapter_dir: Path) -> str:
    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PeftlabError(f"{adapter_dir} is not a peft adapter folder (no readable adapter_config.json with a "
                           "peft_type); give the adapter/ folder of a training run") from None


def refuse_prompt_learning(adapter_dir: Path, peft_type: str) -> None:
    import peft

    if peft_type.upper() not in peft.PeftType.__members__:
        return  # load_adapter names the problem
    config_class = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType[peft_type.upper()]]
    if config_class().is_prompt_learning:
        raise PeftlabError(f"{adapter_dir} is a {peft_type} adapter: it learns virtual tokens fed in with the "
                           "input, not a change of the model's weights, so nothing can be merged into the base. "
                           "Use it as it is: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
                           f"'{adapter_dir}') with peft, or `peftlab predict --adapter {adapter_dir}`")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PeftlabError(f"--out {out} exists and is not an empty folder; give a new folder for the export")


def export_merged(adapter: str | Path, out: str | Path, dtype: str = "fp32", model_name: str | None = None) -> Path:
    """Merge `adapter` into its base model and save both (weights, config, tokenizer) into `out`."""
    import torch

    from peftlab.config import ModelConfig
    from peftlab.models.loading import DTYPES, load_base_model
    from peftlab.models.methods import load_adapter
    from peftlab.records import read_adapter_record, sha256_file, write_json

    adapter, out = Path(adapter).expanduser(), Path(out).expanduser()
    if dtype not in EXPORT_DTYPES:
        raise PeftlabError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    peft_type = adapter_peft_type(adapter)
    refuse_prompt_learning(adapter, peft_type)
    check_out(out)
    record = read_adapter_record(adapter) or {}
    name = model_name or record.get("config", {}).get("model", {}).get("name")
    if not name:
        raise PeftlabError(f"{adapter} has no peftlab record naming its base model; give it with --model")
    # The merge runs in fp32 (W + BA without rounding); the result is stored in the precision asked for.
    model, tokenizer = load_base_model(ModelConfig(name=name, dtype="fp32", device="cpu"))
    peft_model = load_adapter(model, adapter)
    try:
        merged = peft_model.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError) as exc:
        raise PeftlabError(f"peft cannot merge a {peft_type} adapter ({exc}); load it with "
                           "PeftModel.from_pretrained instead") from None
    merged = merged.to(DTYPES[dtype])
    merged.config.torch_dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # How the model was prompted: without the same template and label words its scores mean little.
    write_json(out / EXPORT_RECORD, {"adapter": str(adapter), "peft_type": peft_type, "base_model": name,
                                     "dtype": dtype, "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"),
                                     "prompt": record.get("prompt"), "config": record.get("config")})
    return out
