"""Balanced, seeded, nested sampling of training examples and test subsets.

Each class's examples are ordered by id, shuffled by a generator seeded from (purpose, seed,
class) and cut at n/classes. Because the order does not depend on n, the 50 reviews of N=50 are
the first 50 of N=150 (nested learning curves, issue 3), and because ids are sorted first, the
same seed picks the same examples on any machine and from any source order.
"""

from __future__ import annotations

import random

from peftlab.data.examples import Example, LabelledSplits
from peftlab.errors import PeftlabError


def balanced_sample(examples: list[Example], n: int, classes: list[str], seed: int, purpose: str) -> list[Example]:
    """n examples, n/len(classes) of each class, picked by `seed`; ordered by class then rank."""
    if n % len(classes):
        raise PeftlabError(f"{purpose}: n={n} cannot be split into {len(classes)} balanced classes; "
                           f"give a multiple of {len(classes)}")
    per_class = n // len(classes)
    picked = []
    for label in classes:
        group = sorted((ex for ex in examples if ex.label == label), key=lambda ex: ex.id)
        if len(group) < per_class:
            raise PeftlabError(f"{purpose}: asked for {per_class} examples of class {label!r} but the "
                               f"split has {len(group)}; lower n to at most {len(classes) * min_class(examples, classes)}")
        random.Random(f"{purpose}:{seed}:{label}").shuffle(group)
        picked += group[:per_class]
    return picked


def min_class(examples: list[Example], classes: list[str]) -> int:
    return min(sum(1 for ex in examples if ex.label == label) for label in classes)


def select_splits(splits: LabelledSplits, n_train: int | None, n_test: int | None, data_seed: int
                  ) -> tuple[list[Example], list[Example]]:
    """The training sample and test subset of one run (None: the whole split, in id order)."""
    if not splits.test:
        raise PeftlabError(f"{splits.name}: the test split is empty")
    if n_train is None:  # 'all' (the study's "maximize" run); the training loop shuffles by its seed
        train = sorted(splits.train, key=lambda ex: ex.id)
    else:
        train = balanced_sample(splits.train, n_train, splits.classes, data_seed, "train") if n_train else []
    if n_test is None:
        test = sorted(splits.test, key=lambda ex: ex.id)
    else:
        test = balanced_sample(splits.test, n_test, splits.classes, data_seed, "test")
    return train, test
