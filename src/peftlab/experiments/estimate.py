"""What a sweep will cost before it runs (`peftlab sweep --dry-run`): tokens, then time.

tokens = train tokens x epochs + eval tokens x evaluations (one per epoch for training cells,
one for zero-shot). Tokens per example and tokens/s come from the store's most recent finished
cells of the same model when there are some; otherwise tokens per example is the upper bound
(every input cut at max_input_tokens, plus the prompt template) and the speed is a figure measured
once for SmolLM2-135M on the named hardware, scaled by parameter count for other models.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from peftlab.experiments.grid import Cell, Sweep, format_value, short_name
from peftlab.experiments.store import ResultsStore

# Alpaca template, instruction and response marker around the review: 181 tokens per example at
# max_input_tokens=128 for SmolLM2 on IMDB (every review cut), so 53 of them are the prompt.
TEMPLATE_TOKENS = 53
IMDB_SPLIT = 25_000
# (parameters, eval tok/s, train tok/s), bf16, 128-256-token inputs.
REFERENCE_SPEEDS = {
    # SmolLM2-135M, bf16, 128-token inputs, on this project's idle 2-core CPU machine (avx512_bf16), as
    # measured for issue 3. Shared with other jobs (load ~5) it measured 300-320 tok/s scoring and ~50 tok/s
    # training: once the store holds finished cells, their own speed replaces these figures.
    "cpu": [(135e6, 1200.0, 400.0)],
    # One H100: bench/results/gpu-h100-run7-smollm2.json and gpu-h100-run6-llama2-7b.json.
    "cuda": [(135e6, 330_911.0, 33_827.0), (6.74e9, 31_565.0, 11_038.0)],
}
KNOWN_SIZES = {"smollm2": 135e6}


@dataclass
class CellEstimate:
    cell: Cell
    status: str            # new | running (cut off: redone) | failed | finished
    n_train: int
    n_test: int
    train_tokens: float
    eval_tokens: float
    seconds: float
    speed_note: str

    @property
    def tokens(self) -> float:
        return self.train_tokens + self.eval_tokens


def model_parameters(name: str) -> float | None:
    """Parameters of a model named like 'Llama-2-13b-hf' or 'smollm2'; None when the name does not say."""
    if name.lower() in KNOWN_SIZES:
        return KNOWN_SIZES[name.lower()]
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", name.split("/")[-1])
    if not match:
        return None
    return float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6)


def reference_speed(name: str, device: str) -> tuple[float, float, str]:
    """(eval tok/s, train tok/s, where the figure comes from) without any measurement of this model."""
    points = REFERENCE_SPEEDS["cuda" if device.startswith("cuda") else "cpu"]
    params = model_parameters(name)
    if params is None:
        p, ev, tr = points[0]
        return ev, tr, f"speed: model size unknown, SmolLM2's {device} figure assumed"
    p, ev, tr = min(points, key=lambda pt: abs(pt[0] - params) / pt[0])
    scale = p / params
    note = f"speed: reference {device} figure, idle machine" + (" scaled by model size" if scale != 1 else "")
    return ev * scale, tr * scale, note


def measured(store: ResultsStore | None, name: str, max_input_tokens: int) -> dict:
    """Median speeds and tokens per example of the store's 5 most recent finished cells of this model."""
    if store is None:
        return {}
    cells = [c.record for c in store.recent_finished(limit=5, model=name) if c.record]
    out = {}
    ev = [r["eval_tokens_per_s"] for r in cells if r.get("eval_tokens_per_s")]
    tr = [r["train_tokens_per_s"] for r in cells if r.get("train_tokens_per_s")]
    if ev:
        out["eval_speed"] = statistics.median(ev)
    if tr:
        out["train_speed"] = statistics.median(tr)
    same = [r for r in cells if r["config"]["prompt"]["max_input_tokens"] == max_input_tokens]
    per_eval = [r["eval_tokens"] / r["n"] for r in same if r.get("n")]  # one evaluation's tokens
    if per_eval:
        out["eval_per_example"] = statistics.median(per_eval)
    per_train = [r["train_tokens"] / (r["n_train"] * len(r["per_epoch"])) for r in same
                 if r.get("n_train") and r.get("per_epoch")]
    if per_train:
        out["train_per_example"] = statistics.median(per_train)
    return out


