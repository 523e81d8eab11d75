"""k-shot prompts: demonstrations drawn balanced and seeded from the training split.

Each demonstration is the whole template filled with a training example and followed by its label
word, then a blank line; the test example's own prompt comes after the last one (as
lm-evaluation-harness's `num_fewshot` builds its context). With `prompt.shots_mode=fixed` every
example gets the same demonstrations, so they are part of the prompt prefix that evaluation scores
once and shares (evaluate/scoring.py); `per-example` draws them per example id (never the example
itself), which leaves only the first demonstration's instruction to share.

Where they come from (decided for issue 13): the training split, never the test split; seeded by
`data.data_seed` and the purpose "shots" alone, so that every cell of a grid and the zero-shot run
show the same demonstrations whatever their N. A fixed demonstration may therefore also be in a
run's training sample: it is training data either way, and no test example is ever shown.
"""

from __future__ import annotations

import math
import random

from peftlab.data.examples import Example
from peftlab.errors import PeftlabError

SEPARATOR = "\n\n"


def by_class(pool: list[Example], classes: list[str]) -> dict[str, list[Example]]:
    """Each class's examples in id order (so that a seed picks the same ones from any source order)."""
    return {label: sorted((ex for ex in pool if ex.label == label), key=lambda ex: ex.id) for label in classes}


def draw_demonstrations(groups: dict[str, list[Example]], k: int, seed: int, key: str = "fixed",
                        exclude: str | None = None) -> list[Example]:
    """k examples of `groups` (by_class), as balanced over the classes as k allows (which classes get the
    remainder is seeded), in a seeded order so that no class always comes last; `exclude` (an example id)
    is never drawn."""
    classes = list(groups)
    per_class = math.ceil(k / len(classes))
    rng = random.Random(f"shots:{seed}:{key}")
    picked_by_class = {}
    for label, group in groups.items():
        if len(group) - (exclude is not None) < per_class:
            raise PeftlabError(f"prompt.shots={k} needs {per_class} demonstration(s) of class {label!r} from the "
                               f"training split, which holds {len(group)}; lower prompt.shots to at most "
                               f"{len(classes) * (min(len(g) for g in groups.values()) - (exclude is not None))}")
        drawn = rng.sample(group, min(per_class + 1, len(group)))  # one spare, in case it is `exclude`
        picked_by_class[label] = [ex for ex in drawn if ex.id != exclude][:per_class]
    order = rng.sample(classes, len(classes))  # which classes come first, and so get the remainder of k
    picked = [picked_by_class[label][i] for i in range(per_class) for label in order][:k]
    rng.shuffle(picked)
    return picked


def demonstration_ids(encoder, demos: list[Example], tokenizer) -> list[int]:
    """Token ids of the demonstrations: each the template around its (truncated) input, its label word
    and a blank line; BOS not included (it stays first in the prompt)."""
    if not demos:
        return []
    texts = tokenizer([ex.text for ex in demos], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    separator = separator_ids(tokenizer, encoder.prefix_text)
    index = {name: i for i, name in enumerate(encoder.classes)}
    ids = []
    for ex, text_ids in zip(demos, texts):
        ids += encoder.body_prefix_ids + encoder.truncate(text_ids) + encoder.suffix_ids \
            + encoder.label_ids[index[ex.label]] + separator
    return ids


def separator_ids(tokenizer, next_text: str) -> list[int]:
    """Token ids of SEPARATOR as it comes before `next_text` (the template's text before the input).

    Tokenised alone, a BPE tokenizer may give "\n\n" one token that the same text never gets mid-prompt:
    SmolLM2's has "\n\n" -> [ĊĊ] but "\n\nBelow" -> [Ċ, Ċ, Below]. k-shot prompts joined with the lone ids
    differed from their own text at every demonstration's end, and scored up to 0.53 nats away from it
    (16 reviews, 4 shots, fp32; found by bench/kshot_bench.py against lm-evaluation-harness, which
    tokenises the whole text). Where the separator merges with the text after it, the lone ids stay.
    """
    after = tokenizer(next_text, add_special_tokens=False)["input_ids"]
    joined = tokenizer(SEPARATOR + next_text, add_special_tokens=False)["input_ids"]
    cut = len(joined) - len(after)
    if after and cut > 0 and joined[cut:] == after:
        return joined[:cut]
    return tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
