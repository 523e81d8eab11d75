"""Tables in the study's shape: rows N, columns V or d, cells "accuracy% (best epoch)".

One table per sweep (and per combination of any further grid keys). Cells repeated over seeds
show "mean ± std (k seeds)". The study's published numbers stand in columns beside ours where
the sweep reproduces one of its tables.

Significance marks: † after a value means its 95% interval overlaps that of the setting to its
left, ‡ that of the setting above: the difference between the two is not supported by the data.
A single run's interval is the Wilson interval over its test reviews; the mean of k seeds (scored
on the same reviews) gets sqrt(w^2 + (t * sd / sqrt(k))^2), w the mean Wilson half-width. The
study's single runs on 2000 reviews have intervals of about ±1 point, and get the same marks.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

from peftlab.evaluate.metrics import wilson_interval
from peftlab.experiments.grid import SweepSpec, format_value, short_name, table_axes, unique_values
from peftlab.experiments.store import ResultsStore, StoredCell, StoredSweep
from peftlab.records import PEAK_SCOPE_CELL
from peftlab.report.study import STUDY, StudyTable, guess_study_table, study_model_label

# Two-sided 97.5% quantiles of Student's t for k - 1 = 1..9 degrees of freedom (then ~normal).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]
MARK_LEFT, MARK_UP = "†", "‡"
MARK_PEAK = "§"
MARK_MACHINE = "¶"  # a cost measured on another machine than most of the table's (machine_note)
PEAK_NOTE = (f"{MARK_PEAK} peak MB: recorded before peftlab counted each cell's peak on its own (repro.reset_peak_memory): "
             "the sweep process's peak so far, or since the cell began with what earlier cells had freed still "
             "resident; an upper bound on the cell's own peak. `bench/method_memory.py` measures each method alone "
             "in a fresh process.")
LEGEND = (f"{MARK_LEFT}: the 95% interval overlaps the setting to the left; {MARK_UP}: it overlaps the setting "
          "above; the difference from that neighbour is not supported by the data.")


@dataclass
class Entry:
    """One setting of a table: its finished runs (one per seed) and its unfinished ones."""

    records: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unfinished: int = 0
    interrupted: int = 0  # running cells stopped by a signal (SIGTERM), to be resumed
    pending: int = 0     # cells of the grid that no run has started

    @property
    def accuracy(self) -> float | None:
        return 100 * statistics.mean(r["accuracy"] for r in self.records) if self.records else None

    @property
    def std(self) -> float:
        return 100 * statistics.stdev(r["accuracy"] for r in self.records) if len(self.records) > 1 else 0.0

    @property
    def best_epochs(self) -> list[int]:
        return [r["best_epoch"] for r in self.records if "best_epoch" in r]

    def interval(self) -> tuple[float, float] | None:
        """One run: its own Wilson interval. Several seeds: the mean half-width widened by their spread."""
        if not self.records:
            return None
        if len(self.records) == 1:
            low, high = self.records[0]["ci95"]
            return 100 * low, 100 * high
        half = statistics.mean(100 * (r["ci95"][1] - r["ci95"][0]) / 2 for r in self.records)
        k = len(self.records)
        if k > 1:
            t = T_975[k - 2] if k - 2 < len(T_975) else 1.96
            half = math.sqrt(half ** 2 + (t * self.std / math.sqrt(k)) ** 2)
        return self.accuracy - half, self.accuracy + half

    def text(self) -> str:
        if not self.records:
            return ("failed" if self.failed else "running" if self.unfinished else "interrupted" if self.interrupted
                    else "not run" if self.pending else "—")
        if len(self.records) == 1:
            epochs = self.best_epochs
            out = f"{self.accuracy:.2f}" + (f" ({epochs[0]})" if epochs else "")
        else:
            out = f"{self.accuracy:.2f} ± {self.std:.2f} ({len(self.records)} seeds)"
        return out + (f" [{len(self.failed)} failed]" if self.failed else "")


@dataclass
class Table:
    sweep: str
    title: str
    command: str | None
    row_key: str
    col_key: str | None
    facet: dict                       # values of further grid keys this table holds fixed
    rows: list
    cols: list                        # [None] for a one-column table
    entries: dict                     # (row, col) -> Entry
    cells: list[StoredCell]           # the cells behind it, for the cost table
    study: StudyTable | None = None
    marks: dict = field(default_factory=dict)
    study_marks: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        suffix = "-".join(f"{short_name(k)}{format_value(v)}" for k, v in self.facet.items())
        return f"{self.sweep}-{suffix}" if suffix else self.sweep

    def study_value(self, row, col) -> tuple[float, int | None] | None:
        return self.study.values.get((row, col)) if self.study else None

    def study_interval(self, row, col) -> tuple[float, float] | None:
        value = self.study_value(row, col)
        if value is None:
            return None
        n = self.study.n_test
        low, high = wilson_interval(round(value[0] / 100 * n), n)
        return 100 * low, 100 * high


def value_of(cell: StoredCell, key: str):
    """A cell's value of a dotted key: its grid value, else its resolved config's."""
    if cell.params and key in cell.params:
        return cell.params[key]
    node = cell.config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def build_tables(store: ResultsStore) -> list[Table]:
    """The tables of every sweep in the store, in the order the sweeps were last run."""
    tables = []
    for sweep in store.sweeps():
        cells = store.cells(sweep.name)
        if cells:
            tables += sweep_tables(sweep, cells)
    return tables


def sweep_tables(sweep: StoredSweep, cells: list[StoredCell]) -> list[Table]:
    spec = SweepSpec(**sweep.spec)
    row_key, col_key, others = table_axes(spec, list(sweep.grid))
    known = next((c for c in cells if c.config), None)
    method = value_of(known, "method.method") if known else None
    n_train = value_of(known, "data.n_train") if known else None
    study_name = spec.study or guess_study_table(method, n_train, row_key, col_key)
    facets: dict[tuple, list[StoredCell]] = {}
    for cell in cells:
        if cell.status == "pending" and any(k not in cell.params for k in [row_key, col_key, *others] if k):
            continue  # never started, and its place in the table is not in its grid values
        facets.setdefault(tuple(value_of(cell, k) for k in others), []).append(cell)
    tables = []
    for facet_values, group in facets.items():
        rows = axis_values(sweep, row_key, group)
        cols = axis_values(sweep, col_key, group) if col_key else [None]
        entries = {(r, c): Entry() for r in rows for c in cols}
        for cell in group:
            entry = entries[(value_of(cell, row_key), value_of(cell, col_key) if col_key else None)]
            if cell.status == "finished":
                entry.records.append(cell.record)
            elif cell.status == "failed":
                entry.failed.append(cell.reason or "")
            elif cell.status == "pending":
                entry.pending += 1
            elif (cell.reason or "").startswith("interrupted"):
                entry.interrupted += 1
            else:
                entry.unfinished += 1
        table = Table(sweep=sweep.name, title=spec.title or sweep.name, command=sweep.command, row_key=row_key,
                      col_key=col_key, facet=dict(zip(others, facet_values)), rows=rows, cols=cols,
                      entries=entries, cells=group, study=STUDY.get(study_name) if study_name else None)
        if table.study and col_key and not any((r, c) in table.study.values for r in rows for c in cols):
            table.study = None  # the grid shares no setting with the study's: nothing to set beside it
        if table.study and table.col_key is None:  # model rows: the study's models join the table
            table.rows += [r for (r, _) in table.study.values if r not in table.rows]
            table.entries.update({(r, None): Entry() for r in table.rows if (r, None) not in table.entries})
        table.marks = overlap_marks(table.rows, table.cols, lambda r, c: table.entries[(r, c)].interval())
        if table.study:
            table.study_marks = overlap_marks(table.rows, table.cols, table.study_interval)
        tables.append(table)
        tables += [t for t in [chosen_on_val(table)] if t is not None]
    return tables


def axis_values(sweep: StoredSweep, key: str, cells: list[StoredCell]) -> list:
    """An axis's values in the order of the sweep's cells (the YAML's order), except where `cases:` gave the
    axis several lists (each method its learning rates): their union, in cell order, interleaves, so numbers
    are sorted."""
    values = unique_values(value_of(c, key) for c in cells)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if "case" in sweep.grid and key != "case" and numbers else values


def chosen_on_val(table: Table) -> Table | None:
    """The same cells at the epoch their validation split chooses, for runs that chose on test and also
    scored a validation split every epoch (metrics "selected_on_val"): the selection gap, cell by cell."""
    if not any(r.get("selected_on_val") for e in table.entries.values() for r in e.records):
        return None
    entries = {}
    for place, entry in table.entries.items():
        # correct_bits (the paired tests') are the test-chosen epoch's: the twin has no per-example record
        records = [dict(r, accuracy=r["selected_on_val"]["accuracy"], ci95=r["selected_on_val"]["ci95"],
                        best_epoch=r["selected_on_val"]["epoch"], selected_on="val", correct_bits=None)
                   for r in entry.records if r.get("selected_on_val")]
        entries[place] = Entry(records=records, failed=entry.failed, unfinished=entry.unfinished,
                               interrupted=entry.interrupted, pending=entry.pending + len(entry.records) - len(records))
    twin = Table(sweep=table.sweep, title=table.title + ", epoch chosen on the validation split",
                 command=table.command, row_key=table.row_key, col_key=table.col_key,
                 facet={**table.facet, "selected_on": "val"}, rows=table.rows, cols=table.cols, entries=entries,
                 cells=table.cells, study=table.study, study_marks=table.study_marks)
    twin.marks = overlap_marks(twin.rows, twin.cols, lambda r, c: twin.entries[(r, c)].interval())
    return twin


def is_val_twin(table: Table) -> bool:
    """Whether a table is chosen_on_val's twin of another: the same runs, read at the validation-chosen epoch."""
    return table.facet.get("selected_on") == "val"


GAP_HEADER = ["table", "setting", "seed", "test % by epoch", "validation % by epoch", "chosen on test % (k)",
              "chosen on validation % (k)", "gap, points"]


def selection_gap(tables: list[Table]) -> tuple[list[list[str]], str] | None:
    """The selection gap run by run (issue 12): every finished run that chose its epoch on the test subset
    and scored a validation split after every epoch, its test accuracy at the epoch the test subset chose
    against at the epoch the validation split chose, and a one-line summary. The gap is never negative: the
    test-chosen epoch is the run's best test accuracy. None when no run has both."""
    runs = []
    for table in tables:
        if is_val_twin(table):
            continue  # the same runs again
        for cell in table.cells:
            r = cell.record or {}
            on_val = r.get("selected_on_val")
            if cell.status != "finished" or not on_val or r.get("selected_on", "test") != "test":
                continue
            setting = ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in (cell.params or {}).items()
                                if k != "train.seed")
            gap = 100 * (r["accuracy"] - on_val["accuracy"])
            runs.append((table.sweep, setting or "single run", value_of(cell, "train.seed"), r, on_val, gap))
    if not runs:
        return None

    def by_epoch(r: dict, key: str) -> str:
        return " / ".join(f"{100 * e[key]:.2f}" if e.get(key) is not None else "—" for e in r.get("per_epoch") or [])

    rows = [[sweep, setting, format_value(seed), by_epoch(r, "accuracy"), by_epoch(r, "val_accuracy"),
             f"{100 * r['accuracy']:.2f} ({r.get('best_epoch', '?')})",
             f"{100 * on_val['accuracy']:.2f} ({on_val['epoch']})", f"{gap:.2f}"]
            for sweep, setting, seed, r, on_val, gap in runs]
    same = sum(r.get("best_epoch") == on_val["epoch"] for _, _, _, r, on_val, _ in runs)
    largest = max(runs, key=lambda run: run[5])
    summary = f"{len(runs)} runs: the validation split chose the test subset's epoch in {same}; the gap is "
    summary += (f"{statistics.mean(run[5] for run in runs):.2f} points on average, at most {largest[5]:.2f} "
                f"({largest[0]}, {largest[1]})" if largest[5] > 0 else "0 in every run")
    return rows, summary


