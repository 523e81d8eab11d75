"""Reports: a results store turned into tables (markdown, CSV), plots (PNG) and one HTML page.

    peftlab report runs/sweeps/results.sqlite --out results/report
    peftlab report lora.sqlite prompt-tuning.sqlite --out results/report   # several stores, one report

    <out>/report.md        tables in the study's shape, the study's numbers beside them, plots linked
    <out>/report.html      the same, self-contained (plots inlined): open it in any browser
    <out>/tables/*.csv     each table as in the markdown; cells.csv: one row per cell with its cost
                           and calibration (nll, ece: 15 bins, brier, auroc; evaluate/calibration_metrics.py);
                           selection-gap.csv: runs that chose their epoch on test, at the validation-chosen epoch too;
                           <table>-choices.csv: per row, the column the validation split prefers (a search's pick);
                           <table>-paired.csv: every run against the table's best, McNemar's exact test
    <out>/plots/*.png      accuracy vs N with 95% bands, heat maps, accuracy vs cost, reliability diagrams
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from peftlab.config import dotted
from peftlab.errors import PeftlabError
from peftlab.experiments.store import ResultsStore
from peftlab.records import atomic_write_text
from peftlab.report.paired_tests import paired_with_best
from peftlab.report.tables import (GAP_HEADER, Table, build_tables, is_val_twin, row_choices, scoring_seconds,
                                   selection_gap, table_grid)

CELL_COLUMNS = ["sweep", "key", "status", "reason", "params", "model", "method", "n_train", "n_test", "seed",
                "accuracy", "ci95_low", "ci95_high", "nll", "ece", "brier", "auroc", "best_epoch", "train_s", "eval_s",
                "train_tokens", "eval_tokens", "peak_memory_mb", "trainable_parameters", "attempts", "out"]


def write_report(store_paths: str | Path | list, out: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write the report of every sweep in the store(s) under `out`; returns the main files' paths."""
    from peftlab.report.pages import write_html, write_markdown

    out = Path(out)
    paths = [store_paths] if isinstance(store_paths, (str, Path)) else list(store_paths)
    tables = []
    for path in paths:
        with ResultsStore(path) as store:
            tables += build_tables(store)
    names = [t.name for t in tables]
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise PeftlabError(f"the stores hold sweeps of the same name ({', '.join(repeated)}); report them "
                           "separately (--out to different folders)")
    store_path = ", ".join(str(p) for p in paths)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for table in tables:
        header, rows = table_grid(table)
        write_csv(out / "tables" / f"{table.name}.csv", header, rows)
    # once, for the CSVs and both pages: per table, the choice per row and the paired tests (None: no section)
    sections = {table.name: (row_choices(table), paired_with_best(table)) for table in tables}
    for name, (choices, paired) in sections.items():
        if choices is not None:
            write_csv(out / "tables" / f"{name}-choices.csv", *choices)
        if paired is not None:
            write_csv(out / "tables" / f"{name}-paired.csv", *paired[:2])
    write_csv(out / "tables" / "cells.csv", CELL_COLUMNS, cell_rows(tables))
    gap = selection_gap(tables)  # once, for the CSV and both pages
    if gap is not None:
        write_csv(out / "tables" / "selection-gap.csv", GAP_HEADER, gap[0])
    figures, cost_plot = {}, None
    if plots:
        from peftlab.report.plots import accuracy_vs_cost, plot_tables

        figures = plot_tables(tables, zero_shot_baselines(tables), out / "plots")
        cost_plot = accuracy_vs_cost(tables, out / "plots" / "accuracy-vs-cost.png")
    return {"markdown": write_markdown(out / "report.md", str(store_path), tables, figures, cost_plot, gap, sections),
            "html": write_html(out / "report.html", str(store_path), tables, figures, cost_plot, gap, sections),
            "tables": out / "tables"}


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def cell_rows(tables: list[Table]) -> list[list]:
    """One row per (sweep, cell), numbers unformatted, for other tools. A validation-chosen twin holds the same
    cells as its table (chosen_on_val): they are listed once, with the test-chosen record."""
    rows = []
    for table in tables:
        if is_val_twin(table):
            continue
        for cell in table.cells:
            r, cfg = cell.record or {}, cell.config or {}
            timings, ci = r.get("timings", {}), r.get("ci95", [None, None])
            rows.append([table.sweep, cell.key, cell.status, cell.reason or "",
                         ";".join(f"{k}={v}" for k, v in (cell.params or {}).items()),
                         cfg.get("model", {}).get("name"), cfg.get("method", {}).get("method"),
                         r.get("n_train", cfg.get("data", {}).get("n_train")), r.get("n"),
                         cfg.get("train", {}).get("seed"), r.get("accuracy"), ci[0], ci[1],
                         r.get("nll"), r.get("ece"), r.get("brier"), r.get("auroc"), r.get("best_epoch"),
                         timings.get("train_s"), scoring_seconds(r), r.get("train_tokens"), r.get("eval_tokens"),
                         r.get("peak_memory_mb"), r.get("trainable_parameters"), cell.attempts, cell.out])
    return rows


# What must match for a zero-shot cell to be a table's baseline: the model, the same test reviews, the same
# prompt and the same decision rule (absent in older records: the defaults of their time).
BASELINE_KEYS = {"model.name": None, "data.source": None, "data.n_test": None, "data.data_seed": 0,
                 "data.labels": "sentiment", "prompt.template": "alpaca", "prompt.instruction": None,
                 "prompt.label_words": None, "prompt.max_input_tokens": None, "prompt.truncation": "head+tail",
                 "eval.score_norm": "sum", "eval.calibration": "none"}


def _setting(config: dict) -> tuple:
    flat = dotted(config)
    return tuple(str(default if flat.get(k) is None else flat[k]) for k, default in BASELINE_KEYS.items())


def zero_shot_baselines(tables: list[Table]) -> dict[str, float]:
    """Zero-shot accuracy % by table name: the finished zero-shot cells (n_train 0, no demonstrations) that
    scored the table's own test reviews with its prompt and decision rule (a k-shot cell, or one on other
    reviews or cut at another length, is not its baseline)."""
    zero: dict[tuple, dict[str, float]] = {}  # setting -> cell key -> accuracy (a cell in two sweeps counts once)
    for table in tables:
        for cell in table.cells:
            cfg = (cell.record or {}).get("config") or cell.config or {}
            if (cell.status == "finished" and cfg.get("data", {}).get("n_train") == 0
                    and not cfg.get("prompt", {}).get("shots")):
                zero.setdefault(_setting(cfg), {})[cell.key] = 100 * cell.record["accuracy"]
    out = {}
    for table in tables:
        trained = next(((c.record or {}).get("config") for c in table.cells if c.status == "finished"), None)
        match = zero.get(_setting(trained)) if trained else None
        if match:
            out[table.name] = sum(match.values()) / len(match)
    return out


__all__ = ["write_report"]
