"""The bad-input catalogue, run row by row through the real CLI.

docs/bad-inputs.md is the one source of truth: each table row gives an id, the bad input, the
command and the message peftlab prints. This test reads the rows from the markdown, builds the
files a row needs (SETUPS below, by id) in a scratch folder, runs `peftlab.cli.main` there and
checks: exit status 2, one stderr line "peftlab: error: <the documented message>", no traceback.
Rows of the "accepted" table must instead succeed (exit 0), checked by ACCEPTED below.

To see what peftlab prints for every row (when adding rows or changing messages):

    python tests/unit/test_bad_inputs.py
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
# Added to every command that reads them and does not give them itself (`rerun` takes none of them).
DEFAULTS = {"--model": "{model}", "--data": "{data}", "--dtype": "fp32", "--n-train": "4", "--n-test": "4",
            "--epochs": "1", "--max-input-tokens": "32", "--out": "out"}


@dataclass
class Row:
    id: str
    what: str
    command: str
    message: str
    accepted: bool


def _code(cell: str) -> str:
    """The text of a markdown code span (`x` or `` x ``), else the cell itself."""
    cell = cell.strip().replace("\\|", "|")
    match = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell)
    return match.group(2) if match else cell


def read_catalogue(path: Path = DOC) -> list[Row]:
    """The rows of the two tables of docs/bad-inputs.md (refused, then accepted)."""
    rows, accepted = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            accepted = "accepted" in line.lower()
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append(Row(_code(cells[0]), cells[1].strip(), _code(cells[2]), _code(cells[3]), accepted))
    return rows


def flags_of(command: str) -> set[str]:
    """The flags `peftlab COMMAND` offers (each command only those of the config keys it reads)."""
    import argparse

    from peftlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices[command]._option_string_actions) if command in sub.choices else set()


def argv_of(row: Row, paths: dict[str, str]) -> list[str]:
    words = shlex.split(row.command)
    assert words[0] == "peftlab", row.command
    words = words[1:]
    offered = flags_of(words[0]) if words[0] != "rerun" else set()  # rerun's own --out is not the run's
    for flag, value in DEFAULTS.items():
        if flag in offered and flag not in words:
            words += [flag, value]
    if "--quiet" in offered and "--quiet" not in words:
        words.append("--quiet")
    return [w.format(**paths) if "{" in w and "}" in w and w.strip("{}") in paths else w for w in words]


def library_versions() -> dict[str, str]:
    """`peft 0.22.0` -> `peft {peft}`: a message names the installed library's version (CI installs the newest)."""
    import peft
    import transformers

    return {f"{lib.__name__} {lib.__version__}": f"{lib.__name__} {{{lib.__name__}}}" for lib in (peft, transformers)}


def normalise(text: str, paths: dict[str, str], tmp: Path) -> str:
    """Fixture paths and library versions back to their placeholders, so that messages read the same on
    every machine."""
    swaps = {**{v: "{" + k + "}" for k, v in paths.items()}, str(tmp.resolve()) + "/": "", str(tmp) + "/": "",
             **library_versions()}
    for real in sorted(swaps, key=len, reverse=True):
        text = text.replace(real, swaps[real])
    return text


def pattern_of(message: str) -> re.Pattern:
    """The documented message as a regex: `…` stands for text peftlab copies from a library or a long list."""
    return re.compile(".*".join(re.escape(part) for part in message.split("…")), re.DOTALL)


# ------------------------------------------------------------------------------------------ setups

SETUPS: dict[str, Callable[[Path, dict], None]] = {}


def setup(*ids: str):
    def register(fn):
        for row_id in ids:
            SETUPS[row_id] = fn
        return fn
    return register


def csv_file(path: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def good_rows(n: int = 10) -> list[list[str]]:
    return [[f"a {'great' if i % 2 else 'dull'} film number {i}", "positive" if i % 2 else "negative"]
            for i in range(n)]


@setup("csv-missing-column")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["review", "label"], good_rows())


@setup("csv-unknown-label")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"], ["hmm", "maybe"]])


@setup("csv-not-utf8")
def _(tmp, ctx):
    (tmp / "reviews.csv").write_bytes(b"text,label\nUn film tr\xe8s dr\xf4le,positive\n")


@setup("csv-empty-review")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], good_rows(2) + [["   ", "positive"]])


@setup("csv-missing-label")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], good_rows(2) + [["a film", ""]])


@setup("csv-duplicate-ids")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["id", "text", "label"], [["r1", "good", "positive"], ["r2", "bad", "negative"],
                                                            ["r1", "fine", "positive"]])


@setup("csv-header-only")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], [])


