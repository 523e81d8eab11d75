"""Plots as PNG: accuracy against N with 95% bands, heat maps of the grids, accuracy against cost (all cells;
and per named setting of a `cases:` sweep against time per epoch, trainable parameters and peak memory),
reliability diagrams (from the per-bin counts each cell's record keeps; evaluate/calibration_metrics.py).

matplotlib with the Agg backend (no display needed); one figure per file, closed after saving.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.experiments.grid import format_value, short_name
from peftlab.report.confusion import best_record, confusion_heat_map
from peftlab.report.tables import (MARK_MACHINE, MARK_PEAK, Table, elsewhere, is_val_twin, main_machine, process_peak,
                                   row_label, scoring_seconds, seconds_per_epoch)

DPI = 110


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from peftlab.errors import PeftlabError

        raise PeftlabError("plots need matplotlib: pip install 'peftlab[report]' (or --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tables(tables: list[Table], zero_shot: dict, folder: Path) -> dict[str, list[Path]]:
    """Every plot of every table, by table name; `zero_shot` maps table name -> accuracy % (its baseline)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for table in tables:
        paths = []
        if not any(e.records for e in table.entries.values()):
            out[table.name] = paths
            continue
        if table.row_key == "data.n_train" and len(table.rows) > 1:
            paths.append(accuracy_vs_n(table, zero_shot, folder / f"{table.name}-accuracy-vs-n.png"))
        if table.col_key is not None and len(table.cols) > 1:
            paths.append(heat_map(table, folder / f"{table.name}-heat-map.png"))
        elif table.col_key is None:
            paths.append(bars(table, folder / f"{table.name}-accuracy.png"))
        if table.row_key == "case" and sum(bool(costed(e.records)) for e in table.entries.values()) > 1:
            paths.append(settings_vs_cost(table, folder / f"{table.name}-cost.png"))
        if (best := best_record(table)) is not None:
            paths.append(confusion_heat_map(table, best, folder / f"{table.name}-confusion.png"))
        if any(r.get("reliability") for e in table.entries.values() for r in e.records):
            paths.append(reliability_diagram(table, folder / f"{table.name}-reliability.png"))
        out[table.name] = paths
    return out


def accuracy_vs_n(table: Table, zero_shot: dict, path: Path) -> Path:
    """One line per column setting, shaded by its 95% interval; the study's values dashed beside it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.2, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [r for r in table.rows if r is not None]  # 'all' has no place on a numeric axis
    for i, col in enumerate(table.cols):
        colour = colours[i % len(colours)]
        label = "ours" if col is None else f"{short_name(table.col_key)}={format_value(col)}"
        points = [(r, table.entries[(r, col)]) for r in rows if table.entries[(r, col)].records]
        if points:
            xs = [r for r, _ in points]
            ax.plot(xs, [e.accuracy for _, e in points], "o-", color=colour, label=label)
            bands = [e.interval() for _, e in points]
            ax.fill_between(xs, [max(0.0, b[0]) for b in bands], [min(100.0, b[1]) for b in bands], color=colour,
                            alpha=0.15, lw=0)
        study = [(r, table.study_value(r, col)) for r in rows if table.study_value(r, col)]
        if study:
            ax.plot([r for r, _ in study], [v[0] for _, v in study], "s--", color=colour, alpha=0.55, ms=4,
                    label=f"{label} (LLaMA-2 7B, study)")
    if table.name in zero_shot:
        ax.axhline(zero_shot[table.name], color="grey", ls=":", lw=1.2, label="zero-shot")
    ax.set_xscale("log")
    ax.set_xticks(rows, [format_value(r) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("N (training reviews, nested samples)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(_title(table) + "\n(bands: 95% intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low - 2), min(101.0, high + 1))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def heat_map(table: Table, path: Path) -> Path:
    """The grid as colours with the accuracy written in; the study's grid beside it when it matches."""
    import numpy as np

    plt = _pyplot()
    panels = [("ours", lambda r, c: table.entries[(r, c)].accuracy)]
    if table.study:
        panels.append(("LLaMA-2 7B (study)", lambda r, c: (table.study_value(r, c) or (None,))[0]))
    grids = [np.array([[np.nan if f(r, c) is None else f(r, c) for c in table.cols] for r in table.rows], float)
             for _, f in panels]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if any(np.isfinite(g).any() for g in grids) else [50]
    vmin, vmax = float(np.min(finite)), float(np.max(finite))
    if vmax - vmin < 1:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.2, 3.6), squeeze=False)
    for ax, (name, _), grid in zip(axes[0], panels, grids):
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(table.rows)):
            for j in range(len(table.cols)):
                if np.isfinite(grid[i, j]):
                    light = grid[i, j] < (vmin + vmax) / 2
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="white" if light else "black")
        ax.set_xticks(range(len(table.cols)), [format_value(c) for c in table.cols])
        ax.set_yticks(range(len(table.rows)), [row_label(table, r) for r in table.rows])
        ax.set_xlabel(short_name(table.col_key))
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel(short_name(table.row_key))
    fig.subplots_adjust(top=0.82, wspace=0.3)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy %", shrink=0.9)
    fig.suptitle(_title(table), fontsize=10)
    return _save(fig, path, tight=False)