CHOICE_HEADER = ["row", "chosen", "validation %", "validation NLL", "settings finished", "note"]


def validation_score(record: dict) -> tuple[float, float] | None:
    """(accuracy, NLL) of a run on its validation split at the epoch it chose; None when it scored none, or
    when the test subset chose that epoch (the validation figure would then carry the test's choice)."""
    if "best_epoch" in record and record.get("selected_on", "test") == "test":
        return None
    val = record.get("val") or (record if record.get("evaluated_on") == "val" else None)
    if not val or val.get("accuracy") is None:
        return None
    return val["accuracy"], val.get("nll", math.inf)


def row_choices(table: Table) -> tuple[list[str], list[list[str]]] | None:
    """Per row, the column its validation split prefers (the learning rate a search picks for each method):
    the highest mean validation accuracy over seeds, ties to the lower validation NLL. The test subset is
    never read. A choice at either end of the values the row searched is flagged, as the best may lie
    beyond it; one made before every setting of the row finished is flagged as provisional. None for a
    table with one column or runs without a validation split."""
    if table.col_key is None or len(table.cols) < 2 or is_val_twin(table):
        return None
    lines = []
    for r in table.rows:
        searched = [c for c in table.cols if _has_cells(table.entries[(r, c)])]
        if not searched:
            continue
        scored = {}
        for c in searched:
            scores = [validation_score(rec) for rec in table.entries[(r, c)].records]
            if scores and all(s is not None for s in scores):
                scored[c] = (statistics.mean(s[0] for s in scores), statistics.mean(s[1] for s in scores))
        if not scored:
            lines.append([row_label(table, r), "—", "", "", f"0 of {len(searched)}", "nothing finished yet"])
            continue
        best = max(scored, key=lambda c: (scored[c][0], -scored[c][1]))
        notes = []
        numbers = [c for c in searched if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if len(numbers) == len(searched) >= 2 and best in (min(numbers), max(numbers)):
            notes.append(f"at the {'lower' if best == min(numbers) else 'upper'} end of the values searched: "
                         "the best may lie beyond")
        if len(scored) < len(searched):
            notes.append("provisional: not every setting has finished")
        accuracy, nll = scored[best]
        lines.append([row_label(table, r), f"{short_name(table.col_key)}={format_value(best)}",
                      f"{100 * accuracy:.2f}", "" if math.isinf(nll) else f"{nll:.4f}",
                      f"{len(scored)} of {len(searched)}", "; ".join(notes)])
    if not lines or all(line[1] == "—" for line in lines):
        return None
    return [short_name(table.row_key), *CHOICE_HEADER[1:]], lines


def _has_cells(entry: Entry) -> bool:
    return bool(entry.records or entry.failed or entry.unfinished or entry.interrupted or entry.pending)


def overlap_marks(rows: list, cols: list, interval) -> dict:
    """(row, col) -> marks for intervals that overlap the left or upper neighbour's."""
    def overlaps(a, b):
        return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]

    marks = {}
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            own = interval(r, c)
            mark = ""
            if j > 0 and overlaps(own, interval(r, cols[j - 1])):
                mark += MARK_LEFT
            if i > 0 and overlaps(own, interval(rows[i - 1], c)):
                mark += MARK_UP
            marks[(r, c)] = mark
    return marks


