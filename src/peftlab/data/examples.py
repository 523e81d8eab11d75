"""The unit of data: an example with a stable id, its text and its class name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peftlab.errors import PeftlabError


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """U+FFFD for lone surrogates, which JSON escapes can carry but UTF-8 (and tokenizers) cannot."""
    return _LONE_SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class Example:
    id: str      # traceable back to the source, e.g. "test/pos/123_9" for IMDB
    text: str
    label: str   # class name, e.g. "positive"


@dataclass
class LabelledSplits:
    """A data set's train and test splits and its ordered class names."""

    train: list[Example]
    test: list[Example]
    classes: list[str]
    name: str = "data"
    is_imdb: bool = False
    notes: list[str] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)  # a validation file of its own (data.val_source)

    def __post_init__(self):
        if len(self.classes) < 2:
            raise PeftlabError(f"{self.name}: the data holds only the class {self.classes}; classification needs "
                               "at least two (check data.label_column and data.label_map)")
        for split_name in ("train", "val", "test"):
            check_examples(getattr(self, split_name), self.classes, f"{self.name} {split_name} split")
        for one, other, flag in (("train", "test", "--test-data"), ("train", "val", "--val-data"),
                                 ("val", "test", "--val-data")):
            ids = {ex.id for ex in getattr(self, one)}
            both = next((ex.id for ex in getattr(self, other) if ex.id in ids), None)
            if both is not None:
                raise PeftlabError(f"{self.name}: example id {both!r} is in both the {one} and the {other} split; "
                                   f"they must not share examples (is {flag} the same file as another?)")


def check_examples(examples: list[Example], classes: list[str], where: str) -> None:
    """Refuse duplicated ids, empty texts and labels outside the class list, naming the first offender."""
    seen: set[str] = set()
    known = set(classes)
    for ex in examples:
        if ex.id in seen:
            raise PeftlabError(f"{where}: example id {ex.id!r} occurs twice; ids must be unique "
                               "(set data.id_column to a unique column, or leave it unset)")
        seen.add(ex.id)
        if ex.label not in known:
            raise PeftlabError(f"{where}: example {ex.id!r} has label {ex.label!r}, which is not one of "
                               f"the classes {classes}; fix the row or add it to data.label_map")
        if not ex.text.strip():
            raise PeftlabError(f"{where}: example {ex.id!r} has an empty text; remove it from the data")