@setup("csv-one-class")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], [[f"good film {i}", "positive"] for i in range(10)])


@setup("csv-ragged-quotes")
def _(tmp, ctx):
    (tmp / "reviews.csv").write_text('text,label\n"an unclosed quote,positive\n', encoding="utf-8")


@setup("jsonl-bad-line")
def _(tmp, ctx):
    (tmp / "reviews.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": "bad", label: negative}\n')


@setup("jsonl-not-object")
def _(tmp, ctx):
    (tmp / "reviews.jsonl").write_text('{"text": "good", "label": "positive"}\n["bad", "negative"]\n')


@setup("json-not-a-list")
def _(tmp, ctx):
    (tmp / "reviews.json").write_text('{"text": "good", "label": "positive"}')


@setup("parquet-corrupt")
def _(tmp, ctx):
    (tmp / "reviews.parquet").write_bytes(b"PAR1 this is not parquet")


@setup("data-unsupported-type", "predict-no-texts")
def _(tmp, ctx):
    (tmp / "reviews.txt").write_text("a review\n" if "unsupported" in ctx["id"] else "   \n\n")


@setup("test-data-missing")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], good_rows())


def aclimdb_copy(tmp: Path, ctx: dict) -> Path:
    import shutil

    shutil.copytree(ctx["imdb_dir"], tmp / "aclImdb")
    return tmp / "aclImdb"


@setup("imdb-not-utf8")
def _(tmp, ctx):
    (aclimdb_copy(tmp, ctx) / "train" / "neg" / "0_1.txt").write_bytes(b"\xff\xfe bad bytes")


@setup("imdb-empty-review")
def _(tmp, ctx):
    (aclimdb_copy(tmp, ctx) / "train" / "neg" / "0_1.txt").write_text("<br /><br />  ")


@setup("imdb-no-test-split")
def _(tmp, ctx):
    import shutil

    shutil.rmtree(aclimdb_copy(tmp, ctx) / "test")


@setup("imdb-wrong-layout", "model-folder-without-config", "rerun-not-a-run")
def _(tmp, ctx):
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("not a review")


@setup("imdb-corrupt-archive")
def _(tmp, ctx):
    (tmp / "aclImdb_v1.tar.gz").write_bytes(b"\x1f\x8b\x08 truncated gzip")


@setup("config-invalid-yaml")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text("train:\n  epochs: [1, 2\n")


@setup("config-unknown-key")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text("train:\n  epoch: 3\n")


@setup("config-not-a-mapping")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text("- train\n- eval\n")


@setup("config-section-not-a-mapping")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text("train: 5\n")


@setup("config-wrong-type")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text("train:\n  epochs: two\n")


@setup("config-python-tag")
def _(tmp, ctx):
    (tmp / "run.yaml").write_text('train: !!python/object/apply:os.system ["touch pwned"]\n')


@setup("out-is-a-file")
def _(tmp, ctx):
    (tmp / "notes.txt").write_text("my notes")


@setup("model-file-not-gguf")
def _(tmp, ctx):
    (tmp / "weights.bin").write_bytes(b"\x80\x04 pickle")


@setup("model-corrupt-gguf")
def _(tmp, ctx):
    (tmp / "model.gguf").write_bytes(b"not a gguf file at all")


@setup("model-pickled-weights")
def _(tmp, ctx):
    import shutil

    (tmp / "model").mkdir()
    for file in ctx["model_dir"].iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, tmp / "model" / file.name)
    (tmp / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")


def tiny_adapter(folder: Path, model_dir: Path, hidden: int | None = None) -> Path:
    """A LoRA adapter (untrained) of the tiny model, or of a wider one when `hidden` is given."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if hidden is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        base = LlamaConfig.from_pretrained(model_dir)
        base.hidden_size, base.intermediate_size = hidden, hidden * 2
        model = LlamaForCausalLM(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def tiny_head_adapter(folder: Path, model_dir: Path, classes: list[str]) -> Path:
    """A LoRA adapter with a classification head of `classes` (untrained), as plain transformers + peft save it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(classes),
                                                               id2label=dict(enumerate(classes)))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@setup("head-on-label-word-adapter")
def _(tmp, ctx):
    tiny_adapter(tmp / "adapter", ctx["model_dir"])


@setup("head-of-other-classes")
def _(tmp, ctx):
    tiny_head_adapter(tmp / "adapter", ctx["model_dir"], ["bad", "fine", "good"])


@setup("adapter-wrong-base")
def _(tmp, ctx):
    tiny_adapter(tmp / "adapter", ctx["model_dir"], hidden=48)