# How the reported epoch was chosen (metrics.json "selected_on"); runs made before train.select_on
# existed chose it on the test subset.
PROTOCOL_NOTES = {"test": "epoch selected on test: optimistic (the test subset chose it, as in the study)",
                  "val": "epoch selected on the validation split; the test subset scored once",
                  "last": "the last epoch (no selection); the test subset scored once"}


def protocol_note(table: Table) -> str | None:
    """Which protocol chose the epochs of a table's cells, in words; None for zero-shot tables."""
    protocols = unique_values(r.get("selected_on", "test") for e in table.entries.values() for r in e.records
                        if "best_epoch" in r)
    if not protocols:
        return None
    note = "; ".join(PROTOCOL_NOTES[p] for p in protocols)
    if any(r.get("evaluated_on") == "val" for e in table.entries.values() for r in e.records):
        note += ". Accuracies are on the validation split (the test subset was not scored)"
    return "Protocol: " + note + "."


def row_label(table: Table, value) -> str:
    if table.row_key == "model.name" and isinstance(value, str) and study_model_label(value) != value:
        return study_model_label(value)
    return format_value(value)


def table_grid(table: Table) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of text cells: ours beside the study's, as markdown, CSV and HTML show them; a comparison
    of cases gets each case's interval and cost beside its accuracy."""
    head_row = short_name(table.row_key)
    header = [head_row]
    for c in table.cols:
        name = "accuracy %" if c is None else f"{short_name(table.col_key)}={format_value(c)}"
        header.append(name)
        if table.study:
            header.append(f"{name} (study)" if c is not None else "study %")
    comparison = is_comparison(table)
    if comparison:
        header += COMPARISON_HEADER
        main = main_machine(table)
    lines = []
    for r in table.rows:
        line = [row_label(table, r)]
        for c in table.cols:
            entry = table.entries[(r, c)]
            line.append(entry.text() + table.marks.get((r, c), ""))
            if table.study:
                value = table.study_value(r, c)
                text = "" if value is None else f"{value[0]:g}" + (f" ({value[1]})" if value[1] else "")
                line.append(text + (table.study_marks.get((r, c), "") if text else ""))
        if comparison:
            line += comparison_values(table.entries[(r, None)], main)
        lines.append(line)
    return header, lines


