"""Two runs scored on the same examples, compared example by example (`peftlab compare`, the tune's baseline,
the report's paired tests).

Each run's predictions.jsonl says which examples it got right, and so does its metrics record, one bit an
example (`correct_bits`: 500 hex digits for 2000 test reviews), so that a report read from the results store
can pair runs whose folders are gone. The examples only one of the two gets right
decide: McNemar's exact test asks whether they split further from half and half than chance would (McNemar
1947). This is stronger than comparing the two Wilson intervals, which treat the runs as scored on
independent samples: two runs on the same 2000 reviews whose intervals overlap can still differ by a margin
the paired test supports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.evaluate.metrics import mcnemar_exact, wilson_interval
from peftlab.records import RunFolder


def correct_by_id(run_dir: str | Path) -> dict[str, bool]:
    """Whether the run got each example right, by example id, from its predictions.jsonl."""
    path = RunFolder(Path(run_dir).expanduser()).predictions_file
    if not path.is_file():
        raise PeftlabError(f"{run_dir} has no predictions.jsonl: give the --out folder of a finished train or "
                           "eval run")
    correct = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            correct[str(row["id"])] = bool(row["correct"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PeftlabError(f"{path} line {number} is not a prediction (JSON with 'id' and 'correct'); "
                               "the file is damaged: rerun the run (`peftlab rerun`)") from None
    return correct


BITS_ENCODING = ("example ids sorted as strings; example i is bit i of `bits`, most significant bit of each byte "
                 "first; ids_sha256: the sorted ids joined by newlines")


def correct_bits(predictions: list[dict]) -> dict:
    """Which examples a run got right, one bit each, for its metrics record (BITS_ENCODING)."""
    rows = sorted(predictions, key=lambda p: str(p["id"]))
    packed = bytearray((len(rows) + 7) // 8)
    for i, row in enumerate(rows):
        if row["correct"]:
            packed[i // 8] |= 0x80 >> (i % 8)
    ids = "\n".join(str(row["id"]) for row in rows).encode("utf-8", "surrogatepass")
    return {"n": len(rows), "ids_sha256": hashlib.sha256(ids).hexdigest(), "bits": packed.hex(),
            "encoding": BITS_ENCODING}


def unpack_bits(entry: dict) -> dict[int, bool]:
    """correct_bits back to {position among the sorted ids: right}."""
    packed = bytes.fromhex(entry["bits"])
    return {i: bool(packed[i // 8] & (0x80 >> (i % 8))) for i in range(entry["n"])}


def paired_records(a: dict, b: dict) -> dict | None:
    """paired_counts of two metrics records from their correct_bits (B against A); None where either record has
    none (runs from before them) or the two scored other examples."""
    bits_a, bits_b = a.get("correct_bits"), b.get("correct_bits")
    if not bits_a or not bits_b or (bits_a["ids_sha256"], bits_a["n"]) != (bits_b["ids_sha256"], bits_b["n"]):
        return None
    return paired_counts(unpack_bits(bits_a), unpack_bits(bits_b))


def paired_counts(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """Accuracies (with Wilson intervals), the discordant examples and McNemar's exact p of two runs on the same
    examples."""
    if set(a) != set(b):
        common = len(set(a) & set(b))
        raise PeftlabError(f"the two runs were not scored on the same examples ({len(a)} and {len(b)}, {common} "
                           "in common); a paired test needs one test subset: the same data, data.n_test and "
                           "data.data_seed")
    n = len(a)
    right_a, right_b = sum(a.values()), sum(b.values())
    only_a = sum(a[i] and not b[i] for i in a)
    only_b = sum(b[i] and not a[i] for i in a)
    return {"n": n, "accuracy_a": right_a / n, "ci95_a": list(wilson_interval(right_a, n)),
            "accuracy_b": right_b / n, "ci95_b": list(wilson_interval(right_b, n)),
            "difference": (right_b - right_a) / n, "only_a_correct": only_a, "only_b_correct": only_b,
            "mcnemar_p": mcnemar_exact(only_a, only_b)}


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """The paired comparison of two run folders (B against A)."""
    return {"a": str(run_a), "b": str(run_b), **paired_counts(correct_by_id(run_a), correct_by_id(run_b))}


def compare_bits(run_a: str, bits_a: dict | None, run_b: str, bits_b: dict | None) -> dict:
    """compare_runs where either run is known by its correct_bits (a results store's record); a run given
    None is a folder, read as compare_runs reads it."""
    def folder_bits(run: str) -> dict:
        return correct_bits([{"id": i, "correct": ok} for i, ok in correct_by_id(run).items()])

    bits_a = bits_a if bits_a is not None else folder_bits(run_a)
    bits_b = bits_b if bits_b is not None else folder_bits(run_b)
    counts = paired_records({"correct_bits": bits_a}, {"correct_bits": bits_b})
    if counts is None:
        raise PeftlabError(f"the two runs were not scored on the same examples ({bits_a['n']} and {bits_b['n']}, "
                           "other ids); a paired test needs one test subset: the same data, data.n_test and "
                           "data.data_seed")
    return {"a": run_a, "b": run_b, **counts}


def describe_comparison(result: dict, alpha: float = 0.05) -> str:
    """Two lines: each run's accuracy, then the difference, the discordant examples and the test."""
    def acc(side: str) -> str:
        low, high = result[f"ci95_{side}"]
        return f"{100 * result[f'accuracy_{side}']:.2f} % ({100 * low:.1f}-{100 * high:.1f})"

    verdict = "supported" if result["mcnemar_p"] < alpha else "not supported"
    return (f"A {result['a']}: {acc('a')}; B {result['b']}: {acc('b')}; the same {result['n']} examples\n"
            f"B - A: {100 * result['difference']:+.2f} points; {result['only_b_correct']} examples only B gets right, "
            f"{result['only_a_correct']} only A; McNemar exact p = {result['mcnemar_p']:.3g} ({verdict} at the "
            f"{100 * alpha:g} % level)")
