import json
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlab.config import DataConfig
from peftlab.data import balanced_sample, load_splits, select_splits
from peftlab.data.examples import Example
from peftlab.errors import PeftlabError


def make_tar(folder, path):
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname="aclImdb")
    return path


def test_aclimdb_folder_and_archive_give_the_same_examples(imdb_dir, tmp_path):
    from_dir = load_splits(DataConfig(source=str(imdb_dir)))
    from_tar = load_splits(DataConfig(source=str(make_tar(imdb_dir, tmp_path / "a.tar.gz"))))
    assert from_dir.train == from_tar.train and from_dir.test == from_tar.test
    assert len(from_dir.train) == 24 and from_dir.classes == ["negative", "positive"]
    ex = next(e for e in from_dir.test if e.id.startswith("test/pos/"))
    assert ex.label == "positive" and "<br" not in ex.text and "\n" in ex.text


def test_imdb_alias_uses_the_environment(imdb_dir, monkeypatch):
    monkeypatch.setenv("PEFTLAB_IMDB", str(imdb_dir))
    assert len(load_splits(DataConfig(source="imdb")).test) == 24


def test_archive_in_another_layout_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("hello")
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "x", arcname="x")
    with pytest.raises(PeftlabError, match="aclImdb layout"):
        load_splits(DataConfig(source=str(tmp_path / "x.tar.gz")))


def test_missing_path_and_offline_hub_give_clear_messages(monkeypatch):
    with pytest.raises(PeftlabError, match="does not exist"):
        load_splits(DataConfig(source="./nowhere/aclImdb.tar.gz"))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PeftlabError, match="local copy"):
        load_splits(DataConfig(source="stanfordnlp/imdb"))


def test_hub_dataset_rows_become_examples(monkeypatch):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"text": ["bad<br />film", "good film", "meh", "fine"], "label": [0, 1, 0, 1]}, features=features)
        for s in ("train", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: ds)
    splits = load_splits(DataConfig(source="stanfordnlp/imdb"))
    assert splits.classes == ["negative", "positive"] and splits.is_imdb
    assert splits.train[0] == Example("train/0", "bad\nfilm", "negative")


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(r[k]) for k in rows[0]) for r in rows]
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_files_with_columns_and_label_map(tmp_path, suffix):
    rows = [{"review": f"text number {i}", "stars": i % 2, "rid": f"r{i}"} for i in range(20)]
    write_rows(tmp_path / f"d{suffix}", rows)
    cfg = DataConfig(source=str(tmp_path / f"d{suffix}"), text_column="review", label_column="stars",
                     id_column="rid", label_map={0: "bad", 1: "good"}, test_fraction=0.2)
    splits = load_splits(cfg)
    assert splits.classes == ["bad", "good"]
    assert len(splits.test) == 4 and len(splits.train) == 16
    assert {e.id for e in splits.train}.isdisjoint({e.id for e in splits.test})
    assert sum(e.label == "good" for e in splits.test) == 2


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "zzz"}], "not in data.label_map"),
    ([{"text": "", "label": "x"}], "no text"),
    ([{"txt": "a", "label": "x"}], "no column 'text'"),
    ([{"text": "a", "label": ""}], "no label"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(PeftlabError, match=message):
        load_splits(DataConfig(source=str(tmp_path / "d.jsonl"), label_map={"x": "x", "y": "y"}))


def test_duplicated_ids_and_bad_json_are_refused(tmp_path):
    write_rows(tmp_path / "d.jsonl", [{"text": "a", "label": "x", "id": 1}, {"text": "b", "label": "y", "id": 1}])
    with pytest.raises(PeftlabError, match="occurs twice"):
        load_splits(DataConfig(source=str(tmp_path / "d.jsonl"), id_column="id", test_source=str(tmp_path / "d.jsonl")))
    (tmp_path / "e.jsonl").write_text('{"text": "a", "label": "x"}\n{broken\n')
    with pytest.raises(PeftlabError, match="line 2 is not valid JSON"):
        load_splits(DataConfig(source=str(tmp_path / "e.jsonl")))


def test_non_utf8_review_is_named(tmp_path, imdb_dir):
    import shutil
    root = tmp_path / "aclImdb"
    shutil.copytree(imdb_dir, root)
    (root / "train" / "pos" / "99_9.txt").write_bytes(b"caf\xe9 bad bytes")
    with pytest.raises(PeftlabError, match="99_9.txt is not UTF-8"):
        load_splits(DataConfig(source=str(root)))


def pool(n_per_class):
    return [Example(f"{c}{i:04d}", "t", c) for c in ("neg", "pos") for i in range(n_per_class)]


def test_balanced_sample_is_balanced_nested_and_order_free():
    examples = pool(300)
    small = balanced_sample(examples, 50, ["neg", "pos"], seed=3, purpose="train")
    large = balanced_sample(list(reversed(examples)), 150, ["neg", "pos"], seed=3, purpose="train")
    assert sum(e.label == "pos" for e in small) == 25
    assert set(small) <= set(large)                       # nested learning curves
    assert small == balanced_sample(examples, 50, ["neg", "pos"], seed=3, purpose="train")
    assert set(small) != set(balanced_sample(examples, 50, ["neg", "pos"], seed=4, purpose="train"))


def test_impossible_sample_sizes_are_refused():
    with pytest.raises(PeftlabError, match="balanced"):
        balanced_sample(pool(10), 5, ["neg", "pos"], 0, "train")
    with pytest.raises(PeftlabError, match="at most 20"):
        balanced_sample(pool(10), 40, ["neg", "pos"], 0, "train")


def test_select_splits_whole_test_split(imdb_dir):
    splits = load_splits(DataConfig(source=str(imdb_dir)))
    samples = select_splits(splits, 4, None, 0)
    train, test = samples.train, samples.test
    assert len(train) == 4 and len(test) == 24
    assert [e.id for e in test] == sorted(e.id for e in test)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and "\r" not in s),
                          st.sampled_from(["a", "b"])), min_size=2, max_size=20))
def test_jsonl_parser_keeps_every_row_exactly(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("h") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8")
    from peftlab.data.sources import read_table
    examples = read_table(path, DataConfig(source=str(path)))
    assert [(e.text, e.label) for e in examples] == rows
