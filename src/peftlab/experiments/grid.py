"""Sweeps: a normal run config plus a `grid:` of dotted keys to lists; the product gives the cells.

    # peftlab sweep configs/sweeps/smollm2-lora.yaml --data ../shared/data/aclImdb_labeled.tar.gz
    model: {name: smollm2}
    method: {method: lora, lora_r: 8, lora_alpha: 16}
    grid:
      data.n_train: [50, 150, 500, 2500]
      method.lora_dropout: [0.0, 0.1, 0.2]
    sweep: {name: smollm2-lora, title: "LoRA on SmolLM2: N x d"}   # optional, see SweepSpec

`cases:` names settings that go together and are not a product (a method and its learning rate, say): each
case is a mapping of dotted keys to a value, or to a list of values that the case alone is swept over (as
scikit-learn's ParameterGrid takes a list of grids). The cells are the union of the cases, each crossed with
`grid:`; a cell's grid values start with `case: <name>`, which the report uses as an axis like any other:

    cases:
      lora:  {method.method: lora, train.lr: 5.0e-4}
      dora:  {method.method: lora, method.peft_options: {use_dora: true}, train.lr: 5.0e-4}
      ia3:   {method.method: ia3, train.lr: [1.0e-3, 3.0e-3, 1.0e-2]}
    grid: {data.n_train: [150, 500]}

Each cell is a full, validated RunConfig. Its key is a hash of that resolved config (without the
fields that only say where or how to write it), so the same run has the same key in every sweep
and on every machine, and a results store can recognise it as done.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.config import (RunConfig, build_config, dotted, flatten, identity_differences, leaves, load_yaml, opt,
                            run_key)
from peftlab.errors import PeftlabError
from peftlab.records import child_path, safe_name

STUDY_TABLES = ("zero-shot", "prompt-tuning", "lora", "maximize")
REPEAT_KEYS = ("train.seed", "data.data_seed")  # repetitions of a setting, not settings of a table
DEFAULT_ROOT = Path("runs") / "sweeps"


@dataclass
class SweepSpec:
    """The optional `sweep:` section: how the sweep is named and laid out as a table in the report."""

    name: str | None = opt(None, "name of the sweep in the store and the report (default: the YAML file's stem)")
    title: str | None = opt(None, "heading of the sweep's table in the report")
    rows: str | None = opt(None, "grid key of the table's rows (default: data.n_train if swept, else the "
                           "first grid key, else model.name)")
    columns: str | None = opt(None, "grid key of the table's columns (default: the next grid key that is not "
                              "a seed)")
    study: str | None = opt(None, "the study's table shown beside it: zero-shot|prompt-tuning|lora|maximize "
                            "(default: guessed from the method and the grid)")

    def __post_init__(self):
        if self.study is not None and self.study not in STUDY_TABLES:
            raise PeftlabError(f"sweep.study={self.study!r} is not one of {', '.join(STUDY_TABLES)}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise PeftlabError(f"sweep.name={self.name!r}: use letters, digits, '.', '_' and '-' only")


@dataclass
class RayOptions:
    """The optional `ray:` section (or --workers / --ray-address): cells in parallel, see parallel.py."""

    workers: int = 1
    address: str | None = None          # None: start a local cluster; "auto" or "ray://host:10001": join one
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared equally among the workers
    max_worker_losses: int = 3          # a cell whose worker died this many times is recorded failed

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise PeftlabError(f"ray workers={self.workers!r}: give a whole number of workers, 1 or more")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise PeftlabError(f"ray {name}={value!r}: give a number of 0 or more")
        if not isinstance(self.max_worker_losses, int) or self.max_worker_losses < 1:
            raise PeftlabError(f"ray max_worker_losses={self.max_worker_losses!r}: give a whole number, 1 or more")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its key, the grid values that make it, and its resolved config."""

    key: str
    params: dict
    config: RunConfig

    @property
    def trains(self) -> bool:
        """A cell with data.n_train=0 is a zero-shot evaluation; every other cell trains an adapter."""
        return self.config.data.n_train != 0

    def label(self) -> str:
        return ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in self.params.items()) or "single run"


