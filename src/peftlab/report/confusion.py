"""The confusion matrix of each table's best cell (markdown and a heat map), and how its scores were decided.

With more than two classes accuracy hides which classes the model mixes up (a rating task confuses
neighbours, a biased prior sends everything to one class); the matrix of the table's best finished
cell shows it. Rows are the gold class, columns the prediction; the heat map is coloured by the
share of each gold class (row-normalised) with the counts written in.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.report.tables import Table, markdown_table


def best_record(table: Table) -> dict | None:
    """The finished cell record with the highest accuracy that holds a confusion matrix."""
    records = [r for e in table.entries.values() for r in e.records if (r.get("confusion") or {}).get("matrix")]
    return max(records, key=lambda r: r["accuracy"]) if records else None


def describe_cell(record: dict) -> str:
    """The settings that tell the best cell apart: N, method (the sweep's case where it has cases: rslora and
    dora are both peft's lora), normalisation and calibration."""
    config = record.get("config", {})
    data, method = config.get("data", {}), config.get("method", {})
    name = record.get("cell", {}).get("params", {}).get("case") or method.get("method", "?")
    run = "zero-shot" if data.get("n_train") == 0 else f"{name} N={data.get('n_train', '?')}"
    shots = config.get("prompt", {}).get("shots") or 0
    run += f", {shots}-shot" if shots else ""
    scored = "validation" if config.get("train", {}).get("score_test") is False and data.get("n_train") else "test"
    return (f"{run}, {record.get('n', '?')} {scored} examples, "
            f"accuracy {100 * record['accuracy']:.1f} %, macro-F1 {100 * record.get('macro_f1', 0):.1f} %")


def decision_settings(table: Table) -> str:
    """Which score normalisation and prior calibration produced the table's numbers (eval.score_norm,
    eval.calibration; records from before these options used the summed log-probability, uncalibrated)."""
    seen = []
    for cell in table.cells:
        evaluate = (cell.config or {}).get("eval", {})
        value = (f"score_norm={evaluate.get('score_norm', 'sum')}, calibration={evaluate.get('calibration', 'none')}"
                 f", shots={(cell.config or {}).get('prompt', {}).get('shots', 0)}")
        if value not in seen:
            seen.append(value)
    return "; ".join(seen)


def confusion_markdown(record: dict) -> list[str]:
    labels, matrix = record["confusion"]["labels"], record["confusion"]["matrix"]
    header = ["gold \\ predicted", *labels]
    return [markdown_table(header, [[label, *map(str, row)] for label, row in zip(labels, matrix)])]


def confusion_heat_map(table: Table, record: dict, path: Path) -> Path:
    """The best cell's confusion matrix, coloured by the share of each gold class."""
    import numpy as np

    from peftlab.report.plots import _pyplot, _save, _title

    plt = _pyplot()
    labels, counts = record["confusion"]["labels"], np.array(record["confusion"]["matrix"], float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.7 * len(labels)
    # Wide enough for the two-line title: on a 2-class matrix it ran into the colour bar's label.
    fig, ax = plt.subplots(figsize=(max(size + 1.5, 5.5), size + 0.6))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    fig.colorbar(image, ax=ax, label="share of the gold class", shrink=0.85)
    fig.suptitle(f"{_title(table)}\n{describe_cell(record)}", fontsize=8)
    return _save(fig, path)