def bars(table: Table, path: Path) -> Path:
    """One bar per row (model) with its 95% interval; the study's value as a second bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(table.rows) + 2), 3.8))
    xs = range(len(table.rows))
    width = 0.38 if table.study else 0.6
    shift = -width / 2 if table.study else 0
    ours = [(x + shift, table.entries[(r, None)]) for x, r in zip(xs, table.rows) if table.entries[(r, None)].records]
    if ours:
        bounds = [e.interval() for _, e in ours]
        errors = [[e.accuracy - b[0] for (_, e), b in zip(ours, bounds)],
                  [min(100.0, b[1]) - e.accuracy for (_, e), b in zip(ours, bounds)]]
        ax.bar([x for x, _ in ours], [e.accuracy for _, e in ours], width, yerr=errors, capsize=3, label="ours")
        for (x, e), b in zip(ours, bounds):
            ax.text(x, min(100.0, b[1]) + 1.5, f"{e.accuracy:.1f}", ha="center", fontsize=8)
    if table.study:
        study = [(x + width / 2, table.study_value(r, None)) for x, r in zip(xs, table.rows)
                 if table.study_value(r, None)]
        ax.bar([x for x, _ in study], [v[0] for _, v in study], width, color="grey", alpha=0.6, label="LLaMA-2 (study)")
        for x, v in study:
            ax.text(x, v[0] + 1.5, f"{v[0]:g}", ha="center", fontsize=8, color="dimgrey")
    ax.set_xticks(list(xs), [row_label(table, r) for r in table.rows], fontsize=8)
    ax.set_ylim(0, 110)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("test accuracy %")
    ax.set_title(_title(table), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def pooled_bins(records: list[dict]) -> dict | None:
    """The reliability bins of several runs (seeds) of one setting, pooled: counts added, means weighted."""
    runs = [r["reliability"] for r in records if r.get("reliability")]
    if not runs:
        return None
    n_bins = runs[0]["n_bins"]
    count = [sum(b["count"][i] for b in runs) for i in range(n_bins)]

    def mean(name, i):
        return sum(b["count"][i] * b[name][i] for b in runs if b["count"][i]) / count[i] if count[i] else None

    return {"n_bins": n_bins, "lower": runs[0]["lower"], "upper": runs[0]["upper"], "count": count,
            "confidence": [mean("confidence", i) for i in range(n_bins)],
            "accuracy": [mean("accuracy", i) for i in range(n_bins)]}


def reliability_diagram(table: Table, path: Path, max_panels: int = 16) -> Path:
    """One panel per setting: accuracy per confidence bin (bars) against the diagonal, counts as shading."""
    plt = _pyplot()
    settings = [(key, pooled_bins(e.records)) for key, e in table.entries.items() if e.records]
    settings = [(key, b) for key, b in settings if b][:max_panels]
    columns = min(4, len(settings))
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.axis("off")
    for ax, ((row, col), bins) in zip(axes.flat, settings):
        width = 1 / bins["n_bins"]
        total = sum(bins["count"]) or 1
        filled = [i for i, c in enumerate(bins["count"]) if c]
        ax.bar([bins["lower"][i] for i in filled], [bins["accuracy"][i] for i in filled], width, align="edge",
               edgecolor="black", lw=0.5,
               color=[(0.12, 0.47, 0.71, min(1.0, 0.25 + 3 * bins["count"][i] / total)) for i in filled])
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ece = sum(bins["count"][i] / total * abs(bins["accuracy"][i] - bins["confidence"][i]) for i in filled)
        name = row_label(table, row) + ("" if col is None else f", {short_name(table.col_key)}={format_value(col)}")
        ax.set_title(f"{name}\nECE {100 * ece:.1f}%", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("confidence (top label)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=8)
    fig.suptitle(f"{_title(table)}: reliability, {settings[0][1]['n_bins']} equal-width bins (darker: more "
                 "examples)", fontsize=9)
    return _save(fig, path)


def accuracy_vs_cost(tables: list[Table], path: Path) -> Path | None:
    """Every finished training cell: accuracy against training seconds and against tokens processed."""
    plt = _pyplot()
    series = []
    for table in tables:
        if is_val_twin(table):
            continue  # the same runs again
        points = [c.record for c in table.cells if c.status == "finished" and c.record.get("train_tokens")]
        if points:
            series.append((table.name, points))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, points in series:
        acc = [100 * r["accuracy"] for r in points]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in points],
               [100 * (r["ci95"][1] - r["accuracy"]) for r in points]]
        seconds = [r["timings"]["train_s"] + (scoring_seconds(r) or 0.0) for r in points]
        tokens = [r["train_tokens"] + r.get("eval_tokens", 0) * r.get("test_evaluations", len(r.get("per_epoch", [1])))
                  for r in points]
        for ax, xs in zip(axes, (seconds, tokens)):
            ax.errorbar(xs, acc, yerr=err, fmt="o", ms=4, capsize=2, alpha=0.8, label=name)
    axes[0].set_xlabel("train + eval seconds per cell")
    axes[1].set_xlabel("tokens processed per cell (train x epochs + test x test passes)")
    axes[0].set_ylabel("test accuracy % (best epoch)")
    for ax in axes:
        ax.set_xscale("log")
        plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy against cost", fontsize=10)
    return _save(fig, path)


COST_AXES = (("train seconds per epoch", "train_s_per_epoch"), ("trainable parameters", "trainable_parameters"),
             ("peak memory MB", "peak_memory_mb"))
MACHINE_AXES = ("train_s_per_epoch", "peak_memory_mb")  # the costs that depend on the machine (and dtype)


def costed(records: list[dict]) -> list[dict]:
    """The records that carry every cost settings_vs_cost plots."""
    return [r for r in records if r.get("trainable_parameters") and r.get("peak_memory_mb")
            and (r.get("timings") or {}).get("train_s")]


def _cost(record: dict, key: str) -> float:
    if key == "train_s_per_epoch":
        return seconds_per_epoch(record["timings"]["train_s"], record)
    return float(record[key])


def cost_points(table: Table) -> list[tuple[str, float, float, float, dict[str, float]]]:
    """(name, accuracy %, 95% low, 95% high, {cost key: mean over the setting's runs}) per named setting."""
    points = []
    main = main_machine(table)
    for row in table.rows:
        for col in table.cols:
            entry = table.entries[(row, col)]
            records = costed(entry.records)
            if not records:
                continue
            low, high = entry.interval()
            name = row_label(table, row) + ("" if col is None else f", {short_name(table.col_key)}={format_value(col)}")
            costs = {key: sum(_cost(r, key) for r in records) / len(records) for _, key in COST_AXES}
            if any(process_peak(r) for r in records):  # tables.PEAK_NOTE: an upper bound, drawn hollow
                costs["process_peak"] = 1.0
            if elsewhere(records, main):  # tables.machine_note: seconds and MB of another machine, drawn square
                costs["elsewhere"] = 1.0
            points.append((name, entry.accuracy, low, high, costs))
    return points


def settings_vs_cost(table: Table, path: Path) -> Path:
    """A comparison of named settings (a `cases:` sweep, e.g. one row per peft method): accuracy with its 95%
    interval against training time per epoch, trainable parameters and peak memory, each point named."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(13, 4.2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points = cost_points(table)
    for i, (name, accuracy, low, high, costs) in enumerate(points):
        for ax, (_, key) in zip(axes, COST_AXES):
            hollow = key == "peak_memory_mb" and "process_peak" in costs
            square = key in MACHINE_AXES and "elsewhere" in costs
            colour = colours[i % len(colours)]
            ax.errorbar([costs[key]], [accuracy], yerr=[[accuracy - low], [high - accuracy]],
                        fmt="s" if square else "o", ms=5, capsize=2, color=colour, mfc="none" if hollow else colour)
            ax.annotate(name + (f" {MARK_PEAK}" if hollow else "") + (f" {MARK_MACHINE}" if square else ""),
                        (costs[key], accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    marked = any("process_peak" in costs for *_, costs in points)
    moved = any("elsewhere" in costs for *_, costs in points)
    for ax, (label, key) in zip(axes, COST_AXES):
        ax.set_xscale("log")
        plain_log_ticks(ax)
        ax.set_xlabel(label + (f"\n(hollow, {MARK_PEAK}: the sweep process's peak, an upper bound)"
                               if key == "peak_memory_mb" and marked else "")
                      + (f"\n(square, {MARK_MACHINE}: measured on another machine)" if key in MACHINE_AXES and moved
                         else ""))
        ax.grid(alpha=0.3)
    on_val = all(r.get("evaluated_on") == "val" for e in table.entries.values() for r in e.records)
    axes[0].set_ylabel(f"{'validation' if on_val else 'test'} accuracy % (95% interval)")
    fig.suptitle(_title(table) + ": accuracy against cost", fontsize=10)
    return _save(fig, path)


def plain_log_ticks(ax) -> None:
    """Ticks at 1, 2 and 5 of each decade written as plain numbers (50, 100, 200k): matplotlib's default
    labels its minor ticks too on a short log axis (3x10^2 4x10^2), and they run into each other."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _title(table: Table) -> str:
    facet = ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in table.facet.items())
    return table.title + (f" ({facet})" if facet else "")


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
