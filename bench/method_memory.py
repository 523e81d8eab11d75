"""Peak memory of each method of a comparison sweep, each in a fresh process.

    OMP_NUM_THREADS=1 python bench/method_memory.py configs/sweeps/smollm2-methods.yaml \
        --data ../shared/data/aclImdb_labeled.tar.gz --store results/methods/comparison.sqlite

A sweep runs all its cells in one process, and on a CPU a cell's `peak_memory_mb` is the process's peak
resident set since the reset before the cell (repro.reset_peak_memory). Until 1bef9b3 that reset did not
trim glibc's heap, so a cell's figure also held what earlier cells had freed and glibc kept resident: the
comparison's first cells show peaks growing from cell to cell. This bench runs each case of the sweep alone,
in a new Python process, as the sweep would (same model, inputs, batch size, method and learning rate) but on
few reviews and one epoch: the peak comes from the largest batch, not from N, so it is the figure a fresh
process running that cell would record. Beside it: the resident set at the reset (the model and libraries,
the same for every case), the case's own share above it, and the full cell's figure from --store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def one_case(config: str, case: str, data: str, n_train: int, n_test: int, out: str) -> dict:
    """Run the sweep's cell of `case` on n_train reviews for one epoch in this process; its peak and baseline."""
    from peftlab.experiments import ResultsStore, load_sweep, run_sweep

    overrides = {"data.source": data, "data.n_train": n_train, "data.n_val": 16, "data.n_test": n_test,
                 "train.epochs": 1}
    sweep = load_sweep(config, overrides, out=Path(out) / "runs")
    sweep.cells = [c for c in sweep.cells if c.params.get("case") == case]
    if len(sweep.cells) != 1:
        raise SystemExit(f"{config}: no single cell of case {case!r} (cases: "
                         f"{sorted({c.params.get('case') for c in sweep.members})})")
    with ResultsStore(Path(out) / "memory.sqlite", writer=True) as store:
        run_sweep(sweep, store, progress=False, log=lambda _: None)
        cell = store.cells(sweep.name)
        record = next(c.record for c in cell if c.key == sweep.cells[0].key)
    return {"case": case, "peak_mb": record["peak_memory_mb"], "rss_at_reset_mb": record["memory_at_cell_start_mb"],
            "trainable_parameters": record["trainable_parameters"], "dtype": record["model"]["dtype"]}


def full_cell_peaks(store_path: str, config: str, data: str) -> dict[str, dict]:
    """Each finished case's peak_memory_mb and git commit in the comparison's own store (the N=500 cells; the
    key of a cell depends on its config, so the sweep is loaded as it was run, with --data)."""
    from peftlab.experiments import ResultsStore, load_sweep

    sweep = load_sweep(config, {"data.source": data})
    keys = {c.key: c.params.get("case") for c in sweep.members}
    with ResultsStore(store_path) as store:
        return {keys[c.key]: {"peak_mb": c.record["peak_memory_mb"], "commit": c.record.get("git_commit")}
                for c in store.cells(sweep.name) if c.key in keys and c.status == "finished"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a sweep YAML with cases (configs/sweeps/smollm2-methods.yaml)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--cases", help="comma-separated cases [default: every case of the YAML]")
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--store", help="the comparison's store: its cells' figures go beside")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this case in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_case(args.config, args.one, args.data, args.n_train, args.n_test, args.out)))
        return

    from peftlab.experiments import load_sweep
    from peftlab.repro import hardware

    cases = args.cases.split(",") if args.cases else list(dict.fromkeys(
        c.params.get("case") for c in load_sweep(args.config).members))
    full = full_cell_peaks(args.store, args.config, args.data) if args.store else {}
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run(
                [sys.executable, __file__, args.config, "--data", args.data, "--one", case, "--out", out,
                 "--n-train", str(args.n_train), "--n-test", str(args.n_test)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if done.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["full_cell"] = full.get(case)
        rows.append(row)
        print(f"{case:12} peak {row['peak_mb']:8,.0f} MB  at reset {row['rss_at_reset_mb']:6,.0f} MB  "
              f"own {row['peak_mb'] - row['rss_at_reset_mb']:7,.0f} MB  full cell "
              + (f"{row['full_cell']['peak_mb']:8,.0f} MB ({row['full_cell']['commit']})" if row["full_cell"]
                 else "not run"), flush=True)
    result = {"config": args.config, "n_train": args.n_train, "n_test": args.n_test, "hardware": hardware(),
              "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
