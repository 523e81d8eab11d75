"""What `peftlab tune` leaves in --out: best.yaml, trials.csv/.md, and Optuna's plots."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import optuna

from peftlab.config import RunConfig, dotted, dump_yaml
from peftlab.records import atomic_write_text, write_json


def write_outputs(tune, study: optuna.Study, best: optuna.trial.FrozenTrial, final: RunConfig, record: dict,
                  baseline: dict | None = None) -> dict[str, Path]:
    """best.yaml (runs with `peftlab train --config`), trials table, plots, and best.json (the final run of
    the chosen trial `best` and, with `baseline`, the untuned config's run beside it)."""
    out = tune.out
    out.mkdir(parents=True, exist_ok=True)
    runnable = RunConfig(**{**{f: getattr(final, f) for f in ("model", "data", "prompt", "method", "train",
                                                                 "eval", "adapter")}, "out": None})
    header = (f"# peftlab train --config {out / 'best.yaml'}\n"
              f"# best of study {tune.name} ({tune.url}): trial {best.number}, {tune.spec.objective} "
              f"{best.value:.4f}; test accuracy of this config {record.get('accuracy', float('nan')):.4f} "
              f"(run {final.out})\n")
    atomic_write_text(out / "best.yaml", header + dump_yaml(runnable))
    test_keys = ("accuracy", "ci95", "n", "macro_f1", "nll", "ece", "brier", "auroc")
    summary = {"trial": best.number, "params": best.params, "objective": tune.spec.objective, "value": best.value,
               "test": {k: record.get(k) for k in test_keys}, "val": record.get("val"), "run": final.out,
               "study": tune.url}
    if baseline is not None:
        summary["baseline"] = {"params": {k: dotted(baseline.get("config", {})).get(k) for k in tune.space},
                               "test": {k: baseline.get(k) for k in test_keys}, "val": baseline.get("val"),
                               "run": baseline.get("out")}
        summary["paired"] = paired_comparison(record, baseline)
    write_json(out / "best.json", summary)
    header_row, rows = trials_table(study, list(tune.space), chosen=best.number)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header_row] + rows)
    atomic_write_text(out / "trials.csv", buffer.getvalue())
    md = ["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
    md += ["| " + " | ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r)
           + " |" for r in rows]
    if baseline is not None:
        md += ["", baseline_line(summary)]
    atomic_write_text(out / "trials.md", "\n".join(md) + "\n")
    return {"best_yaml": out / "best.yaml", "trials_csv": out / "trials.csv", "trials_md": out / "trials.md",
            **write_plots(study, out / "plots")}


def paired_comparison(best: dict, baseline: dict) -> dict:
    """The tuned and the untuned run on the same test examples (their predictions.jsonl): the accuracy
    difference, the examples only one of them gets right, and McNemar's exact p-value (evaluate/paired.py)."""
    from peftlab.errors import PeftlabError
    from peftlab.evaluate.paired import correct_by_id, paired_counts

    out = {"difference": best["accuracy"] - baseline["accuracy"]}
    try:
        counts = paired_counts(correct_by_id(baseline.get("out") or ""), correct_by_id(best.get("out") or ""))
    except PeftlabError:
        return {**out, "note": "no paired test: the two runs' predictions are missing or not of the same examples"}
    return {**out, "n": counts["n"], "only_best_correct": counts["only_b_correct"],
            "only_baseline_correct": counts["only_a_correct"], "mcnemar_p": counts["mcnemar_p"]}


def baseline_line(summary: dict) -> str:
    """The tuned config beside the untuned one, in one markdown line."""
    def acc(part: dict) -> str:
        t = part["test"]
        return f"{100 * t['accuracy']:.2f} % ({100 * t['ci95'][0]:.1f}-{100 * t['ci95'][1]:.1f})"

    paired = summary["paired"]
    test = (f"McNemar exact p = {paired['mcnemar_p']:.3g} ({paired['only_best_correct']} reviews only the tuned "
            f"config gets right, {paired['only_baseline_correct']} only the untuned)" if "mcnemar_p" in paired
            else paired["note"])
    return (f"Test accuracy: tuned (trial {summary['trial']}) {acc(summary)} against untuned "
            f"({', '.join(f'{k}={v}' for k, v in summary['baseline']['params'].items())}) {acc(summary['baseline'])}: "
            f"{100 * paired['difference']:+.2f} points; {test}.")


def trials_table(study: optuna.Study, keys: list[str], chosen: int | None = None) -> tuple[list[str], list[list]]:
    """One row per trial, in order: number, state, value, epochs reported, parameters, cell key, and a note
    (why it failed, a redo, or the trial the search chose)."""
    header = ["trial", "state", "value", "epochs"] + keys + ["cell_key", "seconds", "note"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        cut_off = t.state == optuna.trial.TrialState.FAIL and "reason" not in t.user_attrs
        redo = f"redo of trial {t.user_attrs['redo_of']}" if "redo_of" in t.user_attrs else ""
        note = t.user_attrs.get("reason") or ("cut off by a kill, redone" if cut_off else redo)
        note = "chosen" if t.number == chosen else note
        rows.append([t.number, t.state.name, t.value, len(t.intermediate_values)] + [t.params.get(k) for k in keys]
                    + [t.user_attrs.get("cell_key"), seconds, note])
    return header, rows


def write_plots(study: optuna.Study, folder: Path) -> dict[str, Path]:
    """Optimisation history, slice plot and (with two or more completed trials) parameter importances."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return {}  # plots need the report extra (matplotlib); the tables are written regardless
    folder.mkdir(parents=True, exist_ok=True)
    plots = {"history": ovm.plot_optimization_history, "slice": ovm.plot_slice}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) >= 2 and len({str(t.params) for t in completed}) >= 2:
        plots["importance"] = ovm.plot_param_importances
    paths = {}
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances when no parameter varies
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths[f"plot_{name}"] = folder / f"{name}.png"
    return paths
