"""QLoRA settings on a machine without a GPU (clear refusals, the right bitsandbytes config) and
gradient checkpointing (less kept for backward, the same training)."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config import ModelConfig, build_config
from peftlab.errors import PeftlabError
from peftlab.models import load_base_model
from peftlab.models.quantization import quantized_loading
from peftlab.runs import run_train


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_a_gpu_is_refused_with_the_reason(tiny_model_dir, quantization):
    with pytest.raises(PeftlabError, match=f"quantization={quantization} needs a CUDA GPU"):
        load_base_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantization=quantization))


def test_the_cli_says_so_in_one_line(tiny_model_dir, imdb_dir, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(imdb_dir), "--n-train", "8", "--n-test", "4",
                 "--device", "cpu", "--quantization", "4bit", "--out", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a CUDA GPU" in err and err.count("\n") == 1


def test_4bit_is_the_qlora_recipe(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(PeftlabError, match="pip install bitsandbytes"):
        quantized_loading("4bit", cuda, torch.bfloat16)
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    kwargs = quantized_loading("4bit", cuda, torch.float32)
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": cuda}
    assert quantized_loading("8bit", cuda, torch.bfloat16)["quantization_config"].load_in_8bit
    assert quantized_loading("none", torch.device("cpu"), torch.float32) == {}


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, imdb_dir, tmp_path):
    weights = []
    for name, on in (("plain", False), ("ckpt", True)):
        run_train(build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "model.device": "cpu",
                                "data.source": str(imdb_dir), "data.n_train": 12, "data.n_test": 4,
                                "prompt.max_input_tokens": 40, "train.epochs": 1, "train.batch_size": 4,
                                "train.lr": 2e-2, "method.lora_dropout": 0.0, "train.gradient_checkpointing": on,
                                "train.checkpoint_every": 0, "out": str(tmp_path / name)}), progress=False)
        weights.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert any(weights[0][k].abs().sum() > 0 for k in weights[0] if "lora_B" in k)
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_gradient_checkpointing_is_switched_on_in_the_layers(tiny):
    from peftlab.config import MethodConfig
    from peftlab.models.methods import attach_method, enable_gradient_checkpointing

    peft_model = attach_method(tiny[0], MethodConfig(), seed=0)
    enable_gradient_checkpointing(peft_model)
    layers = [m for n, m in peft_model.named_modules() if n.endswith(("layers.0", "layers.1"))]
    assert len(layers) == 2 and all(m.gradient_checkpointing for m in layers)
