"""`peftlab export`: a trained LoRA merged into its base gives, loaded with plain transformers, the
label-word scores peft's unmerged forward gives; prompt-learning adapters are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config import build_config
from peftlab.runs import predict, run_train

TEXTS = ["a wonderful film , great acting", "terrible , boring and bad", "it was fine i guess", "awful awful"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(tiny_model_dir, imdb_dir, out, method="lora"):
    run_train(build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
                            "data.n_train": 16, "data.n_test": 8, "prompt.max_input_tokens": 40, "train.epochs": 1,
                            "train.batch_size": 4, "train.lr": 5e-2, "method.method": method, "method.lora_r": 4,
                            "method.virtual_tokens": 4, "out": str(out)}), progress=False)
    return out / "adapter"


def scores(rows):
    return torch.tensor([[row["scores"][c] for c in ("negative", "positive")] for row in rows])


def test_the_merged_export_scores_as_the_unmerged_adapter(tiny_model_dir, imdb_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = train(tiny_model_dir, imdb_dir, tmp_path / "run")
    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(b.abs().max() > 0 for b in lora_b)  # B starts at 0: an untrained LoRA changes nothing
    assert main(["export", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model:" in capsys.readouterr().out
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(merged_dir / "model.safetensors"))

    settings = {"model.name": str(tiny_model_dir), "model.dtype": "fp32", "prompt.max_input_tokens": 40}
    config = build_config(settings)
    base = scores(predict(TEXTS, config))
    unmerged = scores(predict(TEXTS, build_config({**settings, "adapter": str(adapter)})))  # peft, unmerged
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # no peft, no peftlab loading
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = scores(predict(TEXTS, config, model=plain.eval(), tokenizer=tokenizer))
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the scores, so the comparison means something
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    record = json.loads((merged_dir / "peftlab_export.json").read_text())
    assert record["peft_type"] == "LORA" and record["prompt"]["classes"] == ["negative", "positive"]


def test_bf16_export_halves_the_weights(tiny_model_dir, imdb_dir, tmp_path):
    adapter = train(tiny_model_dir, imdb_dir, tmp_path / "run")
    assert main(["export", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_prompt_learning_adapters_are_refused_with_what_to_do(tiny_model_dir, imdb_dir, tmp_path, capsys, method):
    adapter = train(tiny_model_dir, imdb_dir, tmp_path / "run", method=method)
    assert main(["export", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "nothing can be merged" in err and "PeftModel.from_pretrained" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "merged").exists()


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").is_file()
