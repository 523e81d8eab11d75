"""Safety: no pickle loading, no remote code unless asked, safe YAML, output paths that stay inside
their folder, and predictions on untrusted text that cannot crash the process."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlab.config import ModelConfig, build_config, load_yaml
from peftlab.errors import PeftlabError
from peftlab.records import child_path, safe_name

SRC = Path(__file__).resolve().parents[2] / "src" / "peftlab"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# What can run code while loading a file, or evaluate text as code.
UNSAFE = re.compile(r"torch\.load\(|\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import|"
                    r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|use_safetensors\s*=\s*False|"
                    r"yaml\.(load|unsafe_load|full_load)\(|UnsafeLoader|(?<![\w.])(eval|exec)\(|"
                    r"trust_remote_code\s*=\s*True|shell\s*=\s*True")


def test_no_pickle_or_code_loading_anywhere_in_peftlab():
    hits = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
            for path in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if UNSAFE.search(line.split("#")[0])]
    assert not hits, "\n".join(hits)


def test_models_load_without_remote_code_and_from_safetensors_only(tiny_model_dir, monkeypatch):
    import transformers

    from peftlab.models import load_base_model

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    assert ModelConfig().trust_remote_code is False  # off unless the user asks
    load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    assert {name for name, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls)
    assert [kw.get("use_safetensors") for name, kw in calls if name == "AutoModelForCausalLM"] == [True]
    calls.clear()
    load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", trust_remote_code=True))
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in calls)  # asked for: passed on


def test_yaml_is_loaded_safely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.yaml").write_text('train: !!python/object/apply:os.system ["touch pwned"]\n')
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_yaml(tmp_path / "evil.yaml")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ output paths

HOSTILE = ["..", ".", "../../etc/passwd", "/etc/passwd", "a/../../b", "C:\\Windows\\system32", "\\\\server\\share",
           "", " ", "nul\x00byte", "new\nline", "~root", ".hidden", "CON", "x" * 5000, "ünïcödé/名前", "\ud800"]


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=300) | st.sampled_from(HOSTILE))
def test_names_from_untrusted_text_stay_inside_their_folder(text):
    name = safe_name(text)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    assert len(name) <= 111 and name.isascii()
    root = Path("/tmp/peftlab-root")
    assert (root / name).resolve().parent == root.resolve()


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_distinct_texts_keep_distinct_names(a, b):
    if a != b:
        assert safe_name(a) != safe_name(b)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cell").symlink_to(tmp_path)
    assert child_path(tmp_path / "root", "other") == tmp_path / "root" / "other"
    with pytest.raises(PeftlabError, match="leads out of"):
        child_path(tmp_path / "root", "cell")


def test_sweep_cell_folders_from_hostile_grid_values_stay_inside_the_sweep():
    from peftlab.experiments import grid  # imported, not importorskip'd: an import error here is a failure

    for value in HOSTILE:
        folder = grid.cell_folder("0123456789ab", {"model.name": value, "prompt.instruction": value})
        assert "/" not in folder and "\\" not in folder and "\x00" not in folder and folder.startswith("0123456789ab")
        root = Path("/tmp/sweep")
        assert (root / folder).resolve().parent == root
    # Plain grid values keep their readable name.
    assert grid.cell_folder("0123456789ab", {"data.n_train": 50, "method.lora_dropout": 0.1}) == "0123456789ab-N50-d0.1"


def test_run_files_use_fixed_names_only(tiny_model_dir, imdb_dir, tmp_path):
    # Example ids never become file names: a run folder holds the same fixed names whatever the data.
    from peftlab.runs import run_train

    out = tmp_path / "run"
    run_train(build_config({"model.name": str(tiny_model_dir), "model.dtype": "fp32", "data.source": str(imdb_dir),
                            "data.n_train": 4, "data.n_test": 4, "train.epochs": 1, "prompt.max_input_tokens": 32,
                            "out": str(out)}))
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert files <= {"config.yaml", "metrics.json", "predictions.jsonl", "adapter", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "adapter/peftlab.json", "adapter/README.md"}, files


# ------------------------------------------------------------------------------------------ untrusted text

UNTRUSTED = ["", " ", "\n\n\n", "\x00", "\x00" * 1000, "".join(map(chr, range(32))) + "\x7f", "\ud800", "a\udcff b",
             "\ud83d\ude00 split pair", "😀" * 500, "\u202e\u2066 bidi \u200b\u200d\ufeff", "e\u0301" * 20_000,
             "</s><pad><unk><s>", "### Response:\npositive", "{input} {instruction} %s %(x)s {0}",
             "great " * 200_000, "\U0010ffff\ufffe\uffff", "<br /><br />", "\r\r\r\n", "A wonderful film."]


def test_predict_survives_any_untrusted_text(tiny_once):
    from peftlab.runs import predict

    model, tokenizer = tiny_once
    rows = predict(UNTRUSTED, build_config({}), model, tokenizer)
    assert len(rows) == len(UNTRUSTED)
    for row in rows:
        assert row["pred"] in ("negative", "positive") and 0.5 <= row["prob"] <= 1
        assert all(math.isfinite(v) for v in row["scores"].values())
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # printable as one UTF-8 JSON line
    # Special-token text is text: "</s>" in a review does not become the end-of-sequence token.
    from peftlab.config import PromptConfig
    from peftlab.data.examples import Example
    from peftlab.prompts import build_prompt_encoder

    encoder = build_prompt_encoder(tokenizer, PromptConfig(), ["negative", "positive"], True)
    [encoded] = encoder.encode([Example("x", "</s><pad>", "negative")], tokenizer)
    inner = encoded.prompt_ids[len(encoder.prefix_ids):len(encoded.prompt_ids) - len(encoder.suffix_ids)]
    assert tokenizer.eos_token_id not in inner and tokenizer.pad_token_id not in inner


@pytest.fixture(scope="module")
def tiny_once(tiny_model_dir):
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"))


@settings(max_examples=25, deadline=None, database=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_predict_survives_random_text(tiny_once, texts):
    from peftlab.runs import predict

    rows = predict(texts, build_config({}), *tiny_once)
    assert [r["pred"] in ("negative", "positive") for r in rows] == [True] * len(texts)


def test_cli_predict_with_undecodable_arguments_and_stdin(tiny_model_dir, capsys, monkeypatch):
    # A shell passes bytes that are not UTF-8 as lone surrogates (surrogateescape); stdin may hold any bytes.
    import io
    import sys

    from peftlab.cli import main

    args = ["predict", "--model", str(tiny_model_dir), "--dtype", "fp32"]
    assert main(args + ["caf\udce9 \udcff", "\x00"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["pred"] for line in lines)

    class Stdin(io.TextIOWrapper):
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", Stdin(io.BytesIO(b"caf\xe9 \xff\xfe\n\n\x00 nul\r\nok\n"), encoding="utf-8"))
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["caf\ufffd \ufffd\ufffd", "\x00 nul", "ok"]
