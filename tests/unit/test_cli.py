"""The CLI end to end on the tiny model: the output tree, adapters other tools load, clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from peftlab.cli import main

METRIC_KEYS = {"accuracy", "ci95", "n", "per_class", "confusion", "per_epoch", "best_epoch", "timings",
               "eval_tokens_per_s", "train_tokens_per_s", "config", "seed", "data_seed", "versions", "hardware",
               "trainable_parameters", "peak_memory_mb", "truncated_share", "git_commit"}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, imdb_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(imdb_dir), "--n-train", "16", "--n-test", "12",
            "--epochs", "2", "--lr", "1e-2", "--lora-r", "4", "--max-input-tokens", "40", "--out", str(out),
            "--dtype", "fp32", "--quiet"]
    assert main(args) == 0
    return out


def test_train_writes_the_run_folder(trained):
    assert (trained / "config.yaml").is_file()
    assert {p.name for p in (trained / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                  "peftlab.json"}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 12
    assert [e["epoch"] for e in metrics["per_epoch"]] == [1, 2] and metrics["best_epoch"] in (1, 2)
    assert metrics["config"]["method"]["lora_r"] == 4
    lines = [json.loads(x) for x in (trained / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {"id", "label", "pred", "scores"} <= set(lines[0])
    assert sum(x["correct"] for x in lines) / 12 == pytest.approx(metrics["accuracy"])


def test_eval_of_the_adapter_reproduces_the_training_predictions(trained, imdb_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(trained / "adapter"), "--data", str(imdb_dir), "--n-test", "12",
                 "--out", str(out), "--dtype", "fp32", "--quiet"]) == 0
    before = [json.loads(x) for x in (trained / "predictions.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(a["id"], a["pred"]) for a in after] == [(b["id"], b["pred"]) for b in before]
    for a, b in zip(after, before):
        for c in a["scores"]:
            assert a["scores"][c] == pytest.approx(b["scores"][c], abs=1e-4)


def test_plain_peft_loads_the_adapter_and_gives_the_same_scores(trained, tiny_model_dir, imdb_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.config import DataConfig, PromptConfig
    from peftlab.data import load_splits
    from peftlab.prompts import build_prompt_encoder

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, trained / "adapter").eval()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=40), ["negative", "positive"], True)
    test = {e.id: e for e in load_splits(DataConfig(source=str(imdb_dir))).test}
    lines = [json.loads(x) for x in (trained / "predictions.jsonl").read_text().splitlines()][:4]
    for line in lines:
        [ex] = enc.encode([test[line["id"]]], tok)
        for c, label in enumerate(enc.label_ids):
            seq = torch.tensor([ex.prompt_ids + label])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            n = len(ex.prompt_ids)
            score = sum(lp[n - 1 + j, t].item() for j, t in enumerate(label))
            assert score == pytest.approx(line["scores"][enc.classes[c]], abs=1e-4)


def test_predict_from_arguments_and_stdin(trained, capsys, monkeypatch):
    assert main(["predict", "--adapter", str(trained / "adapter"), "--dtype", "fp32", "great film", "awful"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great film", "awful"]
    assert all(r["pred"] in ("negative", "positive") and 0.5 <= r["prob"] <= 1 for r in rows)
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("one review\n\nanother review\n"))
    assert main(["predict", "--adapter", str(trained / "adapter"), "--dtype", "fp32"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["eval", "--data", "./missing/aclImdb.tar.gz"], "does not exist"),
    (["train", "--lora-r", "0"], "method.lora_r=0 must be > 0"),
    (["train", "--n-train", "7"], "balanced"),
    (["train", "--method", "magic"], "unknown peft method"),
    (["eval", "--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["eval", "--adapter", "./no/adapter"], "adapter folder ./no/adapter does not exist"),
    (["train", "--lr", "abc"], "not a valid float"),
    (["eval", "--n-test", "1000"], "asked for 500 examples"),
])
def test_user_mistakes_exit_2_with_one_line(args, message, capsys, tiny_model_dir, imdb_dir):
    base = ["--model", str(tiny_model_dir), "--data", str(imdb_dir), "--dtype", "fp32", "--n-test", "4", "--n-train", "4"]
    assert main(args[:1] + base + args[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error:") and message in err and "\n" not in err and "Traceback" not in err


def test_the_installed_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "peftlab", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--lora-dropout" in out.stdout and "--virtual-tokens" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "peftlab", "eval", "--config", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "config file" in bad.stderr and "Traceback" not in bad.stderr