def split_sizes(config) -> tuple[int, int]:
    """(train, test) sizes for 'all'; read from the data when it is local, else IMDB's 25,000."""
    from peftlab.data import load_splits
    from peftlab.errors import PeftlabError

    try:
        splits = load_splits(config.data)
        return len(splits.train), len(splits.test)
    except PeftlabError:
        return IMDB_SPLIT, IMDB_SPLIT


def scored_examples(cfg, n_test: int, trains: bool, n_val: int | None = None, evaluated_epochs: int = 0) -> int:
    """Examples a run scores: the validation split (n_val, default data.n_val) after every epoch, and the test
    subset after every epoch (train.select_on=test) or once (val, last; none with train.score_test=false).
    `evaluated_epochs`: epochs a resumed run has already evaluated, whose passes are not counted again."""
    if not trains:
        return n_test
    epochs = cfg.train.epochs - evaluated_epochs
    test_passes = epochs if cfg.train.select_on == "test" else int(cfg.train.score_test)
    return (cfg.data.n_val or 0 if n_val is None else n_val) * epochs + n_test * test_passes


def estimate_sweep(sweep: Sweep, store: ResultsStore | None) -> list[CellEstimate]:
    from peftlab.experiments.runner import with_earlier_keys
    from peftlab.models.loading import device_type

    out, sizes = [], {}
    for cell in with_earlier_keys(sweep.cells, store) if store is not None else sweep.cells:
        cfg = cell.config
        n_train, n_test = cfg.data.n_train, cfg.data.n_test
        if n_train is None or n_test is None:
            data_key = repr(cfg.data)
            sizes.setdefault(data_key, split_sizes(cfg))
            n_train = sizes[data_key][0] if n_train is None else n_train
            n_test = sizes[data_key][1] if n_test is None else n_test
        device = device_type(cfg.model.device)
        seen = measured(store, cfg.model.name, cfg.prompt.max_input_tokens)
        ev, tr, note = reference_speed(cfg.model.name, device)
        if "eval_speed" in seen:
            ev, tr = seen["eval_speed"], seen.get("train_speed", tr)
            note = "speed: measured by the store's recent cells of the model"
        virtual = cfg.method.virtual_tokens if cfg.method.method in ("prompt-tuning", "p-tuning") else 0
        upper = TEMPLATE_TOKENS + cfg.prompt.max_input_tokens + virtual
        epochs = cfg.train.epochs if cell.trains else 0
        train_tokens = n_train * epochs * seen.get("train_per_example", upper)
        eval_tokens = scored_examples(cfg, n_test, cell.trains) * seen.get("eval_per_example", upper)
        status = store.status(cell.key) if store is not None else None
        out.append(CellEstimate(cell=cell, status=status or "new", n_train=n_train, n_test=n_test,
                                train_tokens=train_tokens, eval_tokens=eval_tokens,
                                seconds=train_tokens / tr + eval_tokens / ev, speed_note=note))
    return out


