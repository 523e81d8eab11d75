"""The report's two pages: markdown (plots linked) and one self-contained HTML file (plots inlined).

Both hold the same sections: what the store holds and where it ran, then per sweep its command,
its table in the study's shape (ours beside the study's), its plots, its failures and its cost.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path

from peftlab.records import atomic_write_text
from peftlab.report.confusion import best_record, confusion_markdown, decision_settings, describe_cell
from peftlab.report.paired_tests import PAIRED_NOTE
from peftlab.report.study import PREVIOUS_BEST
from peftlab.report.tables import (COST_HEADER, GAP_HEADER, LEGEND, Table, compute_summary, cost_rows, machine_label,
                                   machine_note, markdown_table, peak_note, protocol_note, table_grid)

STUDY_NOTE = ("Study columns: the published LLaMA-2 numbers (shared/seed/study.txt; N x V and N x d on 2000 test "
              f"reviews, zero-shot and maximize on all 25,000); the previous IMDB best they cite is {PREVIOUS_BEST} %.")


def provenance(tables: list[Table]) -> dict[str, list[str]]:
    """The distinct git commits, hardware and package versions of the finished cells."""
    out: dict[str, set] = {"git commits": set(), "hardware": set(), "versions": set()}
    for table in tables:
        for cell in table.cells:
            r = cell.record or {}
            if not r:
                continue
            commit = str(r.get("git_commit"))  # 12 hex digits name a commit; the whole hash crowds the line
            out["git commits"].add(commit[:12] + ("-dirty" if commit.endswith("-dirty") else ""))
            out["hardware"].add(machine_label(r))
            v = r.get("versions", {})
            out["versions"].add(" ".join(f"{k} {v[k]}" for k in ("peftlab", "torch", "transformers", "peft") if k in v))
    return {k: sorted(v) for k, v in out.items()}


def counts(tables: list[Table]) -> str:
    statuses: dict[str, int] = {}
    seen = set()
    for table in tables:
        for cell in table.cells:
            if cell.key not in seen:
                seen.add(cell.key)
                statuses[cell.status] = statuses.get(cell.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no cells"


def failures(table: Table) -> list[str]:
    return [f"{c.key} ({', '.join(f'{k}={v}' for k, v in (c.params or {}).items())}): {c.reason}"
            for c in table.cells if c.status == "failed"]


def write_markdown(path: Path, store_path: str, tables: list[Table], plots: dict[str, list[Path]],
                   cost_plot: Path | None, gap: tuple[list[list[str]], str] | None = None,
                   sections: dict[str, tuple] | None = None) -> Path:
    lines = ["# peftlab results", "",
             f"Store `{store_path}`, report written {datetime.now():%Y-%m-%d %H:%M}. Cells: {counts(tables)}.", ""]
    for name, values in provenance(tables).items():
        lines.append(f"- {name}: {'; '.join(values) or '—'}")
    lines += ["", f"Tables: accuracy % (best epoch k). {LEGEND}", ""]
    for table in tables:
        lines += [f"## {_heading(table)}", ""]
        if protocol_note(table):
            lines += [f"*{protocol_note(table)}*", ""]
        if table.command:
            lines += [f"`{table.command}`", ""]
        header, rows = table_grid(table)
        lines += [markdown_table(header, rows), "", f"Scored with {decision_settings(table)}.", ""]
        for note in (peak_note(table), machine_note(table)):
            if note:
                lines += [note, ""]
        choices, paired = (sections or {}).get(table.name, (None, None))  # report.write_report's
        if choices is not None:
            lines += [CHOICE_NOTE, "", markdown_table(*choices), ""]
        if paired is not None:
            lines += [PAIRED_NOTE, "", markdown_table(*paired[:2]), "", paired[2], ""]
        if (best := best_record(table)) is not None:
            lines += [f"Confusion matrix of the best cell ({describe_cell(best)}):", "", *confusion_markdown(best), ""]
        if table.study:
            lines += [STUDY_NOTE, ""]
        lines += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots.get(table.name, [])]
        lines += [""] + [f"- failed: {f}" for f in failures(table)]
        if compute := compute_summary(table):
            lines += ["", compute + "."]
        lines += ["", "Cost per cell:", "", markdown_table(COST_HEADER, cost_rows(table)), ""]
    if gap is not None:  # tables.selection_gap: (rows, summary)
        lines += ["## Selection gap: the epoch chosen on test against on validation", "", GAP_NOTE, "",
                  markdown_table(GAP_HEADER, gap[0]), "", gap[1] + ".", ""]
    if cost_plot is not None:
        link = cost_plot.relative_to(path.parent).as_posix()
        lines += ["## Accuracy against cost", "", f"![accuracy vs cost]({link})", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


CHOICE_NOTE = ("The choice per row on the validation split (the test subset is not read): the highest validation "
               "accuracy, ties to the lower validation NLL.")


GAP_NOTE = ("Runs that chose their epoch on the test subset (the study's protocol) and scored the validation "
            "split after every epoch: the test accuracy at each choice, and k the epoch chosen. The gap is what "
            "choosing on test adds to the reported figure (it cannot be negative).")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem} h2{margin-top:2.5rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
td.study,th.study{background:#f6f6fb;color:#555;font-style:italic}
code{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px;font-size:.88rem}
.note{color:#555;font-size:.9rem} .plots img{max-width:100%;margin:.5rem 1rem .5rem 0;border:1px solid #eee}
details{margin:.6rem 0} .failed{color:#a00} .cost td,.cost th{font-size:.8rem}
"""


