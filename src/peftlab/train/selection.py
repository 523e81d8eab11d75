"""Choosing the epoch a run reports: on the validation split, on the test subset (the study), or the last.

The study reported each cell's best epoch by test accuracy ("(k)"), which makes the figure optimistic:
the test subset chose it. With `train.select_on: val` the validation split chooses and the test subset
is scored once, with the chosen weights; with `last` nothing is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftlab.train.checkpoint import trainable_state


@dataclass
class BestEpoch:
    """The chosen epoch so far, with what is needed to report it after training (or after a resume).

    Its state travels with every checkpoint through `state_dict` / `load_state_dict`.
    """

    select_on: str                                 # val | test | last
    epoch: int | None = None
    record: dict = field(default_factory=dict)     # that epoch's evaluations: {"val": metrics, "test": metrics}
    predictions: list[dict] = field(default_factory=list)  # its test predictions, when chosen on test
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # its trainable weights (not for `last`)

    def consider(self, epoch: int, record: dict, params: dict, predictions: list[dict] | None = None) -> bool:
        """Keep `epoch` if it beats the one kept (strictly: a tie keeps the earlier epoch); True if kept."""
        if self.select_on != "last" and self.epoch is not None:
            if record[self.select_on]["accuracy"] <= self.record[self.select_on]["accuracy"]:
                return False
        self.epoch, self.record, self.predictions = epoch, record, list(predictions or [])
        # `last`: the weights at the end of training are the chosen ones, no copy needed.
        self.weights = trainable_state(params) if self.select_on != "last" else {}
        return True

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able bookkeeping, tensors) for a checkpoint."""
        return ({"select_on": self.select_on, "epoch": self.epoch, "record": self.record,
                 "predictions": self.predictions}, dict(self.weights))

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.epoch, self.record = state.get("epoch"), state.get("record", {})
        self.predictions, self.weights = state.get("predictions", []), dict(tensors)


def selected_on_val(history: list[dict]) -> dict | None:
    """The test accuracy at the epoch the validation split would choose, where every epoch has both.

    A run that selects on test (the study's protocol) and has a validation split gives both figures
    from one run: the study's optimistic one and this one, which the test subset did not choose.
    """
    both = [h for h in history if h.get("val_accuracy") is not None and h.get("accuracy") is not None]
    if not both or len(both) != len(history):
        return None
    best = max(both, key=lambda h: (h["val_accuracy"], -h["epoch"]))  # ties: the earlier epoch
    return {"epoch": best["epoch"], "accuracy": best["accuracy"], "ci95": best["ci95"],
            "val_accuracy": best["val_accuracy"]}
