"""Checkpoints: everything a killed training run needs to go on exactly where it stopped.

One folder per run, `<out>/checkpoint/`:

    tensors-<n>.safetensors  trainable weights, AdamW moments and step counts, torch RNG states,
                             and the caller's tensors (run_train: the chosen epoch's weights)
    state.json               where the run stands (epoch, batch, running sums, Python/NumPy/batch-order
                             RNG states), optimiser and scheduler scalars, the caller's bookkeeping,
                             what the run is (its config and examples), and the name and sha256 of the tensors

The tensors are written first, then state.json, each to a temporary file renamed over the target
(os.replace): state.json is the commit point, so a kill at any moment leaves the previous
checkpoint or the new one, never a mix. Nothing is pickled (no torch.save): the optimiser's
tensors go to safetensors and its scalars to JSON, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peftlab.config import RunConfig, identity_differences
from peftlab.errors import PeftlabError
from peftlab.records import atomic_write_bytes, atomic_write_text, sha256_file

STATE_FILE = "state.json"
FORMAT = 1
_TENSORS = re.compile(r"tensors-(\d+)\.safetensors$")


@dataclass
class Position:
    """Where a training run stands; the loop keeps its running sums here so that they can be saved."""

    epoch: int = 1                   # the epoch in progress, 1-based (epochs + 1: training is over)
    batch: int = 0                   # micro-batches of that epoch already done
    optimizer_steps: int = 0         # over the whole run
    loss_sum: float = 0.0            # this epoch's running sums, for its EpochRecord
    seen: int = 0
    tokens: int = 0
    seconds: float = 0.0
    order_rng: list | None = None    # the batch-order Random's state at the start of the epoch
    history: list[dict] = field(default_factory=list)  # finished epochs, as EpochRecord fields


class Checkpoints:
    """The checkpoint folder of one run: saves every `every` optimiser steps and at epoch ends.

    `config` and `sample_sha256` (a hash of the example ids it trains and selects on) say what the run
    is; a checkpoint of another run is refused (config.identity_differences decides), and so is one trained
    on a base of another `precision` (models.loading.base_dtype: `model.dtype: auto` differs by machine,
    and a run continued in another precision is neither run). `state` is the
    caller's bookkeeping (run_train: its BestEpoch): anything with `state_dict()` -> (JSON-able dict,
    tensors) and `load_state_dict(dict, tensors)`, saved with every checkpoint and restored by `load`.
    """

    def __init__(self, folder: str | Path, every: int, config: RunConfig, sample_sha256: str, state=None,
                 precision: str | None = None):
        self.folder, self.every, self.config, self.state = Path(folder), every, config, state
        self.fingerprint = {"config": config.to_dict(), "sample_sha256": sample_sha256, "precision": precision}
        self.loaded: dict | None = None  # state.json of the checkpoint found by load()
        self._tensors: dict[str, torch.Tensor] = {}

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def due(self, position: Position) -> bool:
        return self.every > 0 and position.optimizer_steps % self.every == 0

    def load(self) -> bool:
        """Read the checkpoint if there is one (True), refusing a damaged one or one of another run."""
        if not self.exists():
            return False
        state_file = self.folder / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            tensor_file = self.folder / state["tensors"]
            if sha256_file(tensor_file) != state["sha256"]:
                raise ValueError(f"{tensor_file.name} does not match its sha256")
            tensors = load_safetensors(tensor_file.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise PeftlabError(f"checkpoint {self.folder} is damaged ({exc}); delete the folder to train "
                               "from the start") from None
        saved = state.get("fingerprint", {})
        differs = identity_differences(saved.get("config", {}), self.config)
        if saved.get("sample_sha256") != self.fingerprint["sample_sha256"]:
            differs.append("its examples (data)")
        if differs:
            raise PeftlabError(f"checkpoint {self.folder} belongs to another run (it differs in "
                               f"{', '.join(differs[:5])}); resume with the same config, or choose another --out")
        trained, here = saved.get("precision"), self.fingerprint["precision"]
        if trained and here and trained != here:  # checkpoints before the field: unknown, not refused
            by_machine = ": auto depends on the machine" if self.config.model.dtype == "auto" else ""
            raise PeftlabError(
                f"checkpoint {self.folder} was trained on a {trained} base, and this run's base computes in {here} "
                f"(model.dtype={self.config.model.dtype}{by_machine}); finishing it here would mix two precisions "
                f"in one run. Resume it where the base computes in {trained}, or drop --resume and add --overwrite "
                "to train from the start (the old run is moved aside)")
        self.loaded, self._tensors = state, tensors
        if self.state is not None:
            self.state.load_state_dict(state["extra"], {k[len("extra/"):]: v for k, v in tensors.items()
                                                        if k.startswith("extra/")})
        return True

    def restore(self, params: dict[str, torch.nn.Parameter], optimizer, scheduler, order_rng: random.Random
                ) -> Position:
        """Put the loaded checkpoint's weights, optimiser, scheduler and RNG states in place."""
        state, tensors = self.loaded, self._tensors
        saved = {k[len("param/"):] for k in tensors if k.startswith("param/")}
        if saved != set(params):
            raise PeftlabError(f"checkpoint {self.folder} holds other trainable weights than this model "
                               f"({len(saved)} vs {len(params)} tensors); delete it to train from the start")
        load_trainable(params, {name: tensors[f"param/{name}"] for name in params})
        optimizer.load_state_dict(_optimizer_state(state["optimizer"], tensors, optimizer))
        scheduler.load_state_dict(state["scheduler"])
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=_natural)]
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
        position = Position(**state["position"])
        version, internal, gauss = position.order_rng
        order_rng.setstate((version, tuple(internal), gauss))
        return position

    def save(self, position: Position, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> None:
        """Write a new checkpoint atomically, then delete the older tensor files."""
        optim_json, optim_tensors = _split_optimizer_state(optimizer.state_dict())
        tensors = {f"param/{n}": p.detach() for n, p in params.items()}
        tensors.update(optim_tensors)
        extra, extra_tensors = self.state.state_dict() if self.state is not None else ({}, {})
        tensors.update({f"extra/{n}": t for n, t in extra_tensors.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        number = max((int(m.group(1)) for m in map(_TENSORS.match, _names(self.folder)) if m), default=0) + 1
        tensor_file = self.folder / f"tensors-{number:06d}.safetensors"
        atomic_write_bytes(tensor_file, save_safetensors(tensors))
        np_state = np.random.get_state()
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "position": asdict(position),
                 "optimizer": optim_json, "scheduler": scheduler.state_dict(),
                 "rng": {"python": random.getstate(),
                         "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
                 "extra": extra, "tensors": tensor_file.name, "sha256": sha256_file(tensor_file)}
        atomic_write_text(self.folder / STATE_FILE, json.dumps(state, ensure_ascii=False))
        for name in _names(self.folder):  # older tensors, and temporary files a kill left behind
            if name != tensor_file.name and name != STATE_FILE:
                (self.folder / name).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint once the run's results are written: a finished run needs none."""
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_precision(folder: str | Path) -> str | None:
    """The base precision a checkpoint was trained in (Checkpoints' `precision`); None where there is no
    readable checkpoint or it predates the field."""
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))["fingerprint"].get("precision")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def finished_epochs(folder: str | Path) -> list[dict]:
    """The epochs a checkpoint's run had finished (EpochRecord fields; `metrics` holds that epoch's
    evaluations), read from its state.json alone; [] where there is no readable checkpoint."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
        return list(state["position"]["history"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def trainable_state(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (e.g. the best epoch's), safe from later optimiser steps."""
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


def load_trainable(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """torch's optimiser state dict as (JSON-able scalars, tensors keyed optim/<param index>/<key>)."""
    scalars, tensors = {}, {}
    for index, values in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars[str(index)][key] = value
    return {"state": scalars, "param_groups": state_dict["param_groups"]}, tensors


def _optimizer_state(saved: dict, tensors: dict[str, torch.Tensor], optimizer) -> dict:
    state = {int(i): dict(values) for i, values in saved["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    groups = []
    for fresh, group in zip(optimizer.state_dict()["param_groups"], saved["param_groups"]):
        # JSON turned tuples (AdamW's betas) into lists; give them back their type.
        groups.append({k: tuple(v) if isinstance(fresh.get(k), tuple) else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _natural(key: str) -> int:
    return int(key.rsplit("/", 1)[1])
