"""bench/peers/prompt_text.py: the peers (lm-evaluation-harness, generate()) get peftlab's prompts as text.

If the text drifted from peftlab's token ids (a demonstration left out, another separator, a review cut
elsewhere), bench/kshot_bench.py would compare two different prompts and its speed ratio would mean nothing.
"""

import pytest

from bench.peers.prompt_text import prompt_texts
from peftlab.config import DataConfig, PromptConfig
from peftlab.data import load_splits
from peftlab.prompts import build_prompt_encoder
from tests.tiny_models import build_tokenizer
from tests.unit.test_scoring import CLASSES


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("k", [0, 3])
def test_peer_text_is_peftlabs_prompt_and_tokenises_back_to_its_ids(imdb_dir, k, bos):
    tok = build_tokenizer(bos)
    splits = load_splits(DataConfig(source=str(imdb_dir)))
    enc = build_prompt_encoder(tok, PromptConfig(max_input_tokens=16, shots=k), CLASSES, True, splits.train)
    test = splits.test[:6]
    encoded = enc.encode(test, tok)
    assert all(e.truncated for e in encoded)  # head+tail cuts, demonstrations' included: the path that decodes
    assert len(enc.demonstrations) == k and (enc.bos_ids != []) == bos
    for text, e in zip(prompt_texts(enc, test, tok), encoded):
        assert text == tok.decode(e.prompt_ids)
        assert text.count("### Response:\n") == k + 1
        for word, ids in zip(enc.label_words, enc.label_ids):
            # what lm-eval's HFLM.tok_encode does for a context that already starts with BOS: no second one
            assert tok(text + word, add_special_tokens=False)["input_ids"] == e.prompt_ids + ids