@dataclass
class Sweep:
    name: str
    source: str | None   # the YAML file it came from
    spec: SweepSpec
    grid: dict[str, list]
    out: Path            # each cell's run folder lies under it
    cells: list[Cell]
    command: str | None = None  # the command line that runs it, kept in the store for the report
    ray: RayOptions | None = None  # run the cells in parallel on Ray workers (None: one after another)
    # Every cell of the sweep as its YAML defines it, which the store records as the sweep's table; more than
    # `cells` when a flag runs one value of a grid key (`--n-train 500`: one row of the table).
    members: list[Cell] | None = None

    def __post_init__(self):
        if self.members is None:
            self.members = self.cells


def short_name(key: str) -> str:
    """The study's letters for the axes it used (N, V, d); the field name for the rest."""
    return {"data.n_train": "N", "method.virtual_tokens": "V", "method.lora_dropout": "d",
            "model.name": "model", "train.seed": "seed"}.get(key, key.split(".")[-1])


def format_value(value: Any) -> str:
    if value is None:
        return "all"
    if isinstance(value, str) and "/" in value:  # hub ids and paths: the last part names the model
        return value.rstrip("/").split("/")[-1]
    return str(value)


def cell_key(config: RunConfig) -> str:
    """The cell's key: its run identity's hash (config.run_key)."""
    return run_key(config)


def same_run(stored: dict, config: RunConfig) -> bool:
    """True when a stored config describes this run (config.identity_differences)."""
    return not identity_differences(stored, config)


def cell_folder(key: str, params: dict) -> str:
    """`<key>-N50-d0.1`: unique by the key, readable by the grid values, one safe path component
    (records.safe_name: grid values are text from a YAML file, e.g. a model path)."""
    parts = [f"{short_name(k)}{format_value(v)}" for k, v in params.items()]
    return safe_name("-".join([key] + parts))


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None, out: str | Path | None = None) -> Sweep:
    """Read a sweep YAML, apply command-line overrides, and expand its grid into validated cells.

    An override of a grid key replaces that axis with the one given value (e.g. `--n-train 50`
    runs only the N=50 row of the table).
    """
    path = Path(path)
    data = load_yaml(path)
    has_grid, grid_raw = "grid" in data, data.pop("grid", None)
    has_cases, cases_raw = "cases" in data, data.pop("cases", None)
    spec = build_spec(data.pop("sweep", None), path)
    ray = build_ray_options(data.pop("ray", None), path)
    base = flatten(data, str(path))
    check_scalars(base, str(path))
    grid = validate_grid(grid_raw, str(path)) if has_grid else {}
    cases = validate_cases(cases_raw, grid, str(path)) if has_cases else None
    overrides = dict(overrides or {})
    full_grid = dict(grid)
    for key in list(overrides):
        if key in grid:
            grid[key] = [overrides.pop(key)]
    for case in (cases or {}).values():  # a flag overrides what a case sets, as it overrides the base config
        for key in overrides:
            case.pop(key, None)
    base.update(overrides)
    if base.get("adapter"):
        raise PeftlabError(f"{path}: a sweep cannot evaluate a saved adapter (it would be merged into the base "
                           "model that all cells share); run `peftlab eval --adapter` for it")
    name = spec.name or path.stem
    yaml_out = base.pop("out", None)  # in a sweep file, `out` is the sweep's folder, not one run's
    root = Path(out or yaml_out or DEFAULT_ROOT / name)
    cells = expand_grid(base, grid, root, str(path), cases)
    members, axes = cells, grid
    if grid != full_grid:  # one value of a grid key runs; the store still records the whole table
        members = expand_grid(base, full_grid, root, str(path), cases)
        members += [c for c in cells if c.key not in {m.key for m in members}]
        axes = {k: unique_values([*full_grid[k], *(c.params[k] for c in cells)]) for k in grid}
    axes = case_axes(cases, axes) if cases is not None else axes
    check_layout(spec, axes, str(path))
    return Sweep(name=name, source=str(path), spec=spec, grid=axes, out=root, cells=cells, ray=ray, members=members)


