"""Each setting of a table against the table's best, example by example (McNemar's exact test).

The marks († / ‡) compare 95% intervals, which treat two runs as scored on independent samples. Every
cell of a grid is scored on the same test reviews, so the examples only one of two runs gets right decide
(evaluate/paired.py), and they separate differences the intervals cannot: the question a method
comparison asks is which settings are indistinguishable from the best one. The table's best setting, when it
is a single run whose record holds its per-example results (`correct_bits`), is set against every other such
run (runs from before them, and means over seeds, are left out and said so; a best without them gives no
section). With m comparisons in a table, Holm's step-down procedure (Holm 1979) keeps the chance of any false
"supported" at 5 %; the raw p-values are shown beside it.
"""

from __future__ import annotations

from peftlab.evaluate.paired import paired_records
from peftlab.experiments.grid import format_value, short_name
from peftlab.report.tables import Table, is_val_twin, row_label

PAIRED_HEADER = ["setting", "accuracy %", "difference, points", "only the best right", "only this right",
                 "McNemar p", "difference supported (Holm, 5 %)"]
PAIRED_NOTE = ("Against the table's best run, on the same examples: the examples only one of the two gets right "
               "and McNemar's exact test; Holm's correction over the table's comparisons decides \"supported\".")


def holm_supported(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down: the i-th smallest p (i from 0) is supported if it and every smaller one are below
    alpha / (m - i)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    supported = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] >= alpha / (len(p_values) - rank):
            break
        supported[i] = True
    return supported


def setting_name(table: Table, row, col) -> str:
    name = f"{short_name(table.row_key)}={row_label(table, row)}"
    return name + (f", {short_name(table.col_key)}={format_value(col)}" if table.col_key else "")


def paired_with_best(table: Table) -> tuple[list[str], list[list[str]], str] | None:
    """(header, rows, summary) of every single run against the table's best; None when the best is not a single
    run with per-example results, or no other run has them."""
    if is_val_twin(table):
        return None
    runs = {place: entry.records[0] for place, entry in table.entries.items()
            if len(entry.records) == 1 and entry.records[0].get("correct_bits")}
    finished = [place for place, entry in table.entries.items() if entry.records]
    if len(runs) < 2:
        return None
    best = max(finished, key=lambda place: table.entries[place].accuracy)
    if best not in runs:
        return None  # the best is a mean over seeds or a run from before correct_bits: nothing to pair it with
    compared = []
    for place in [(r, c) for r in table.rows for c in table.cols]:
        if place == best or place not in runs:
            continue
        counts = paired_records(runs[best], runs[place])
        if counts is not None:
            compared.append((place, counts))
    if not compared:
        return None
    supported = holm_supported([counts["mcnemar_p"] for _, counts in compared])
    rows = [[setting_name(table, *place), f"{100 * counts['accuracy_b']:.2f}", f"{100 * counts['difference']:+.2f}",
             str(counts["only_a_correct"]), str(counts["only_b_correct"]), f"{counts['mcnemar_p']:.3g}",
             "yes" if ok else "no"] for (place, counts), ok in zip(compared, supported)]
    tied = [row[0] for row, ok in zip(rows, supported) if not ok]
    summary = (f"Best: {setting_name(table, *best)} ({100 * runs[best]['accuracy']:.2f} %). "
               + (f"Not told apart from it: {'; '.join(tied)}" if tied else "Every other run is told apart from it")
               + f" ({len(compared)} comparisons")
    left_out = len(finished) - 1 - len(compared)
    summary += f"; {left_out} settings without per-example results or with several seeds left out)." if left_out \
        else ")."
    return PAIRED_HEADER, rows, summary
