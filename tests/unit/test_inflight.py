"""results/inflight.py: the run folders of cut-off sweep cells travel to the next machine, the rest stays."""

import importlib.util
import json
from pathlib import Path

from peftlab.experiments.store import ResultsStore

SCRIPT = Path(__file__).resolve().parents[2] / "results" / "inflight.py"


def load_inflight():
    spec = importlib.util.spec_from_file_location("inflight", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_carries_only_the_unfinished_cells_folders_and_unpack_puts_them_back(tmp_path, monkeypatch):
    inflight = load_inflight()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    monkeypatch.chdir(old)  # the stores' `out` paths are relative to the tree the sweep ran in
    store = Path("s.sqlite")
    with ResultsStore(store, writer=True) as s:
        for key in ("cut", "done", "broken", "lost"):
            s.start(key, {"cell": key}, f"runs/x/{key}")
        s.interrupt("cut", "interrupted: stopped by SIGTERM")
        s.finish("done", {"accuracy": 0.9})
        s.fail("broken", "out of memory")
    for key in ("cut", "done", "broken"):  # "lost": its folder went with its machine
        (Path("runs/x") / key / "checkpoint").mkdir(parents=True)
    state = {"position": {"epoch": 2, "batch": 7, "optimizer_steps": 26, "history": []}}
    (Path("runs/x/cut/checkpoint/state.json")).write_text(json.dumps(state))
    (Path("runs/x/cut/checkpoint/tensors-1.safetensors")).write_bytes(b"\x00" * 1000)
    (Path("runs/x/cut/scores-test_epoch_1-abc.partial.jsonl")).write_text('{"batch": 0}\n')

    carried = inflight.pack([store], old / "inflight.tar")
    assert [(c["key"], c["checkpoint"]) for c in carried] == [("cut", {"epoch": 2, "batch": 7, "optimizer_steps": 26})]

    back = inflight.unpack(old / "inflight.tar", new)
    assert [c["key"] for c in back] == ["cut"]
    files = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
    assert files == ["runs/x/cut/checkpoint/state.json", "runs/x/cut/checkpoint/tensors-1.safetensors",
                     "runs/x/cut/scores-test_epoch_1-abc.partial.jsonl"]
    assert (new / "runs/x/cut/checkpoint/tensors-1.safetensors").read_bytes() == b"\x00" * 1000
