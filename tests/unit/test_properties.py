"""Property-based tests (hypothesis): the table parsers keep every row exactly, and the config merger
either builds a config in which the last layer wins or raises a PeftlabError, never anything else."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftlab.config import (
    DTYPES,
    SCHEDULERS,
    TRUNCATION_SIDES,
    SECTIONS,
    RunConfig,
    build_config,
    config_from_dict,
    leaves,
    load_yaml,
)
from peftlab.config import DataConfig
from peftlab.data.sources import read_table
from peftlab.errors import PeftlabError

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any unicode text but lone surrogates (which no UTF-8 file can hold), with the characters table
# formats must quote or escape: commas, quotes, tabs, newlines, CR, NUL, BOM, line/paragraph separators.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(',"\'\t\n\r\x00\ufeff\u2028\x85;|'),
               min_size=1, max_size=60).filter(lambda t: t.strip())
ROWS = st.lists(st.tuples(TEXT, st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
                          .filter(lambda t: t.strip())),
                min_size=1, max_size=15)


def written_rows(rows):
    return [{"id": f"row-{i}\u00e9,\"{i}", "text": text, "label": label} for i, (text, label) in enumerate(rows)]


def read_back(path):
    return [(e.id, e.text, e.label) for e in read_table(path, DataConfig(source=str(path), id_column="id"))]


# How standard writers lay a file out. (Python 3.11's writer leaves a lone CR unquoted when the line
# terminator is "\n", which makes a file no reader can split right; so "\n" goes with QUOTE_ALL.)
LAYOUTS = st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)])


@SETTINGS
@given(rows=ROWS, delimiter=st.sampled_from([",", "\t"]), layout=LAYOUTS)
def test_csv_and_tsv_round_trip_any_text(tmp_path_factory, rows, delimiter, layout):
    path = tmp_path_factory.mktemp("csv") / ("d.tsv" if delimiter == "\t" else "d.csv")
    data = written_rows(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["id", "text", "label"], delimiter=delimiter, lineterminator=layout[0],
                                quoting=layout[1])
        writer.writeheader()
        writer.writerows(data)
    assert read_back(path) == [(r["id"], r["text"], r["label"]) for r in data]


@SETTINGS
@given(rows=ROWS, ascii_only=st.booleans(), blank_lines=st.booleans())
def test_jsonl_round_trips_any_text(tmp_path_factory, rows, ascii_only, blank_lines):
    path = tmp_path_factory.mktemp("jsonl") / "d.jsonl"
    data = written_rows(rows)
    sep = "\n\n" if blank_lines else "\n"  # blank lines between records are allowed
    path.write_text(sep.join(json.dumps(r, ensure_ascii=ascii_only) for r in data) + "\n", encoding="utf-8")
    assert read_back(path) == [(r["id"], r["text"], r["label"]) for r in data]


@SETTINGS
@given(rows=ROWS)
def test_parquet_round_trips_any_text(tmp_path_factory, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("pq") / "d.parquet"
    data = written_rows(rows)
    pq.write_table(pa.Table.from_pylist(data), path)
    assert read_back(path) == [(r["id"], r["text"], r["label"]) for r in data]


@SETTINGS
@given(text=st.text(min_size=1, max_size=40).filter(lambda t: t.strip()))
def test_json_escaped_lone_surrogates_become_replacement_characters(tmp_path_factory, text):
    # JSON can carry "\ud800"; peftlab replaces it (UTF-8 and tokenizers cannot take it) instead of crashing.
    path = tmp_path_factory.mktemp("sur") / "d.jsonl"
    path.write_text(json.dumps({"id": "a\ud800", "text": text + "\udfff", "label": "x"}) + "\n", encoding="utf-8")
    [(ex_id, got, label)] = read_back(path)
    assert ex_id == "a\ufffd" and got == text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd") + "\ufffd"
    got.encode("utf-8")


# ------------------------------------------------------------------------------------------ config merger

def finite(low, high, **kw):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, **kw)


# Valid values of a range of keys: each a (strategy, type) pair.
VALID = {
    "data.n_train": st.integers(0, 10**6),
    "data.n_test": st.none() | st.integers(1, 10**6),
    "data.data_seed": st.integers(0, 2**31),
    "data.test_fraction": finite(0, 1, exclude_min=True, exclude_max=True),
    "data.text_column": st.text(min_size=1, max_size=10),
    "train.epochs": st.integers(1, 100),
    "train.lr": st.none() | finite(0, 10, exclude_min=True),
    "train.batch_size": st.integers(1, 512),
    "train.seed": st.integers(0, 2**31),
    "train.scheduler": st.sampled_from(SCHEDULERS),
    "train.warmup_ratio": finite(0, 1, exclude_max=True),
    "train.checkpoint_every": st.integers(0, 1000),
    "train.resume": st.booleans(),
    "method.lora_r": st.integers(1, 256),
    "method.lora_alpha": finite(0, 1e4, exclude_min=True),
    "method.lora_dropout": finite(0, 1, exclude_max=True),
    "method.lora_target_modules": st.none() | st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj"]), min_size=1),
    "method.method": st.sampled_from(["lora", "prompt-tuning", "ia3", "loha"]),
    "prompt.truncation": st.sampled_from(TRUNCATION_SIDES),
    "prompt.max_input_tokens": st.integers(1, 8192),
    "prompt.instruction": st.none() | st.text(max_size=30),
    "model.dtype": st.sampled_from(DTYPES),
    "model.name": st.text(min_size=1, max_size=20),
}
TYPES = {leaf.key: leaf for leaf in leaves()}


def as_flag(value):
    """The value as it comes from the command line: a string (None is spelt 'none')."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(value)
    return repr(value) if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def expected(key: str, value):
    if isinstance(value, str) and value.lower() in ("none", "null", "all", "") and "None" in str(TYPES[key].type):
        return None  # optional fields read these words as "unset"
    if isinstance(value, str) and key.startswith("method.method"):
        return value.lower().replace("_", "-")
    return value


