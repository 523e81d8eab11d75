"""The `search:` and `tune:` sections of a tune YAML: dotted config keys to Optuna distributions.

    search:
      train.lr: loguniform(1e-5, 1e-2)      # FloatDistribution(log=True); both ends > 0
      method.lora_dropout: uniform(0, 0.3)  # FloatDistribution
      method.virtual_tokens: int(4, 80)     # IntDistribution; int(4, 80, log) samples on a log scale
      method.lora_r: [4, 8, 16]             # CategoricalDistribution
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peftlab.config import build_config, leaves, opt
from peftlab.errors import PeftlabError

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
OBJECTIVES = ("val_accuracy", "val_nll")
_CALL = re.compile(r"^\s*(loguniform|uniform|int)\s*\((.*)\)\s*$")


@dataclass
class TuneSpec:
    """The `tune:` section of a tune YAML."""

    trials: int = opt(20, "budget: trials that end (completed, pruned, or failed for a reason such as a diverged "
                      "loss); a trial cut off by a kill is redone and not counted")
    sampler: str = opt("tpe", "tpe (Optuna's TPESampler, constant liar) or random; seeded by tune.seed, reseeded "
                       "per trial so a resumed search draws what an unbroken one draws (with --workers: see below)")
    seed: int = opt(0, "seed of the sampler")
    startup_trials: int = opt(5, "TPE: random trials before it models the results; median pruner: trials "
                              "before it prunes")
    pruner: str = opt("median", "median (Optuna's MedianPruner), halving (SuccessiveHalvingPruner) or none; "
                      "fed each epoch's validation value")
    objective: str = opt("val_accuracy", "val_accuracy (maximised) or val_nll (minimised), of the epoch the "
                         "run selects on the validation split")
    baseline: bool = opt(False, "also run the config without the search (searched keys at the YAML's or "
                         "peftlab's defaults) with the test subset scored, so that best.json sets the tuned "
                         "config beside the untuned one on the same test examples, with a paired McNemar test")
    study: str | None = opt(None, "name of the Optuna study (default: the YAML file's stem)")
    storage: str | None = opt(None, "SQLite file of the study (default: <out>/study.sqlite3); watch it with "
                              "optuna-dashboard sqlite:///<file>")

    def __post_init__(self):
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise PeftlabError(f"tune.trials={self.trials!r}: the budget must be a whole number of trials, 1 or more")
        for key, value, choices in (("sampler", self.sampler, SAMPLERS), ("pruner", self.pruner, PRUNERS),
                                    ("objective", self.objective, OBJECTIVES)):
            if value not in choices:
                raise PeftlabError(f"tune.{key}={value!r} is not one of {', '.join(choices)}")
        if not isinstance(self.baseline, bool):
            raise PeftlabError(f"tune.baseline={self.baseline!r} must be true or false")
        if not isinstance(self.startup_trials, int) or self.startup_trials < 0:
            raise PeftlabError(f"tune.startup_trials={self.startup_trials!r} must be a whole number >= 0")


def build_tune_spec(raw: Any, source: str) -> TuneSpec:
    import dataclasses

    raw = raw or {}
    known = [f.name for f in dataclasses.fields(TuneSpec)]
    if not isinstance(raw, dict):
        raise PeftlabError(f"{source}: 'tune' must be a mapping ({', '.join(known)})")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PeftlabError(f"{source}: unknown key 'tune.{unknown[0]}'. Known: {', '.join(known)}")
    return TuneSpec(**raw)


def parse_distribution(key: str, value: Any, source: str):
    """One search-space entry: a list (categorical) or loguniform(a, b) | uniform(a, b) | int(a, b[, log])."""
    import optuna.distributions as od  # here, not at the top: `peftlab --help` need not import optuna

    if isinstance(value, list):
        if not value:
            raise PeftlabError(f"{source}: search key {key} has an empty list; give at least one value")
        if any(isinstance(v, (list, dict)) for v in value):
            raise PeftlabError(f"{source}: search key {key}: a categorical choice holds single values, e.g. [4, 8, 16]")
        return od.CategoricalDistribution(value)
    match = _CALL.match(value) if isinstance(value, str) else None
    hint = "loguniform(1e-5, 1e-2), uniform(0, 0.3), int(4, 80), int(4, 80, log) or a list [4, 8, 16]"
    if match is None:
        raise PeftlabError(f"{source}: search key {key}: cannot read {value!r} as a distribution; write {hint}")
    kind, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
    log = kind == "loguniform"
    if kind == "int" and len(args) == 3 and args[2] == "log":
        log, args = True, args[:2]
    if len(args) != 2:
        raise PeftlabError(f"{source}: search key {key}: {value!r} needs two bounds, e.g. {kind}(1, 10)")
    try:
        low, high = (int(a) if kind == "int" else float(a) for a in args)
    except ValueError:
        raise PeftlabError(f"{source}: search key {key}: the bounds of {value!r} must be "
                           f"{'whole numbers' if kind == 'int' else 'numbers'}") from None
    if not low < high:
        what = "empty" if low == high else "inverted"
        raise PeftlabError(f"{source}: search key {key}: the range {value!r} is {what}; give low < high")
    if log and low <= 0:
        raise PeftlabError(f"{source}: search key {key}: a log scale needs bounds > 0, not {value!r}")
    if kind == "int":
        return od.IntDistribution(low, high, log=log)
    return od.FloatDistribution(low, high, log=log)


def parse_search_space(raw: Any, base: dict, source: str) -> dict:
    """The `search:` mapping (key -> optuna distribution), checked: known keys, valid ends."""
    import optuna.distributions as od

    if not raw or not isinstance(raw, dict):
        raise PeftlabError(f"{source}: 'search' must map dotted config keys to distributions, e.g. "
                           "train.lr: loguniform(1e-5, 1e-2)")
    known = {leaf.key: leaf for leaf in leaves()}
    space = {}
    for key, value in raw.items():
        if key not in known or "." not in key:
            close = [k for k in known if k.endswith("." + str(key).split(".")[-1])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PeftlabError(f"{source}: unknown parameter '{key}' in the search space{hint}; search keys are "
                               "dotted config keys such as train.lr, method.lora_r, method.virtual_tokens")
        space[key] = distribution = parse_distribution(key, value, source)
        ends = (distribution.choices if isinstance(distribution, od.CategoricalDistribution)
                else (distribution.low, distribution.high))
        for end in ends:  # a bound the config rejects would fail trial after trial: say so now
            try:
                build_config(base, {key: end})
            except PeftlabError as exc:
                raise PeftlabError(f"{source}: search key {key}={end!r} is not a valid setting: {exc}") from None
    return space