def html_table(header: list[str], rows: list[list[str]], study_columns: set[int] = frozenset(),
               cls: str = "") -> str:
    def cell(tag, j, value):
        attr = ' class="study"' if j in study_columns else ""
        return f"<{tag}{attr}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", j, h) for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", j, v) for j, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_html(path: Path, store_path: str, tables: list[Table], plots: dict[str, list[Path]],
               cost_plot: Path | None, gap: tuple[list[list[str]], str] | None = None,
               sections: dict[str, tuple] | None = None) -> Path:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>peftlab results: {html.escape(Path(store_path).name)}</title><style>{CSS}</style></head><body>",
             "<h1>peftlab results</h1>",
             f'<p class="note">Store <code>{html.escape(store_path)}</code>, report written '
             f"{datetime.now():%Y-%m-%d %H:%M}. Cells: {html.escape(counts(tables))}.</p><ul class=\"note\">"]
    for name, values in provenance(tables).items():
        parts.append(f"<li>{html.escape(name)}: {html.escape('; '.join(values) or '—')}</li>")
    parts.append(f'</ul><p class="note">Tables: accuracy % (best epoch k). {html.escape(LEGEND)}</p>')
    if tables:
        parts.append("<p>" + " · ".join(f'<a href="#{html.escape(t.name)}">{html.escape(_heading(t))}</a>'
                                         for t in tables) + "</p>")
    for table in tables:
        parts.append(f'<h2 id="{html.escape(table.name)}">{html.escape(_heading(table))}</h2>')
        if protocol_note(table):
            parts.append(f'<p class="note"><em>{html.escape(protocol_note(table))}</em></p>')
        if table.command:
            parts.append(f"<p><code>{html.escape(table.command)}</code></p>")
        header, rows = table_grid(table)
        study_cols = {j for j, h in enumerate(header) if "study" in h}
        parts.append(html_table(header, rows, study_cols))
        parts.append(f'<p class="note">Scored with {html.escape(decision_settings(table))}.</p>')
        for note in (peak_note(table), machine_note(table)):
            if note:
                parts.append(f'<p class="note">{html.escape(note)}</p>')
        choices, paired = (sections or {}).get(table.name, (None, None))
        if choices is not None:
            parts.append(f'<p class="note">{html.escape(CHOICE_NOTE)}</p>' + html_table(*choices))
        if paired is not None:
            parts.append(f'<p class="note">{html.escape(PAIRED_NOTE)}</p>' + html_table(*paired[:2]) +
                         f'<p class="note">{html.escape(paired[2])}</p>')
        if (best := best_record(table)) is not None:
            labels, matrix = best["confusion"]["labels"], best["confusion"]["matrix"]
            parts.append(f'<p class="note">Confusion matrix of the best cell ({html.escape(describe_cell(best))}):</p>'
                         + html_table(["gold \\ predicted", *labels], [[lab, *row] for lab, row in zip(labels, matrix)]))
        if table.study:
            parts.append(f'<p class="note">{html.escape(STUDY_NOTE)}</p>')
        images = plots.get(table.name, [])
        if images:
            parts.append('<div class="plots">' + "".join(_img(p) for p in images) + "</div>")
        for failure in failures(table):
            parts.append(f'<p class="failed">failed: {html.escape(failure)}</p>')
        if compute := compute_summary(table):
            parts.append(f'<p class="note">{html.escape(compute)}.</p>')
        parts.append("<details><summary>Cost per cell</summary>" +
                     html_table(COST_HEADER, cost_rows(table), cls="cost") + "</details>")
    if gap is not None:
        parts.append('<h2 id="selection-gap">Selection gap: the epoch chosen on test against on validation</h2>'
                     f'<p class="note">{html.escape(GAP_NOTE)}</p>' + html_table(GAP_HEADER, gap[0]) +
                     f'<p class="note">{html.escape(gap[1])}.</p>')
    if cost_plot is not None:
        parts.append(f'<h2 id="cost">Accuracy against cost</h2><div class="plots">{_img(cost_plot)}</div>')
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path


def _heading(table: Table) -> str:
    facet = ", ".join(f"{k}={v}" for k, v in table.facet.items())
    return table.title + (f" ({facet})" if facet else "") + (f" [{table.name}]" if table.title != table.name else "")
