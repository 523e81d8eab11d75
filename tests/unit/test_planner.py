"""The memory planner: its activation model against what autograd really saves, built-in shapes, the CLI."""

import json
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.models.planner import (
    BUILTIN_CONFIGS,
    PlanRequest,
    layer_activation_bytes,
    plan_memory,
    read_model_shape,
    shape_from_config,
)

SHAPE = dict(model_type="llama", vocab_size=500, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)


def saved_bytes(config: dict, layers: int, dtype, method: str, dropout: float, checkpointing: bool,
                batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward in one forward pass (parameters excluded, shared storage once)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**config, "num_hidden_layers": layers}, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype).requires_grad_(False)
    if method == "lora":
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM")
    else:
        peft_config = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, peft_config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, config["vocab_size"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # peftlab's batches are right-padded
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor([seq - 1]), use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype, method, dropout", [
    (torch.bfloat16, "lora", 0.1), (torch.bfloat16, "lora", 0.0), (torch.float32, "lora", 0.1),
    (torch.bfloat16, "prompt-tuning", 0.0)])
def test_activations_per_layer_match_what_autograd_saves(dtype, method, dropout):
    # One layer's cost is the difference between a 3- and a 2-layer model: no embedding or head terms.
    batch, seq = 4, 96
    tokens = batch * (seq + 4 * (method != "lora"))  # prompt tuning prepends 4 virtual tokens
    measured = (saved_bytes(SHAPE, 3, dtype, method, dropout, False, batch, seq)
                - saved_bytes(SHAPE, 2, dtype, method, dropout, False, batch, seq)) / tokens
    shape = shape_from_config(SHAPE, "tiny")
    req = PlanRequest(method=method, dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], device="cpu",
                      lora_dropout=dropout, virtual_tokens=4)
    predicted = layer_activation_bytes(shape, req, seq + 4 * (method != "lora"), 2 if dtype == torch.bfloat16 else 4)
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)


def test_gradient_checkpointing_keeps_only_each_layers_input():
    batch, seq = 4, 96
    measured = (saved_bytes(SHAPE, 3, torch.bfloat16, "lora", 0.1, True, batch, seq)
                - saved_bytes(SHAPE, 2, torch.bfloat16, "lora", 0.1, True, batch, seq))
    req = PlanRequest(dtype="bf16", device="cpu", batch_size=batch, seq_len=seq, gradient_checkpointing=True)
    plan = plan_memory(shape_from_config({**SHAPE, "num_hidden_layers": 1}, "tiny"), req)
    layer_inputs = plan.train["activations"] - 4 * SHAPE["hidden_size"] * batch * seq  # minus the final norm
    assert layer_inputs == measured


def test_builtin_llama2_shapes_have_the_published_sizes():
    sizes = {name: read_model_shape(name).parameters() / 1e9 for name in BUILTIN_CONFIGS}
    assert sizes["meta-llama/Llama-2-7b-hf"] == pytest.approx(6.74, abs=0.01)
    assert sizes["meta-llama/Llama-2-13b-hf"] == pytest.approx(13.02, abs=0.01)
    assert sizes["meta-llama/Llama-2-70b-hf"] == pytest.approx(68.98, abs=0.01)


def test_70b_fits_one_80gb_gpu_only_in_4bit_with_checkpointing():
    shape = read_model_shape("meta-llama/llama-2-70b-hf")  # case does not matter
    full = plan_memory(shape, PlanRequest(seq_len=512))
    qlora = plan_memory(shape, PlanRequest(seq_len=512, quantization="4bit", gradient_checkpointing=True))
    assert full.train["weights"] > 128 * 2**30 and full.verdict(80 * 2**30) == "does NOT fit"
    assert 30 * 2**30 < qlora.train["weights"] < 40 * 2**30 and qlora.verdict(80 * 2**30) == "fits"
    sharded = plan_memory(shape, PlanRequest(seq_len=512, devices=8, strategy="fsdp", gradient_checkpointing=True))
    assert sharded.train["weights"] == full.train["weights"] // 8


def test_plan_cli_works_offline_for_the_study_models(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "--model", "meta-llama/Llama-2-70b-hf", "--quantization", "4bit", "--gradient-checkpointing",
                 "--batch-size", "8", "--seq-len", "512", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "68.98 B parameters" in out and "4-bit NF4" in out and ": fits" in out
    for part in ("weights", "adapters", "gradients", "optimiser", "activations", "logits", "temporaries"):
        assert part in out
    # a zero-shot config plans evaluation only; its 70B bf16 base needs two 80 GB GPUs with FSDP
    root = Path(__file__).resolve().parents[2]
    args = ["plan", "--config", str(root / "configs/llama2/zero-shot-70b.yaml"), "--device", "cuda", "--device-memory", "80"]
    assert main(args + ["--devices", "2"]) == 0
    out = capsys.readouterr().out
    assert "evaluation only" in out and ": fits" in out
    assert main(args + ["--devices", "1"]) == 0 and "does NOT fit" in capsys.readouterr().out


def test_plan_reads_a_model_folder_and_a_config_json(tiny_model_dir, capsys):
    assert main(["plan", "--model", str(tiny_model_dir), "--device-memory", "1", "--seq-len", "64"]) == 0
    assert "2 layers, hidden 32" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_model_dir / "config.json"), "--method", "prompt-tuning",
                 "--device-memory", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "prompt tuning, 20 virtual tokens" in out and "does NOT fit" in out


def test_plan_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env is too late
    assert main(["plan", "--model", "nobody/no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "Offline?" in err and "meta-llama/Llama-2-70b-hf" in err and err.count("\n") == 1
    assert main(["plan", "--model", "meta-llama/Llama-2-7b-hf", "--method", "ia3"]) == 2
    assert "sizes lora and prompt-tuning" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PeftlabError, match="has no"):
        read_model_shape(str(bad))
