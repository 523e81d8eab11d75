"""Balanced, seeded, nested sampling of training examples and test subsets.

Each class's examples are ordered by id, shuffled by a generator seeded from (purpose, seed,
class) and cut at n/classes. Because the order does not depend on n, the 50 reviews of N=50 are
the first 50 of N=150 (nested learning curves, issue 3), and because ids are sorted first, the
same seed picks the same examples on any machine and from any source order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from peftlab.data.examples import Example, LabelledSplits
from peftlab.errors import PeftlabError


def class_order(examples: list[Example], label: str, seed: int, purpose: str) -> list[Example]:
    """One class's examples in the seeded order every sample of `purpose` cuts from (ids sorted first)."""
    group = sorted((ex for ex in examples if ex.label == label), key=lambda ex: ex.id)
    random.Random(f"{purpose}:{seed}:{label}").shuffle(group)
    return group


def balanced_sample(examples: list[Example], n: int, classes: list[str], seed: int, purpose: str,
                    reserved: int = 0) -> list[Example]:
    """n examples, n/len(classes) of each class, picked by `seed`; ordered by class then rank.

    `reserved` examples per class at the end of each class's order are kept out (the validation split).
    """
    per_class = per_class_count(n, classes, purpose)
    picked = []
    for label in classes:
        group = class_order(examples, label, seed, purpose)
        if len(group) < per_class + reserved:
            left = f" after the {reserved} validation examples of each class" if reserved else ""
            raise PeftlabError(f"{purpose}: asked for {per_class} examples of class {label!r} but the split has "
                               f"{len(group) - reserved}{left}; lower n to at most "
                               f"{len(classes) * (min_class(examples, classes) - reserved)}"
                               + (" or lower --n-val" if reserved else ""))
        picked += group[:per_class]
    return picked


def per_class_count(n: int, classes: list[str], purpose: str) -> int:
    if n % len(classes):
        raise PeftlabError(f"{purpose}: n={n} cannot be split into {len(classes)} balanced classes; "
                           f"give a multiple of {len(classes)}")
    return n // len(classes)


def validation_sample(train_split: list[Example], n_val: int, classes: list[str], seed: int) -> list[Example]:
    """n_val examples taken from the END of each class's training order, the first from the very end.

    Training samples are cut from the start of the same order, so the validation split is disjoint from
    the training sample of every N (and nested: the validation split of n_val=100 is part of n_val=200's).
    """
    per_class = per_class_count(n_val, classes, "validation")
    picked = []
    for label in classes:
        group = class_order(train_split, label, seed, "train")
        if len(group) <= per_class:
            raise PeftlabError(f"validation: asked for {per_class} examples of class {label!r} but the training "
                               f"split has only {len(group)}; lower --n-val")
        picked += group[::-1][:per_class]
    return picked


def min_class(examples: list[Example], classes: list[str]) -> int:
    return min(sum(1 for ex in examples if ex.label == label) for label in classes)


@dataclass
class Samples:
    """The examples of one run: what it trains on, what chooses its epoch, what it is tested on."""

    train: list[Example]
    val: list[Example]
    test: list[Example]


def select_splits(splits: LabelledSplits, n_train: int | None, n_test: int | None, data_seed: int,
                  n_val: int | None = 0) -> Samples:
    """The training sample, validation split and test subset of one run (None: the whole split, in id order)."""
    if not splits.test:
        raise PeftlabError(f"{splits.name}: the test split is empty")
    if splits.val:  # a validation file of its own
        val = (sorted(splits.val, key=lambda ex: ex.id) if n_val is None else
               balanced_sample(splits.val, n_val, splits.classes, data_seed, "validation") if n_val else [])
        reserved = 0
    else:
        val = validation_sample(splits.train, n_val, splits.classes, data_seed) if n_val else []
        reserved = len(val) // len(splits.classes)
    if n_train is None:  # 'all' (the study's "maximize" run); the training loop shuffles by its seed
        held_out = {ex.id for ex in val}
        train = sorted((ex for ex in splits.train if ex.id not in held_out), key=lambda ex: ex.id)
    else:
        train = (balanced_sample(splits.train, n_train, splits.classes, data_seed, "train", reserved)
                 if n_train else [])
    if n_test is None:
        test = sorted(splits.test, key=lambda ex: ex.id)
    else:
        test = balanced_sample(splits.test, n_test, splits.classes, data_seed, "test")
    return Samples(train=train, val=val, test=test)
