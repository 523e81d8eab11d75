"""The CLI end to end on the tiny model: the output tree, adapters other tools load, clear errors."""

import json
import re
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
    # One bit an example in the record, for the report's paired tests: example i of the sorted ids is bit i.
    bits = metrics["correct_bits"]
    packed = bytes.fromhex(bits["bits"])
    by_id = {x["id"]: x["correct"] for x in lines}
    assert bits["n"] == 12 and [bool(packed[i // 8] >> (7 - i % 8) & 1) for i in range(12)] == \
        [by_id[i] for i in sorted(by_id)]


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


def plain_peft_scores(adapter, model_dir, texts, max_input_tokens=40):
    """Label-word log-probabilities of each text from plain transformers + peft: one full forward pass per
    (text, label word), no peftlab scoring code; `adapter=None` scores the bare base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.config import PromptConfig
    from peftlab.data.examples import Example
    from peftlab.prompts import build_prompt_encoder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=max_input_tokens), ["negative", "positive"], True)
    out = []
    for text in texts:
        [ex] = enc.encode([text if isinstance(text, Example) else Example("x", text, "negative")], tok)
        scores = {}
        for c, label in enumerate(enc.label_ids):
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ex.prompt_ids + label])).logits[0].float(), -1)
            n = len(ex.prompt_ids)
            scores[enc.classes[c]] = sum(lp[n - 1 + j, t].item() for j, t in enumerate(label))
        out.append(scores)
    return out


def test_plain_peft_loads_the_adapter_and_gives_the_same_scores(trained, tiny_model_dir, imdb_dir):
    from peftlab.config import DataConfig
    from peftlab.data import load_splits

    test = {e.id: e for e in load_splits(DataConfig(source=str(imdb_dir))).test}
    lines = [json.loads(x) for x in (trained / "predictions.jsonl").read_text().splitlines()][:4]
    expected = plain_peft_scores(trained / "adapter", tiny_model_dir, [test[line["id"]] for line in lines])
    for line, scores in zip(lines, expected):
        for c, score in scores.items():
            assert score == pytest.approx(line["scores"][c], abs=1e-4)


def test_predict_from_arguments_and_stdin(trained, tiny_model_dir, capsys, monkeypatch):
    texts = ["great film", "awful"]
    assert main(["predict", "--adapter", str(trained / "adapter"), "--dtype", "fp32", *texts]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    # The scores are the adapter's, computed by plain peft, and the adapter moved them away from the base
    # model's (B != 0 after training): a predict that ignored --adapter would give the base's and fail here.
    with_adapter = plain_peft_scores(trained / "adapter", tiny_model_dir, texts)
    base = plain_peft_scores(None, tiny_model_dir, texts)
    for row, expected, bare in zip(rows, with_adapter, base):
        assert row["scores"] == pytest.approx(expected, abs=1e-4)
        assert max(abs(expected[c] - bare[c]) for c in expected) > 1e-2
        assert row["pred"] == max(expected, key=expected.get)
        p = torch.softmax(torch.tensor(list(expected.values())), 0).max().item()
        assert row["prob"] == pytest.approx(p, abs=1e-4)
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("great film\n\nawful\n"))
    assert main(["predict", "--adapter", str(trained / "adapter"), "--dtype", "fp32"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows  # stdin: the same two texts


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
    base = ["--model", str(tiny_model_dir), "--data", str(imdb_dir), "--dtype", "fp32", "--n-test", "4"]
    base += ["--n-train", "4"] if args[0] == "train" else []  # eval draws no training sample: --n-train is refused
    assert main(args[:1] + base + args[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error:") and message in err and "\n" not in err and "Traceback" not in err


def test_the_installed_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "peftlab", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--lora-dropout" in out.stdout and "--virtual-tokens" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "peftlab", "eval", "--config", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "config file" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ flags per command

@pytest.mark.parametrize("args, message", [
    (["eval", "--lr", "1"], "peftlab eval does not use --lr (train.lr); it is a `peftlab train` option"),
    (["eval", "--epochs", "2"], "peftlab eval does not use --epochs (train.epochs); it is a `peftlab train` option"),
    (["eval", "--n-train=4"], "peftlab eval does not use --n-train (data.n_train); it is a `peftlab train` or "
                              "`peftlab plan` option"),
    (["train", "--adapter", "x"], "peftlab train does not use --adapter (adapter); it is a `peftlab eval`, "
                                  "`peftlab predict` or `peftlab plan` option"),
    (["predict", "--data", "x", "a text"], "peftlab predict does not use --data (data.source); it is a "
                                           "`peftlab train` or `peftlab eval` option"),
    (["plan", "--lora-alpha", "4"], "peftlab plan does not use --lora-alpha (method.lora_alpha); it is a "
                                    "`peftlab train` option"),
    (["rerun", "folder", "--epochs", "1"], "peftlab rerun does not use --epochs (train.epochs); it is a "
                                           "`peftlab train` option"),
])
def test_a_flag_the_command_does_not_read_is_refused_naming_the_command_that_does(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(args + ["--out", str(tmp_path / "run")] if args[0] in ("eval", "train") else args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == f"peftlab: error: {message}; see `peftlab {args[0]} --help`\n"
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_each_command_offers_the_flags_it_reads(capsys):
    def flags(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return set(re.findall(r"(?m)^\s+(--[a-z0-9-]+)", capsys.readouterr().out))

    train, evaluate, predict, plan = (flags(c) for c in ("train", "eval", "predict", "plan"))
    assert {"--lr", "--resume", "--n-train", "--lora-r", "--n-test", "--out"} <= train and "--adapter" not in train
    assert {"--adapter", "--n-test", "--data", "--out", "--strategy"} <= evaluate
    assert not {"--lr", "--n-train", "--lora-r", "--epochs"} & evaluate and "--resume" in evaluate
    assert {"--adapter", "--model", "--template", "--eval-batch-size", "--file"} <= predict
    assert not {"--data", "--n-test", "--out", "--lr"} & predict
    assert {"--lora-r", "--batch-size", "--n-train", "--max-input-tokens", "--seq-len"} <= plan
    assert not {"--lora-alpha", "--lr", "--epochs", "--template", "--n-test"} & plan


def test_a_yaml_of_every_section_serves_every_command(trained, tmp_path, capsys):
    # A train run's config.yaml holds every section (train.lr, method.lora_r, data.n_train, ...); eval, predict
    # and plan take from it the keys they read and ignore the rest, as documented in READS (peftlab/cli.py).
    config = str(trained / "config.yaml")
    out = tmp_path / "zero-shot"
    assert main(["eval", "--config", config, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before = [json.loads(x)["id"] for x in (trained / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == 12 and metrics["adapter"] is None  # the YAML's test subset, zero-shot
    assert [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()] == before
    assert metrics["config"]["data"]["n_train"] == 500 and metrics["config"]["method"]["lora_r"] == 8  # not taken
    assert metrics["config"]["prompt"]["max_input_tokens"] == 40  # taken
    capsys.readouterr()
    assert main(["predict", "--config", config, "great film"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "great film"
    assert main(["plan", "--config", config, "--device-memory", "1"]) == 0
    assert "LoRA r=4" in capsys.readouterr().out  # method.lora_r of the YAML, read by plan


# ------------------------------------------------------------------------------------------ fast start

TORCH_IMPORTED = re.compile(r"(?m)\|\s+torch$")  # a `-X importtime` line for the top-level torch package


def importtime(*args: str) -> subprocess.CompletedProcess:
    """Run python -X importtime with the args: stderr lists every module imported, one line each."""
    return subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True)


def test_importing_the_cli_or_the_errors_does_not_import_torch():
    out = importtime("-c", "import peftlab.cli, peftlab.errors, sys; assert 'torch' not in sys.modules")
    assert out.returncode == 0 and not TORCH_IMPORTED.search(out.stderr), out.stderr[-2000:]
    # The same check sees torch when it is imported: the names of the package are still there, on first use.
    out = importtime("-c", "import peftlab; peftlab.run_train")
    assert out.returncode == 0 and TORCH_IMPORTED.search(out.stderr), out.stderr[-2000:]


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["train", "--help"], 0), (["predict", "--help"], 0),
                                        (["eval", "--lr", "1"], 2), (["train", "--lora-rank", "8"], 2),
                                        (["train", "--lr", "fast"], 2)])
def test_help_and_flag_errors_answer_without_importing_torch(args, code):
    out = importtime("-m", "peftlab", *args)
    assert out.returncode == code and not TORCH_IMPORTED.search(out.stderr), out.stderr[-2000:]
    assert (out.stdout if code == 0 else out.stderr).strip()  # it did answer