@setup("adapter-corrupt-safetensors", "adapter-truncated-safetensors", "adapter-no-config", "adapter-no-safetensors",
       "adapter-bin-only", "adapter-config-not-json", "adapter-unknown-peft-type", "adapter-record-not-json")
def _(tmp, ctx):
    folder = tiny_adapter(tmp / "adapter", ctx["model_dir"])
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    row = ctx["id"]
    if row == "adapter-corrupt-safetensors":
        weights.write_bytes(b"\xff" * 64)
    elif row == "adapter-truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif row == "adapter-no-config":
        config.unlink()
    elif row == "adapter-no-safetensors":
        weights.unlink()
    elif row == "adapter-bin-only":
        weights.rename(folder / "adapter_model.bin")
    elif row == "adapter-config-not-json":
        config.write_text("{'r': 2")
    elif row == "adapter-unknown-peft-type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "MAGIC"}))
    elif row == "adapter-record-not-json":
        (folder / "peftlab.json").write_text("{truncated")


@setup("out-holds-finished-run", "out-holds-unfinished-run", "out-holds-other-files")
def _(tmp, ctx):
    (tmp / "out").mkdir()
    if ctx["id"] == "out-holds-other-files":
        (tmp / "out" / "notes.txt").write_text("not a run")
        return
    (tmp / "out" / "config.yaml").write_text("# peftlab eval --config config.yaml\n")
    if ctx["id"] == "out-holds-finished-run":
        (tmp / "out" / "metrics.json").write_text("{}")


@setup("resume-checkpoint-of-another-run", "resume-damaged-checkpoint")
def _(tmp, ctx):
    from safetensors.torch import save_file

    from peftlab.records import sha256_file

    folder = tmp / "out" / "checkpoint"
    folder.mkdir(parents=True)
    if ctx["id"] == "resume-damaged-checkpoint":
        (folder / "state.json").write_text('{"tensors": "tensors-000001.safetensors", "sha2')
        return
    import torch

    from peftlab.cli import build_parser, resolve_config
    from peftlab.data import load_splits
    from peftlab.runs import sample_sha256, sample_task

    # The checkpoint of the same run (same examples), but with another learning rate.
    config = resolve_config(build_parser().parse_args(ctx["argv"] + ["--lr", "0.5"]))
    examples = sample_sha256(sample_task(config, load_splits(config.data)))
    save_file({"rng/torch": torch.get_rng_state()}, folder / "tensors-000001.safetensors")
    state = {"format": 1, "fingerprint": {"config": config.to_dict(), "sample_sha256": examples},
             "tensors": "tensors-000001.safetensors", "sha256": sha256_file(folder / "tensors-000001.safetensors"),
             "extra": {}}
    (folder / "state.json").write_text(json.dumps(state))


ENORMOUS = "a great film " * 100_000  # 1.3 MB of text in one review


@setup("enormous-review")
def _(tmp, ctx):
    csv_file(tmp / "reviews.csv", ["text", "label"], good_rows(10))
    # The test file: the enormous review and a short one, so that truncated_share must come out 1/2.
    csv_file(tmp / "test.csv", ["text", "label"], [[ENORMOUS, "positive"], ["a dull film", "negative"]])


CONTROL_TEXTS = ["a great\x00film\x07", "dull \u202e\u200b\ufeff film", "great \ud800 film", "dull </s><pad> film",
                 "great\r\nfilm", "dull\x1b[31m film", "great film", "dull film", "great 😀 film", "dull film 2"]


