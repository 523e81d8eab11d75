"""Readers for the three kinds of source: the aclImdb layout, hub data sets and table files.

All of them end in the same `LabelledSplits`: ids that trace back to the source, texts, class
names. `load_splits(config)` picks the reader from what `data.source` names.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import re
import tarfile
from pathlib import Path

from peftlab.config import ARCHIVE_SUFFIXES, TABLE_SUFFIXES, DataConfig, looks_like_path
from peftlab.data.examples import Example, LabelledSplits, replace_lone_surrogates
from peftlab.errors import PeftlabError

IMDB_HUB_ID = "stanfordnlp/imdb"
IMDB_CLASSES = ["negative", "positive"]
IMDB_FOLDER_LABELS = {"neg": "negative", "pos": "positive"}
# data.labels=rating-4: the stars in each file name (aclImdb has no 5 or 6: Maas et al. 2011 kept <= 4 and
# >= 7) in four ordered classes, named by the adjective a reviewer would use. Each is one common English
# word, so the model's prior over them comes from ordinary text, and no name begins another.
RATING_4 = {1: "terrible", 2: "terrible", 3: "poor", 4: "poor", 7: "good", 8: "good", 9: "excellent",
            10: "excellent"}
IMDB_RATINGS = (1, 2, 3, 4, 7, 8, 9, 10)
# aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt; the aclImdb/ prefix is optional so that a
# folder holding train/ and test/ directly is read too.
IMDB_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+_\d+)\.txt$")


def load_splits(config: DataConfig) -> LabelledSplits:
    """Read the train and test splits that `config.source` (and `config.test_source`) name."""
    source = config.source
    if source == "imdb":
        source = os.environ.get("PEFTLAB_IMDB") or IMDB_HUB_ID
    path = Path(source).expanduser()
    if config.val_source and not (path.is_file() and path.name.lower().endswith(TABLE_SUFFIXES)):
        raise PeftlabError(f"--val-data is for table data; {source} has a training split of its own: give "
                           "--n-val to draw the validation examples from it")
    if path.exists():
        if path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES):
            return load_aclimdb(path, config.labels)
        if path.name.lower().endswith(TABLE_SUFFIXES):
            refuse_label_scheme(config, f"the table {path.name}")
            return load_table_splits(path, config)
        raise PeftlabError(f"data file {path} has an unsupported type: give an aclImdb folder or "
                           f".tar.gz, or a {'/'.join(TABLE_SUFFIXES)} file")
    if looks_like_path(source):
        raise PeftlabError(f"data path {source} does not exist: check --data (an aclImdb folder or "
                           ".tar.gz, a table file, or a hub data set name)")
    refuse_label_scheme(config, f"the hub data set {source!r}")
    return load_hub_splits(source, config)


def refuse_label_scheme(config: DataConfig, what: str) -> None:
    # Only aclImdb file names carry star ratings; elsewhere data.label_map says what the classes are.
    if config.labels != "sentiment":
        raise PeftlabError(f"data.labels={config.labels} needs the star ratings of aclImdb file names, which "
                           f"{what} does not have; give an aclImdb folder or .tar.gz, or map labels with "
                           "data.label_map")


def clean_review(text: str) -> str:
    # IMDB reviews carry HTML line breaks; they are noise to a language model and cost tokens.
    return text.replace("<br /><br />", "\n").replace("<br />", "\n").strip()


# ---------------------------------------------------------------- aclImdb folder or archive

def load_aclimdb(path: Path, labels: str = "sentiment") -> LabelledSplits:
    """IMDB in the official aclImdb layout, from the extracted folder or the .tar.gz itself; `labels`
    (data.labels) chooses the classes: the folder's sentiment or the file name's star rating."""
    stat = path.stat()
    rows = _read_aclimdb(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    splits = {"train": [], "test": []}
    for split, ex in rows:
        splits[split].append(ex if labels == "sentiment" else relabel_by_rating(ex, labels))
    for split, examples in splits.items():
        if not examples:
            raise PeftlabError(f"{path} holds no {split} reviews in the aclImdb layout "
                               f"({split}/pos/*.txt, {split}/neg/*.txt); check that it is aclImdb")
    return LabelledSplits(train=splits["train"], test=splits["test"], classes=imdb_classes(labels),
                          name="imdb" if labels == "sentiment" else f"imdb-{labels}", is_imdb=True)


def imdb_classes(labels: str) -> list[str]:
    """The ordered class names of a data.labels scheme (lowest rating first)."""
    if labels == "rating-4":
        return list(dict.fromkeys(RATING_4.values()))
    if labels == "rating":
        return [str(r) for r in IMDB_RATINGS]
    return list(IMDB_CLASSES)


def relabel_by_rating(ex: Example, labels: str) -> Example:
    """The example with its class taken from the star rating in its id (`test/pos/123_9`: 9 stars)."""
    rating = int(ex.id.rsplit("_", 1)[1])
    if rating not in IMDB_RATINGS:
        raise PeftlabError(f"aclImdb review {ex.id} has rating {rating}; aclImdb ratings are 1-4 and 7-10, "
                           "so the file name is not from the official data set: use data.labels=sentiment")
    return Example(id=ex.id, text=ex.text, label=RATING_4[rating] if labels == "rating-4" else str(rating))


@functools.lru_cache(maxsize=2)
def _read_aclimdb(path: str, _mtime_ns: int, _size: int) -> tuple[tuple[str, Example], ...]:
    # Cached per process on (path, mtime, size): a sweep reads the 50k reviews once, not per cell.
    rows = []
    if os.path.isdir(path):
        for file in sorted(Path(path).rglob("*.txt")):
            match = IMDB_MEMBER.search(file.as_posix())
            if match:
                rows.append(_imdb_example(match, file.read_bytes(), str(file)))
    else:
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    match = IMDB_MEMBER.search(member.name) if member.isfile() else None
                    if match:
                        data = archive.extractfile(member).read()  # read only: nothing is written to disk
                        rows.append(_imdb_example(match, data, f"{path}:{member.name}"))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PeftlabError(f"cannot read archive {path}: {exc}; give an intact aclImdb .tar.gz "
                               "or the extracted folder") from None
    if not rows:
        raise PeftlabError(f"{path} is not in the aclImdb layout: expected "
                           "aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt")
    rows.sort(key=lambda r: r[1].id)
    return tuple(rows)


def _imdb_example(match: re.Match, data: bytes, where: str) -> tuple[str, Example]:
    split, folder, stem = match.groups()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PeftlabError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "re-encode the file as UTF-8") from None
    return split, Example(id=f"{split}/{folder}/{stem}", text=clean_review(text),
                          label=IMDB_FOLDER_LABELS[folder])


# ---------------------------------------------------------------- table files

def load_table_splits(path: Path, config: DataConfig) -> LabelledSplits:
    """A CSV/TSV/JSONL/Parquet file, with a test file beside it or a seeded held-out share."""
    train = read_table(path, config)
    if config.test_source:
        test = read_table(existing_file(config.test_source, "test", "--test-data"), config)
        notes = []
    else:
        train, test = hold_out(train, config.test_fraction, config.data_seed)
        notes = [f"test split: {len(test)} examples held out of {path.name} "
                 f"(data.test_fraction={config.test_fraction}, data_seed={config.data_seed})"]
    val = read_table(existing_file(config.val_source, "validation", "--val-data"), config) if config.val_source else []
    classes = _classes(train + test, config.label_map)
    return LabelledSplits(train=train, test=test, classes=classes, name=path.stem, notes=notes, val=val)


def existing_file(path: str, what: str, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PeftlabError(f"{what} data file {path} does not exist: check {flag}")
    return path


def read_table(path: Path, config: DataConfig) -> list[Example]:
    """Rows of a table file as examples; a missing column or unknown label is named with its row."""
    rows = read_rows(path)
    if not rows:
        raise PeftlabError(f"{path} holds no rows")
    columns = set(rows[0])
    for column in (config.text_column, config.label_column, config.id_column):
        if column and column not in columns:
            raise PeftlabError(f"{path} has no column {column!r} (columns: {sorted(columns)}); "
                               "set data.text_column / data.label_column / data.id_column")
    examples, first_row = [], {}
    for i, row in enumerate(rows, start=1):
        text, raw = row.get(config.text_column), row.get(config.label_column)
        where = f"{path} row {i}"
        if not isinstance(text, str) or not text.strip():
            raise PeftlabError(f"{where} has no text in column {config.text_column!r}; remove or fix the row")
        if raw is None and None in row.values() and path.suffix.lower() in (".csv", ".tsv"):
            raise PeftlabError(f"{where} has fewer fields than the header (a quote left open swallows the rest "
                               "of the file); fix the row")
        if raw is None or raw == "":
            raise PeftlabError(f"{where} has no label in column {config.label_column!r}; remove or fix the row")
        label = replace_lone_surrogates(map_label(raw, config.label_map, where))
        ex_id = str(row[config.id_column]) if config.id_column else f"{path.name}:{i}"
        if first_row.setdefault(ex_id, i) != i:
            raise PeftlabError(f"{where}: id {ex_id!r} occurs twice (first in row {first_row[ex_id]}); ids must be "
                               f"unique: fix the column {config.id_column!r} or leave data.id_column unset")
        examples.append(Example(id=replace_lone_surrogates(ex_id), text=replace_lone_surrogates(text), label=label))
    return examples


def read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            # utf-8-sig: spreadsheet exports start with a byte-order mark, which is not part of the first column's name
            csv.field_size_limit(2**31 - 1)  # the default 128 KiB refuses long reviews, which are only truncated later
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as fh:
                for i, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise PeftlabError(f"{path} line {i} is not valid JSON ({exc.msg}); fix the line") from None
                        if not isinstance(rows[-1], dict):
                            raise PeftlabError(f"{path} line {i} is not a JSON object; each line must be one record")
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise PeftlabError(f"{path} must hold a JSON list of records (or use .jsonl)")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as exc:
        raise PeftlabError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "re-encode it as UTF-8") from None
    except (json.JSONDecodeError, csv.Error, OSError) as exc:
        raise PeftlabError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        if type(exc).__module__.startswith("pyarrow"):
            raise PeftlabError(f"cannot read parquet file {path}: {exc}") from None
        raise
    raise PeftlabError(f"{path}: unsupported table type {suffix}")


def map_label(raw, label_map: dict | None, where: str) -> str:
    """Raw label value -> class name through data.label_map (keys compared as text)."""
    if label_map is None:
        return str(raw)
    lookup = {str(k): str(v) for k, v in label_map.items()}
    key = str(raw)
    if key not in lookup:
        raise PeftlabError(f"{where}: label {raw!r} is not in data.label_map ({sorted(lookup)}); "
                           "add it to the map or remove the row")
    return lookup[key]


def _classes(examples: list[Example], label_map: dict | None) -> list[str]:
    if label_map:
        return list(dict.fromkeys(str(v) for v in label_map.values()))
    return sorted({ex.label for ex in examples})


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a seeded, per-class `fraction` of the examples as the test split."""
    by_class: dict[str, list[Example]] = {}
    for ex in sorted(examples, key=lambda e: e.id):
        by_class.setdefault(ex.label, []).append(ex)
    train, test = [], []
    for label in sorted(by_class):
        group = by_class[label]
        random.Random(f"hold-out:{seed}:{label}").shuffle(group)
        k = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        test += group[:k]
        train += group[k:]
    return train, test


