"""Integration tests run on the real SmolLM2 model and real IMDB reviews.

They find the data through PEFTLAB_TEST_DATA (`.ci/run` sets it to ../shared/data/aclImdb_labeled.tar.gz).
Unset, they are skipped with a visible reason; set but wrong, they fail.
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def imdb_archive() -> Path:
    value = os.environ.get("PEFTLAB_TEST_DATA")
    if not value:
        pytest.skip("PEFTLAB_TEST_DATA is not set: integration tests need the IMDB archive "
                    "(export PEFTLAB_TEST_DATA=path/to/aclImdb_v1.tar.gz)")
    path = Path(value)
    assert path.exists(), f"PEFTLAB_TEST_DATA={value} does not exist"
    return path


@pytest.fixture(scope="session")
def smollm2(imdb_archive):
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session (bf16 where fast)."""
    from peftlab.config import ModelConfig
    from peftlab.models import load_base_model

    return load_base_model(ModelConfig(name="smollm2"))