def format_estimates(sweep: Sweep, estimates: list[CellEstimate], store_path) -> str:
    """The dry-run listing: one line per cell, then the total of the cells still to run."""
    keys = list(sweep.grid)
    header = ["#", "cell", "status"] + [short_name(k) for k in keys] + ["train tok", "eval tok", "est. time"]
    rows = []
    for i, est in enumerate(estimates, start=1):
        values = [format_value(est.cell.params[k]) if k in est.cell.params else "-" for k in keys]  # cases differ
        rows.append([str(i), est.cell.key, est.status] + values +
                    [_tokens(est.train_tokens), _tokens(est.eval_tokens), _duration(est.seconds)])
    widths = [max(len(r[j]) for r in rows + [header]) for j in range(len(header))]
    lines = [f"sweep {sweep.name} ({sweep.source}): {len(estimates)} cell{'s' * (len(estimates) != 1)} -> "
             f"{sweep.out}, store {store_path}",
             "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    todo = [e for e in estimates if e.status != "finished"]
    notes = sorted({e.speed_note for e in todo})
    lines.append(f"to run: {len(todo)} cell{'s' * (len(todo) != 1)}, {_tokens(sum(e.tokens for e in todo))} tokens, "
                 f"about {_duration(sum(e.seconds for e in todo))} ({'; '.join(notes) or 'nothing to run'}; "
                 "tokens are an upper bound until the store holds a finished cell of the model)")
    return "\n".join(lines)


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# --- The plan a single run prints before it starts ----------------------------------------------------
# The speeds come from timing the model itself, not from a matrix-multiply probe scaled by a fixed share:
# on AMX machines matrix products are so fast that attention, norms and the backward's bookkeeping are most
# of the time, and a GEMM-based figure was ~3x too optimistic (results/study/README.md, "Weak").
PROBE_TOKENS = 256


def probe_speeds(model, tokens: int, batch_size: int = 1) -> tuple[float, float]:
    """(scoring tok/s, training tok/s) of `model` as it stands (adapter attached), timed on one batch of
    constant ids: a forward pass without gradients, then a forward and backward pass with them.

    Eval mode, so dropout draws nothing from the run's RNG; `torch.autograd.grad`, so no `.grad` is left
    on the trainable parameters. The logits are kept at one position per row, as scoring and training
    keep them at the label's positions only. On a CPU one row is timed (a 7B model's probe stays in
    seconds); on a GPU the run's batch, since a GPU's speed depends on it.
    """
    import time

    import torch

    from peftlab.evaluate.scoring import adapter_autocast

    param = next(model.parameters())
    rows = batch_size if param.device.type == "cuda" else 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()

    def timed(length: int, backward: bool) -> float:
        ids = torch.full((rows, length), 1, dtype=torch.long, device=param.device)
        start = time.perf_counter()
        # The autocast scoring and training run under: fp32 adapters and heads on a bf16 base compute in bf16.
        with torch.set_grad_enabled(backward), adapter_autocast(model, param.device):
            try:
                logits = model(input_ids=ids, logits_to_keep=1).logits
            except TypeError:  # an architecture without logits_to_keep
                logits = model(input_ids=ids).logits[:, -1:]
            if backward and trainable:
                torch.autograd.grad(logits.float().sum(), trainable, allow_unused=True)
        if param.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        timed(8, backward=bool(trainable))  # warm-up: the first call picks kernels
        length = max(8, min(tokens, PROBE_TOKENS))
        scoring = rows * length / timed(length, backward=False)
        training = rows * length / timed(length, backward=True) if trainable else scoring
    finally:
        model.train(was_training)
    return scoring, training


def run_plan(model, train_tokens: int, scored_tokens: int, examples: str, tokens_per_row: int = PROBE_TOKENS,
             batch_size: int = 1, gradient_checkpointing: bool = False, left: bool = False) -> str:
    """One line before a run starts: what it will process and about how long that takes on this machine.
    The line only informs: a probe that fails (an architecture it does not know how to call) leaves the time
    out and says why, and the run goes on."""
    head = (f"plan: {examples}; {_tokens(train_tokens)} training + {_tokens(scored_tokens)} scored tokens"
            f"{' left' if left else ''}")
    try:
        eval_speed, train_speed = probe_speeds(model, tokens_per_row, batch_size)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return f"{head}; time not estimated (the speed probe failed: {type(exc).__name__}: {exc})"
    if gradient_checkpointing:  # the forward runs twice: about 4/3 of the work
        train_speed *= 0.75
    seconds = train_tokens / train_speed + scored_tokens / eval_speed
    return (f"{head}; about {_duration(seconds)} here (timed on the model: ~{train_speed:.0f} tok/s training, "
            f"~{eval_speed:.0f} tok/s scoring)")
