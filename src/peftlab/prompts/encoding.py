"""Token ids of prompts and label words; truncation of the input part only.

The prompt is tokenised in three pieces (text before the input, the input, text after it) so the
input can be cut to its budget without touching the instruction or the response marker. Label
words are tokenised in context: ids(suffix + word) minus ids(suffix), because a SentencePiece or
BPE tokenizer splits "positive" differently at the start of a text than after a newline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from peftlab.config import PromptConfig
from peftlab.data.examples import Example, replace_lone_surrogates
from peftlab.errors import PeftlabError
from peftlab.prompts.templates import (
    GENERIC_INSTRUCTION,
    IMDB_INSTRUCTION,
    answer_prefix,
    choices_text,
    render_template,
)


@dataclass
class EncodedExample:
    id: str
    prompt_ids: list[int]  # prefix + (possibly truncated) input + suffix
    label: int | None      # index into the classes; None when unknown (predict)
    truncated: bool


@dataclass
class PromptEncoder:
    """Everything needed to turn texts into model inputs and score label words."""

    classes: list[str]
    bare_words: list[str]       # the label words as configured, one per class
    label_words: list[str]      # as they follow the response marker, answer prefix included
    label_ids: list[list[int]]  # token ids of each label word in context
    prefix_ids: list[int]
    suffix_ids: list[int]
    max_input_tokens: int
    truncation: str
    instruction: str
    prefix_text: str
    suffix_text: str
    body_prefix_ids: list[int] = field(default_factory=list)  # prefix_ids without the BOS and demonstrations
    demonstrations: list[Example] = field(default_factory=list)  # prompt.shots_mode=fixed: inside prefix_ids
    demonstrations_for: Callable[[Example], list[int]] | None = None  # per-example: ids of that example's

    @property
    def bos_ids(self) -> list[int]:
        """What the tokenizer puts before any text (BOS, or nothing for GPT-2-style tokenizers)."""
        return self.prefix_ids[: len(self.prefix_ids) - len(self.body_prefix_ids)]

    def truncate(self, ids: list[int]) -> list[int]:
        budget = self.max_input_tokens
        if len(ids) <= budget:
            return ids
        if self.truncation == "head":
            return ids[:budget]
        if self.truncation == "tail":
            return ids[-budget:]
        # Head+tail: a quarter from the start, the rest from the end, after Sun et al. 2019
        # ("How to Fine-Tune BERT for Text Classification"), whose best IMDB cut was head 128 + tail 382.
        head = budget // 4
        return ids[:head] + ids[len(ids) - (budget - head):]

    def encode(self, examples: list[Example], tokenizer) -> list[EncodedExample]:
        """Tokenise the examples in one batched call and wrap each input in the template."""
        label_index = {name: i for i, name in enumerate(self.classes)}
        texts = [replace_lone_surrogates(ex.text) for ex in examples]  # tokenizers need valid UTF-8
        # split_special_tokens: a review that contains "</s>" or "<|im_end|>" is text, not a control token that
        # could end or rewrite the prompt (untrusted input must not steer the template).
        ids_list = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
        out = []
        for ex, ids in zip(examples, ids_list):
            kept = self.truncate(ids)
            prefix = self.prefix_ids
            if self.demonstrations_for is not None:  # per-example demonstrations, after the BOS
                prefix = self.bos_ids + self.demonstrations_for(ex) + self.body_prefix_ids
            out.append(EncodedExample(id=ex.id, prompt_ids=prefix + kept + self.suffix_ids,
                                      label=label_index.get(ex.label), truncated=len(kept) < len(ids)))
        return out

    def record(self) -> dict:
        """What a run record keeps about the prompt, so that it can be rebuilt exactly."""
        return {"classes": self.classes, "words_by_class": dict(zip(self.classes, self.bare_words)),
                "label_words": self.label_words, "label_ids": self.label_ids,
                "instruction": self.instruction, "prefix": self.prefix_text, "suffix": self.suffix_text,
                "max_input_tokens": self.max_input_tokens, "truncation": self.truncation,
                "demonstrations": [ex.id for ex in self.demonstrations],
                "demonstrations_per_example": self.demonstrations_for is not None}


def build_prompt_encoder(tokenizer, config: PromptConfig, classes: list[str], is_imdb: bool,
                         demonstrations_from: list[Example] | None = None, data_seed: int = 0) -> PromptEncoder:
    """Render the template, tokenise its fixed parts and the label words, and check the words; with
    prompt.shots, add demonstrations drawn from `demonstrations_from` (the training split)."""
    words_by_class = dict(config.label_words) if config.label_words else {c: c for c in classes}
    missing = [c for c in classes if c not in words_by_class]
    extra = [c for c in words_by_class if c not in classes]
    if missing or extra:
        raise PeftlabError(f"prompt.label_words must name each class {classes} once "
                           f"(missing: {missing}, unknown: {extra})")
    bare_words = [str(words_by_class[c]) for c in classes]
    instruction = config.instruction or (IMDB_INSTRUCTION if is_imdb else GENERIC_INSTRUCTION)
    instruction = instruction.replace("{choices}", choices_text(bare_words))
    prefix_text, suffix_text = render_template(config.template, instruction, tokenizer)

    chat = config.template == "chat"  # a rendered chat template already holds its special tokens
    prefix_ids = _ids(tokenizer, prefix_text, special=not chat)
    suffix_ids = _ids(tokenizer, suffix_text, special=False)
    glue = answer_prefix(config.template)
    words = [w if w[:1].isspace() else glue + w for w in bare_words]
    label_ids = [label_ids_in_context(tokenizer, suffix_text, suffix_ids, w) for w in words]
    check_label_ids(tokenizer, words, label_ids)
    body = _ids(tokenizer, prefix_text, special=False)
    encoder = PromptEncoder(classes=list(classes), bare_words=bare_words, label_words=words, label_ids=label_ids,
                            prefix_ids=prefix_ids, suffix_ids=suffix_ids, max_input_tokens=config.max_input_tokens,
                            truncation=config.truncation, instruction=instruction,
                            prefix_text=prefix_text, suffix_text=suffix_text,
                            body_prefix_ids=body if prefix_ids[len(prefix_ids) - len(body):] == body else prefix_ids)
    return add_demonstrations(encoder, tokenizer, config, demonstrations_from, data_seed) if config.shots else encoder


def add_demonstrations(encoder: PromptEncoder, tokenizer, config: PromptConfig, pool: list[Example] | None,
                       data_seed: int) -> PromptEncoder:
    """prompt.shots demonstrations: in the prefix (fixed) or per example (peftlab.prompts.shots)."""
    from peftlab.prompts.shots import by_class, demonstration_ids, draw_demonstrations

    if not pool:
        raise PeftlabError(f"prompt.shots={config.shots} draws demonstrations from the training split, and there "
                           "is none here; use prompt.shots=0")
    groups = by_class(pool, encoder.classes)
    if config.shots_mode == "fixed":
        encoder.demonstrations = draw_demonstrations(groups, config.shots, data_seed)
        demos = demonstration_ids(encoder, encoder.demonstrations, tokenizer)
        encoder.prefix_ids = encoder.bos_ids + demos + encoder.body_prefix_ids
        encoder.body_prefix_ids = demos + encoder.body_prefix_ids  # bos_ids stays what it was
    else:
        draw_demonstrations(groups, config.shots, data_seed, exclude="")  # too few examples: fail now, not later
        encoder.demonstrations_for = lambda ex: demonstration_ids(
            encoder, draw_demonstrations(groups, config.shots, data_seed, key=ex.id, exclude=ex.id), tokenizer)
    return encoder


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if special and tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id \
            and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # some tokenizers append EOS as a special token; the prompt goes on after it
    return ids


def label_ids_in_context(tokenizer, suffix_text: str, suffix_ids: list[int], word: str) -> list[int]:
    """Token ids of `word` as they follow the prompt's suffix."""
    full = tokenizer(suffix_text + word, add_special_tokens=False)["input_ids"]
    if full[: len(suffix_ids)] == suffix_ids and len(full) > len(suffix_ids):
        return full[len(suffix_ids):]
    # The word merged with the suffix's last token: score it as tokenised on its own instead.
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def check_label_ids(tokenizer, words: list[str], label_ids: list[list[int]]) -> None:
    for word, ids in zip(words, label_ids):
        if not ids:
            raise PeftlabError(f"label word {word!r} tokenises to nothing; choose another word")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise PeftlabError(f"label word {word!r} contains characters the tokenizer cannot represent; "
                               "choose another word")
    seen = {}
    for word, ids in zip(words, label_ids):
        key = tuple(ids)
        if key in seen:
            raise PeftlabError(f"label words {seen[key]!r} and {word!r} tokenise to the same ids {list(key)}; "
                               "choose words the model can tell apart")
        seen[key] = word