# A table of named cases and no column (configs/sweeps/smollm2-methods.yaml: one setting per peft method) is a
# comparison of methods: beside each accuracy, its interval and what the method costs (issue 16, item 2).
COMPARISON_HEADER = ["95% interval", "lr", "trainable params", "% of the model", "train s/epoch", "peak MB"]


def is_comparison(table: Table) -> bool:
    return table.row_key == "case" and table.cols == [None]


def comparison_values(entry: Entry, main_machine: str | None = None) -> list[str]:
    """The comparison's columns for one case: means over its finished runs (seeds), blank where none has; time
    and memory marked where a run of the case ran elsewhere than the table's `main_machine`."""
    if not entry.records:
        return [""] * len(COMPARISON_HEADER)

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    records = entry.records
    low, high = entry.interval()
    trainable = mean(r.get("trainable_parameters") for r in records)
    share = mean(100 * r["trainable_parameters"] / r["total_parameters"] for r in records
                 if r.get("trainable_parameters") is not None and r.get("total_parameters"))
    lrs = sorted({r["lr"] for r in records if r.get("lr") is not None})
    mark = MARK_MACHINE if elsewhere(records, main_machine) else ""
    seconds = _num(mean(seconds_per_epoch(r.get("timings", {}).get("train_s"), r) for r in records))
    peak = peak_text(records)
    return [f"{low:.1f}-{high:.1f}", ", ".join(format_value(lr) for lr in lrs), _num(trainable, 0),
            "" if share is None else f"{share:.3g}", seconds + (mark if seconds else ""), peak + (mark if peak else "")]