LAYER = st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.tuples(VALID[k], st.booleans()) for k in keys}))


@SETTINGS
@given(layers=st.lists(LAYER, min_size=1, max_size=4))
def test_later_layers_win_and_values_keep_their_type(layers):
    flat_layers = [{k: (as_flag(v) if cli else v) for k, (v, cli) in layer.items()} for layer in layers]
    config = build_config(*flat_layers)
    defaults = build_config()
    got = config.to_dict()
    for key in VALID:
        section, name = key.split(".")
        setters = [layer[key][0] for layer in layers if key in layer]
        want = expected(key, setters[-1]) if setters else defaults.to_dict()[section][name]
        if key == "train.lr" and (not setters or want is None):  # unset: the method's default learning rate
            want = build_config({"method.method": config.method.method}).train.lr
        value = got[section][name]
        assert value == want and type(value) is type(want), (key, setters, value)
    # The merged config survives its own record: to_dict -> config_from_dict gives it back.
    assert config_from_dict(got) == config


ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(-2**2000, 2**2000) | st.floats()
                   | st.text(max_size=20) | st.sampled_from(["2020-02-31", "[[", "&a [*a]", "!!binary zz", "1e999",
                                                            "nan", "-inf", "0x10", "1_000", "yes", "~"]),
                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                   max_leaves=6)


@SETTINGS
@given(layer=st.dictionaries(st.sampled_from(sorted(TYPES)), ANY, min_size=1, max_size=5))
@example(layer={"train.lr": 10**400})
@example(layer={"method.lora_alpha": float("nan")})
@example(layer={"train.epochs": "2020-02-31"})
def test_any_value_gives_a_config_or_a_peftlab_error(layer):
    try:
        config = build_config(layer)
    except PeftlabError:
        return
    assert isinstance(config, RunConfig)
    json.dumps(config.to_dict(), default=str)  # a record can be written from it


# Sections holding real field names, so that the accepting path is reached, not only refusals.
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
KNOWN_SECTIONS = st.lists(st.one_of(*[st.tuples(st.just(name), st.dictionaries(st.sampled_from(fields), ANY, max_size=3))
                                      for name, fields in FIELDS.items()]), max_size=3)


def as_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)  # NaN == NaN here, unlike ==


@SETTINGS
@given(nested=st.dictionaries(st.sampled_from(["model", "data", "train", "method", "prompt", "eval", "out", "x"])
                              | st.text(max_size=8), ANY, max_size=4), sections=KNOWN_SECTIONS)
@example(nested={"out": "runs/x"}, sections=[("train", {"epochs": "3"}), ("method", {"lora_r": 4.0})])
def test_any_nested_mapping_gives_a_config_or_a_peftlab_error(nested, sections):
    nested = {**nested, **dict(sections)}
    try:
        config = config_from_dict(nested)
    except PeftlabError:
        return
    # Accepted: every key was a known one (an unknown key is never dropped silently) ...
    assert set(nested) <= set(SECTIONS) | {"out", "adapter"}, nested
    assert all(set(nested[name]) <= set(FIELDS[name]) for name in SECTIONS if name in nested), nested
    # ... and the record written from the config (to_dict) rebuilds the same config.
    assert as_json(config_from_dict(config.to_dict())) == as_json(config)
    if nested.get("train", {}).get("epochs") == "3":  # the @example: values reach their fields, typed
        assert config.train.epochs == 3 and config.method.lora_r == 4 and config.out == "runs/x"


@SETTINGS
@given(text=st.text(max_size=80) | st.sampled_from(["train: {epochs: 2020-02-31}", "a: &x [*x]\ntrain: {}",
                                                     "!!python/object/apply:os.system [ls]", "\ufefftrain: {}"]))
def test_any_yaml_file_gives_a_mapping_or_a_peftlab_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = load_yaml(path)
    except PeftlabError:
        return
    assert isinstance(data, dict)
