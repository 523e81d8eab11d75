"""Carry the checkpoints of cut-off sweep cells from one machine to the next, through git.

A session's machine is new each time and `runs/` is not committed, so a cell stopped with SIGTERM (its
checkpoint saved, the store marking it `interrupted`) would start again from scratch on the next machine: up
to an hour of CPU lost per queue. `pack` writes the run folders of the stores' unfinished cells (checkpoint,
score journals, config.yaml: a few MB for a PEFT adapter and its AdamW moments) to one tar file beside this
script, with a manifest of what it holds; `unpack` puts them back under a checkout, where
`peftlab sweep ... --resume` continues each cell from its checkpoint. Where the next machine computes in
another precision (`model.dtype: auto`: bf16 on a CPU with native bf16, fp32 on one without), the sweep runs
the cell again from the start instead, so that no cell mixes two (docs/reliability.md); checkpoints packed
before 2026-12-08 do not record their precision, so unpack them only on a machine of the same kind.

    python results/inflight.py pack results/methods/comparison.sqlite results/study/*.sqlite   # in the sweep's tree
    python results/inflight.py unpack                                                          # in the next one

Paths are the stores' own (`cells.out`, relative to the tree the sweep ran in), so run both from the root of
a checkout. Stop the sweeps with SIGTERM first: a folder taken while a cell runs may hold a half-written journal.
"""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import sys
import tarfile
from pathlib import Path

ARCHIVE = Path(__file__).with_name("inflight.tar")
MANIFEST = "inflight-manifest.json"


def unfinished_cells(store: Path) -> list[dict]:
    """The store's cells that a sweep started and did not finish (status `running`: cut off, or interrupted by
    SIGTERM with a checkpoint saved), read-only."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key, out, reason FROM cells WHERE status = 'running'").fetchall()
    return [{"store": str(store), "key": key, "out": out, "reason": reason} for key, out, reason in rows]


def checkpoint_position(folder: Path) -> dict | None:
    """Where the cell's checkpoint stands (epoch, batch, optimiser step), None without one."""
    state = folder / "checkpoint" / "state.json"
    if not state.exists():
        return None
    position = json.loads(state.read_text()).get("position", {})
    return {k: position.get(k) for k in ("epoch", "batch", "optimizer_steps")}


def pack(stores: list[Path], archive: Path) -> list[dict]:
    carried = []
    with tarfile.open(archive, "w") as tar:
        for store in stores:
            for cell in unfinished_cells(store):
                folder = Path(cell["out"] or "")
                if not cell["out"] or not folder.is_dir():
                    print(f"{store}: {cell['key']} has no run folder here ({cell['out']}): it starts afresh",
                          file=sys.stderr)
                    continue
                cell["checkpoint"] = checkpoint_position(folder)
                tar.add(folder, arcname=folder.as_posix())
                carried.append(cell)
        manifest = json.dumps(carried, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return carried


def unpack(archive: Path, root: Path) -> list[dict]:
    with tarfile.open(archive) as tar:
        carried = json.load(tar.extractfile(MANIFEST))
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        tar.extractall(root, members=members, filter="data")  # "data": no absolute paths, links or devices
    return carried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="tar the run folders of the stores' unfinished cells")
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--archive", type=Path, default=ARCHIVE)
    u = sub.add_parser("unpack", help="put the carried run folders back under a checkout")
    u.add_argument("--archive", type=Path, default=ARCHIVE)
    u.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    if args.verb == "pack":
        missing = [str(s) for s in args.stores if not s.exists()]
        if missing:
            parser.error(f"no such store: {', '.join(missing)}")
        carried = pack(args.stores, args.archive)
    else:
        if not args.archive.exists():
            parser.error(f"no archive at {args.archive}: nothing was carried (run `pack` in the last tree)")
        carried = unpack(args.archive, args.root)
    for cell in carried:
        print(f"{args.verb}: {cell['store']} {cell['key']} {cell['out']} checkpoint {cell.get('checkpoint')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