# ---------------------------------------------------------------- Hugging Face hub

def load_hub_splits(name: str, config: DataConfig) -> LabelledSplits:
    """A hub data set with train and test splits, through `datasets` (needs the network once)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types for "not reachable" and "not found"
        raise PeftlabError(
            f"cannot load data set {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Pass a local copy instead: "
            "--data path/to/aclImdb_v1.tar.gz (or the extracted aclImdb folder), a CSV/JSONL/Parquet "
            "file, or set PEFTLAB_IMDB to the IMDB archive") from None
    for split in ("train", "test"):
        if split not in dataset:
            raise PeftlabError(f"hub data set {name!r} has no {split!r} split (it has {list(dataset)})")
    label_map = config.label_map
    if label_map is None and name.rstrip("/").lower().endswith("imdb"):
        # stanfordnlp/imdb labels are ClassLabel(names=[neg, pos]); peftlab's IMDB classes are words.
        label_map = {"neg": "negative", "pos": "positive", "0": "negative", "1": "positive"}
    train = examples_from_hf(dataset["train"], "train", config, label_map)
    test = examples_from_hf(dataset["test"], "test", config, label_map)
    is_imdb = name.rstrip("/").lower().endswith("imdb")
    classes = list(IMDB_CLASSES) if is_imdb else _classes(train + test, label_map)
    return LabelledSplits(train=train, test=test, classes=classes, name=name.split("/")[-1], is_imdb=is_imdb)


def examples_from_hf(split, split_name: str, config: DataConfig, label_map: dict | None) -> list[Example]:
    """Rows of a `datasets.Dataset` as examples; ClassLabel integers become their names."""
    columns = split.column_names
    for column in (config.text_column, config.label_column, config.id_column):
        if column and column not in columns:
            raise PeftlabError(f"data set split {split_name!r} has no column {column!r} (columns: "
                               f"{columns}); set data.text_column / data.label_column / data.id_column")
    feature = split.features[config.label_column]
    names = getattr(feature, "names", None)
    examples = []
    for i, row in enumerate(split):
        raw = row[config.label_column]
        if names is not None and isinstance(raw, int):
            raw = names[raw]
        where = f"{split_name} row {i}"
        label = map_label(raw, label_map, where)
        text = row[config.text_column]
        if not isinstance(text, str) or not text.strip():
            raise PeftlabError(f"{where} has no text in column {config.text_column!r}")
        ex_id = str(row[config.id_column]) if config.id_column else f"{split_name}/{i}"
        examples.append(Example(id=ex_id, text=clean_review(text), label=label))
    return examples
