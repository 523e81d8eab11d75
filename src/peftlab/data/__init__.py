"""Data: labelled examples from aclImdb folders/tarballs, the Hugging Face hub, or table files."""

from peftlab.data.examples import Example, LabelledSplits
from peftlab.data.sampling import balanced_sample, select_splits
from peftlab.data.sources import load_splits

__all__ = ["Example", "LabelledSplits", "balanced_sample", "load_splits", "select_splits"]