def process_peak(record: dict) -> bool:
    """A sweep cell's peak_memory_mb that counts from the sweep process's start, not the cell's (repro.py)."""
    return ("cell" in record and record.get("peak_memory_mb") is not None
            and record.get("peak_memory_scope") != PEAK_SCOPE_CELL)


def peak_text(records: list[dict]) -> str:
    """Mean peak memory of the records, marked where any of them is a process's peak (PEAK_NOTE)."""
    values = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None]
    if not values:
        return ""
    return _num(statistics.mean(values), 0) + (MARK_PEAK if any(process_peak(r) for r in records) else "")


def peak_note(table: Table) -> str | None:
    """PEAK_NOTE where the table shows a process's peak for any finished cell."""
    marked = any(process_peak(c.record or {}) for c in table.cells if c.status == "finished")
    return PEAK_NOTE if marked else None


def machine_label(record: dict) -> str:
    """The machine a run's record names: its GPUs, else its processor (with family/model where recorded) and
    torch threads; and the weights' dtype where recorded (bf16 runs ~2x fp32 on an AMX Xeon and tens of times
    slower on a CPU without bf16 units, so a dtype is part of what a time was measured on)."""
    hw = record.get("hardware") or {}
    dtype = (record.get("model") or {}).get("dtype")
    if hw.get("gpus"):
        return ", ".join(hw["gpus"]) + (f" ({dtype})" if dtype else "")
    family_model = f" family/model {hw['cpu_family_model']}" if hw.get("cpu_family_model") else ""
    return (f"{hw.get('processor', '?')}{family_model} ({hw.get('torch_threads', '?')} threads"
            + (f", {dtype})" if dtype else ")"))


def main_machine(table: Table) -> str | None:
    """The machine most of the table's finished runs name (machine_label), or None when they all name one:
    then every time and memory figure of the table compares with every other."""
    counts = Counter(machine_label(c.record or {}) for c in table.cells if c.status == "finished" and c.record)
    return counts.most_common(1)[0][0] if len(counts) > 1 else None