def unique_values(values) -> list:
    """The values in first-seen order, each once (values may be unhashable: lists, mappings)."""
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def section_values(raw: Any, section: str, cls: type, path: Path) -> dict | None:
    """The checked keys of an optional mapping section (`sweep:`, `ray:`) of a sweep YAML; None if absent."""
    if raw is None:
        return None
    known = sorted(f.name for f in dataclasses.fields(cls))
    if not isinstance(raw, dict):
        raise PeftlabError(f"{path}: '{section}' must be a mapping ({', '.join(known)})")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PeftlabError(f"{path}: unknown key '{section}.{unknown[0]}'. Known: {', '.join(known)}")
    return raw


def build_spec(raw: Any, path: Path) -> SweepSpec:
    values = section_values(raw, "sweep", SweepSpec, path) or {}
    return SweepSpec(**{k: None if v is None else str(v) for k, v in values.items()})


def build_ray_options(raw: Any, path: Path) -> RayOptions | None:
    values = section_values(raw, "ray", RayOptions, path)
    return None if values is None else RayOptions(**values)


def _takes_collection(tp: Any) -> bool:
    """True for fields whose single value is itself a list or mapping (label_map, target modules, ...)."""
    args = typing.get_args(tp) or (tp,)
    return any((typing.get_origin(a) or a) in (list, dict) for a in args)


def check_scalars(base: dict, source: str) -> None:
    types = {leaf.key: leaf.type for leaf in leaves()}
    for key, value in base.items():
        if isinstance(value, (list, tuple)) and not _takes_collection(types[key]):
            raise PeftlabError(f"{source}: {key} is a list ({value}) but takes a single value; to sweep it, "
                               f"move it under grid: as '{key}: {list(value)}'")


def validate_grid(grid: Any, source: str) -> dict[str, list]:
    """Check the grid's shape: known dotted keys, each a non-empty list of distinct single values."""
    if not grid:
        raise PeftlabError(f"{source}: the grid is empty; give at least one key with a list of values "
                           "(e.g. data.n_train: [50, 150]) or remove 'grid:' for a single run")
    if not isinstance(grid, dict):
        raise PeftlabError(f"{source}: 'grid' must map dotted config keys to lists, e.g. data.n_train: [50, 150]")
    flat = dotted(grid)  # a nested `data: {n_train: [...]}` is accepted too
    types = {leaf.key: leaf.type for leaf in leaves()}
    for key, values in flat.items():
        if key not in types or key in ("out", "adapter"):
            close = [k for k in types if k.endswith("." + key.split(".")[-1])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PeftlabError(f"{source}: unknown grid key '{key}'{hint}; grid keys are dotted config keys "
                               "such as data.n_train, method.virtual_tokens, method.lora_dropout, model.name")
        if not isinstance(values, list):
            raise PeftlabError(f"{source}: grid key {key} must hold a list of values, e.g. {key}: [{values}]")
        if not values:
            raise PeftlabError(f"{source}: grid key {key} has an empty list; give at least one value")
        for v in values:
            if isinstance(v, (list, dict)) and not _takes_collection(types[key]):
                raise PeftlabError(f"{source}: grid key {key} holds {v!r}, a list where a single value is "
                                   f"needed; write the values flat: {key}: [a, b, c]")
        texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(texts)) != len(texts):
            raise PeftlabError(f"{source}: grid key {key} repeats a value ({values}); each value once")
    return flat