def jsonl_file(path: Path, texts: list[str]) -> None:
    lines = [json.dumps({"text": t, "label": "positive" if i % 2 == 0 else "negative"}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@setup("control-characters")
def _(tmp, ctx):
    jsonl_file(tmp / "reviews.jsonl", CONTROL_TEXTS)
    # The test file holds the lone surrogate (a positive review) and the special-token text (a negative one).
    jsonl_file(tmp / "test.jsonl", [CONTROL_TEXTS[2], CONTROL_TEXTS[3]])


@setup("bom-and-crlf-csv")
def _(tmp, ctx):
    body = "\r\n".join(["text,label"] + [f"{t},{label}" for t, label in good_rows()]) + "\r\n"
    (tmp / "reviews.csv").write_bytes("\ufeff".encode() + body.encode())


@setup("predict-untrusted-text")
def _(tmp, ctx):
    lines = [b"nul\x00 and bell\x07 and escape\x1b[2J", b"invalid utf-8 \xff\xfe\xc3(", b"great " * 200_000,
             b"</s><pad><unk> <s>", "\u202e bidi \u200b zero-width \ufeff".encode()]
    (tmp / "texts.txt").write_bytes(b"\n".join(lines) + b"\n\n")


# What an accepted row must have done, beyond exit status 0.
def _metrics(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "metrics.json").read_text())


def _predicted_ids(tmp: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]


def enormous_review_truncated(tmp: Path, out: str, model_dir: Path) -> bool:
    # Both test reviews scored, and exactly one of the two cut: the enormous one (the other has 3 words).
    metrics = _metrics(tmp)
    return metrics["n_train"] == 4 and metrics["n"] == 2 and metrics["truncated_share"] == 0.5 and \
        len(_predicted_ids(tmp)) == 2


def control_characters_as_text(tmp: Path, out: str, model_dir: Path) -> bool:
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig, PromptConfig
    from peftlab.data import load_splits
    from peftlab.prompts import build_prompt_encoder

    metrics = _metrics(tmp)
    config = DataConfig(**{k: v for k, v in metrics["config"]["data"].items()})  # as the run read its data
    test = sorted(load_splits(config).test, key=lambda e: e.label)  # [negative, positive]
    assert sorted(_predicted_ids(tmp)) == sorted(e.id for e in test)  # both were scored
    assert test[1].text == "great \ufffd film"  # the lone surrogate became U+FFFD, the rest kept
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = build_prompt_encoder(tokenizer, PromptConfig(max_input_tokens=32), ["negative", "positive"], True)
    [encoded] = encoder.encode([test[0]], tokenizer)  # "dull </s><pad> film"
    inner = encoded.prompt_ids[len(encoder.prefix_ids):len(encoded.prompt_ids) - len(encoder.suffix_ids)]
    assert tokenizer.eos_token_id not in inner and tokenizer.pad_token_id not in inner  # text, not tokens
    return metrics["n_train"] == 4 and metrics["n"] == 2


ACCEPTED: dict[str, Callable[[Path, str, Path], bool]] = {
    "enormous-review": enormous_review_truncated,
    "control-characters": control_characters_as_text,
    "bom-and-crlf-csv": lambda tmp, out, model_dir: _metrics(tmp)["n"] == 2,
    "predict-untrusted-text": lambda tmp, out, model_dir: len(out.splitlines()) == 5,
}


# ------------------------------------------------------------------------------------------ the test

def run_row(row: Row, tmp: Path, model_dir: Path, imdb_dir: Path, monkeypatch) -> tuple[int, str, str, dict]:
    """Set the row up in `tmp` and run its command there: (exit status, stdout, stderr, placeholder paths)."""
    import contextlib
    import io

    import huggingface_hub.constants

    from peftlab.cli import main

    paths = {"model": str(model_dir), "data": str(imdb_dir)}
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub lookup fails at once
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv = argv_of(row, paths)
    if row.id in SETUPS:
        SETUPS[row.id](tmp, {"id": row.id, "model_dir": model_dir, "imdb_dir": imdb_dir, "argv": argv})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue(), paths


ROWS = read_catalogue()


def test_the_catalogue_is_complete():
    refused = [r for r in ROWS if not r.accepted]
    assert len(refused) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"
    assert set(SETUPS) <= {r.id for r in ROWS}, "a setup without its row in docs/bad-inputs.md"
    assert {r.id for r in ROWS if r.accepted} == set(ACCEPTED)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, tiny_model_dir, imdb_dir, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_checkpoint.py
    try:
        code, out, err, paths = run_row(row, tmp_path, tiny_model_dir, imdb_dir, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert "Traceback" not in err
    if row.accepted:
        assert code == 0, err
        assert ACCEPTED[row.id](tmp_path, out, tiny_model_dir), out
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("peftlab: error: "), err
    said = normalise(lines[0][len("peftlab: error: "):], paths, tmp_path)
    assert pattern_of(row.message).fullmatch(said), f"\ndocumented: {row.message}\nsaid:       {said}"


if __name__ == "__main__":  # print what peftlab says for every row (see the module docstring)
    import os
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import build_tiny_model, build_tiny_tokenizer, write_aclimdb

    os.environ["PEFTLAB_PROGRESS"] = "0"
    root = Path(tempfile.mkdtemp())
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    imdb = write_aclimdb(root / "imdb")
    for r in ROWS:
        tmp = root / "rows" / r.id
        tmp.mkdir(parents=True)
        with pytest.MonkeyPatch.context() as mp:
            code, out, err, paths = run_row(r, tmp, root / "model", imdb, mp)
        said = normalise(err.strip().removeprefix("peftlab: error: "), paths, tmp).replace("|", "\\|")
        print(f"| `{r.id}` | exit {code} | `{r.command}` | `` {said} `` |")