def elsewhere(records: list[dict], main: str | None) -> bool:
    """Any of `records` ran on another machine than the table's main one (MARK_MACHINE)."""
    return main is not None and any(machine_label(r) != main for r in records)


def machine_note(table: Table) -> str | None:
    """The note under a comparison whose runs were not all timed on one machine (MARK_MACHINE), naming them."""
    main = main_machine(table) if is_comparison(table) else None  # other tables show no time or memory
    if main is None:
        return None
    others = sorted({machine_label(c.record) for c in table.cells if c.status == "finished" and c.record} - {main})
    return (f"{MARK_MACHINE} time and memory measured on {'; '.join(others)}; the other rows' on {main}. Seconds "
            "and MB compare only between runs of one machine and dtype (accuracy compares across them).")


def scoring_seconds(record: dict) -> float | None:
    """A run's scoring seconds, the final test pass included. Training records before `final_test_s` joined
    their timings counted only the epochs' passes in eval_s: where such a record was chosen on validation and
    then scored on test, its top-level eval_seconds is that final pass, added back here."""
    t = record.get("timings") or {}
    if t.get("eval_s") is None:
        return None
    missing = ("final_test_s" not in t and "per_epoch" in record and record.get("selected_on") not in (None, "test")
               and record.get("evaluated_on") == "test")
    return t["eval_s"] + (record.get("eval_seconds") or 0.0 if missing else 0.0)


def compute_summary(table: Table) -> str | None:
    """What the table's finished runs cost, per machine: "how long each grid took" (issue 16) from the records
    alone. Seconds are the runs' own training and scoring time (a resumed run's parts added up), not wall time
    between them; machines are named as the records name them (processor and torch threads, or GPUs)."""
    by_machine: dict[str, list[float]] = {}
    for cell in table.cells:
        r = cell.record or {}
        t = r.get("timings") or {}
        if cell.status != "finished" or not t:
            continue
        totals = by_machine.setdefault(machine_label(r), [0, 0.0, 0.0])
        totals[0] += 1
        totals[1] += t.get("train_s") or 0.0
        totals[2] += scoring_seconds(r) or 0.0
    if not by_machine:
        return None
    parts = [f"{n} run{'s' * (n != 1)}, {(train + score) / 3600:.1f} h (training {train / 3600:.1f} h, scoring "
             f"{score / 3600:.1f} h) on {machine}" for machine, (n, train, score) in by_machine.items()]
    return "Compute: " + "; ".join(parts)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


COST_HEADER = ["cell", "setting", "status", "accuracy %", "best epoch", "selected on", "at val-chosen epoch %",
               "train s", "train s/epoch", "eval s", "train tokens",
               "eval tokens", "peak MB", "trainable params", "attempts", "machine"]


def cost_rows(table: Table) -> list[list[str]]:
    """One line per cell: what it cost (time, tokens, memory, parameters) and how it ended."""
    out = []
    for cell in table.cells:
        r = cell.record or {}
        t = r.get("timings", {})
        setting = ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in (cell.params or {}).items())
        status = cell.status + (f": {cell.reason}" if cell.reason else "")
        out.append([cell.key, setting or "single run", status,
                    f"{100 * r['accuracy']:.2f}" if "accuracy" in r else "", str(r.get("best_epoch", "")),
                    (r.get("selected_on", "test") if "best_epoch" in r else ""),
                    (f"{100 * r['selected_on_val']['accuracy']:.2f} ({r['selected_on_val']['epoch']})"
                     if r.get("selected_on_val") else ""),
                    _num(t.get("train_s")), _num(seconds_per_epoch(t.get("train_s"), r)), _num(scoring_seconds(r)),
                    _num(r.get("train_tokens"), 0),
                    _num(r.get("eval_tokens"), 0), peak_text([r]),
                    _num(r.get("trainable_parameters"), 0), str(cell.attempts), machine_label(r) if r else ""])
    return out


def seconds_per_epoch(seconds, record: dict):
    """Training seconds per epoch: the method comparison's time axis (epochs run, else the config's)."""
    epochs = len(record.get("per_epoch") or []) or (record.get("config") or {}).get("train", {}).get("epochs")
    return seconds / epochs if seconds is not None and epochs else None


def _num(value, digits: int = 1) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"

