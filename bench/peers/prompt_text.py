"""peftlab's prompts as text, for the peers that take strings (lm-eval, generate()).

peftlab builds a prompt from token ids (prompts/encoding.py): the template's text before and after the
input, the input cut to `max_input_tokens`, and with `prompt.shots_mode=fixed` the demonstrations before it
(prompts/shots.py: each the template around a cut training review, its label word and a blank line). A peer
that takes text gets the same pieces as text, in the same order; the cut reviews are the decoding of the ids
peftlab kept. `bench/kshot_bench.py` checks that the peer's own tokenisation of each string gives peftlab's
token ids back (BPE could merge across the join of a head+tail cut); tests/unit/test_bench_prompts.py checks
the text against the decoding of peftlab's ids.
"""

from __future__ import annotations

from peftlab.data.examples import Example, replace_lone_surrogates
from peftlab.prompts.shots import SEPARATOR


def input_text(encoder, example: Example, tokenizer) -> str:
    """The example's text as peftlab feeds it: whole, or the decoding of the ids its truncation kept."""
    text = replace_lone_surrogates(example.text)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    kept = encoder.truncate(ids)
    return text if kept == ids else tokenizer.decode(kept, clean_up_tokenization_spaces=False)


def prompt_texts(encoder, examples: list[Example], tokenizer) -> list[str]:
    """Each example's whole prompt as text: BOS (as text, where the tokenizer adds one), the fixed
    demonstrations with their label words, then the template around the example's (cut) input."""
    if encoder.demonstrations_for is not None:
        raise ValueError("per-example demonstrations are not rendered as text; use prompt.shots_mode=fixed")
    index = {name: i for i, name in enumerate(encoder.classes)}
    bos = tokenizer.decode(encoder.bos_ids) if encoder.bos_ids else ""
    demos = "".join(encoder.prefix_text + input_text(encoder, d, tokenizer) + encoder.suffix_text
                    + encoder.label_words[index[d.label]] + SEPARATOR for d in encoder.demonstrations)
    return [bos + demos + encoder.prefix_text + input_text(encoder, ex, tokenizer) + encoder.suffix_text
            for ex in examples]