def validate_cases(cases: Any, grid: dict[str, list], source: str) -> dict[str, dict]:
    """Check `cases:`: named mappings of known dotted keys to a value or a list of values, none a grid key."""
    if not cases or not isinstance(cases, dict):
        raise PeftlabError(f"{source}: 'cases' must map case names to settings, e.g. cases: {{dora: "
                           "{method.method: lora, method.peft_options: {use_dora: true}}}")
    types = {leaf.key: leaf.type for leaf in leaves()}
    out = {}
    for name, settings in cases.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise PeftlabError(f"{source}: case name {name!r}: use letters, digits, '.', '_', '+' and '-' only")
        if not isinstance(settings, dict) or not settings:
            raise PeftlabError(f"{source}: case {name} must map dotted config keys to values, e.g. "
                               "{method.method: ia3, train.lr: 3.0e-3}")
        flat = dotted(settings)
        clash = sorted(set(flat) & set(grid))
        if clash:
            raise PeftlabError(f"{source}: case {name} sets {clash[0]}, which grid: sweeps for every case; set it "
                               "in the cases or in the grid, not both")
        for key in flat:
            if key not in types or key in ("out", "adapter"):
                raise PeftlabError(f"{source}: case {name}: unknown key '{key}'; case keys are dotted config keys "
                                   "such as method.method, train.lr, method.peft_options")
        axes = _case_split(flat)[1]
        if axes:
            validate_grid(axes, f"{source}: case {name}")
        out[name] = flat
    return out


def _case_split(case: dict) -> tuple[dict, dict[str, list]]:
    """A case's single values and its own axes (the lists of values of single-valued keys)."""
    types = {leaf.key: leaf.type for leaf in leaves()}
    axes = {k: v for k, v in case.items() if isinstance(v, list) and not _takes_collection(types[k])}
    return {k: v for k, v in case.items() if k not in axes}, axes


def case_axes(cases: dict[str, dict], grid: dict[str, list]) -> dict[str, list]:
    """The sweep's axes for the store and the report: `case`, then every case's own axes, then the grid."""
    axes: dict[str, list] = {"case": list(cases)}
    for case in cases.values():
        for key, values in _case_split(case)[1].items():
            axes[key] = unique_values([*axes.get(key, []), *values])
    return {**axes, **grid}


def expand_grid(base: dict, grid: dict[str, list], root: Path, source: str = "sweep",
                cases: dict[str, dict] | None = None) -> list[Cell]:
    """The cartesian product of the grid over the base layer (for each case, over the base and the case);
    the first key varies slowest."""
    layers = [({}, {}, grid)] if cases is None else [
        ({"case": name}, fixed, {**axes, **grid}) for name, (fixed, axes) in
        ((name, _case_split(case)) for name, case in cases.items())]
    cells, seen = [], {}
    for label, fixed, axes in layers:
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            params = dict(zip(keys, combo))
            try:
                config = build_config(base, {**fixed, **params})
            except PeftlabError as exc:
                where = ", ".join(f"{k}={v}" for k, v in {**label, **params}.items()) or "the base config"
                raise PeftlabError(f"{source}: cell {where}: {exc}") from None
            typed = {**label, **{k: _get(config, k) for k in keys}}
            key = cell_key(config)
            if key in seen:
                raise PeftlabError(f"{source}: cells {seen[key]} and {typed} are the same run; remove the duplicate")
            seen[key] = typed
            config.out = str(child_path(root, cell_folder(key, typed)))  # refuses a link out of the sweep
            cells.append(Cell(key=key, params=typed, config=config))
    return cells


def _get(config: RunConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_layout(spec: SweepSpec, grid: dict, source: str) -> None:
    for axis in ("rows", "columns"):
        value = getattr(spec, axis)
        if value is not None and value not in grid and value != "model.name":
            raise PeftlabError(f"{source}: sweep.{axis}={value} is not a grid key ({', '.join(grid) or 'none'})")


def table_axes(spec: SweepSpec, grid_keys: list[str]) -> tuple[str, str | None, list[str]]:
    """(row key, column key or None, other keys) of a sweep's table; seeds are repeats, not axes."""
    settings = [k for k in grid_keys if k not in REPEAT_KEYS]
    rows = spec.rows or ("data.n_train" if "data.n_train" in settings else settings[0] if settings else "model.name")
    rest = [k for k in settings if k != rows]
    columns = spec.columns or (rest[0] if rest else None)
    others = [k for k in rest if k != columns]
    return rows, columns, others
