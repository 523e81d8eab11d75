"""Where peftlab's GPU LoRA training loses time to batch shapes it has not seen before.

    PYTHONPATH=src python bench/gpu_shapes.py [--cudnn-sdp on]     # one H100, about 3 minutes

bench/gpu_bench.py once timed peftlab's LoRA training at 0.69x the Trainer peer, while a profile over
batches seen once already (bench/gpu_profile.py) put peftlab at 1.8x; this script found why (cuDNN
attention plans every new batch shape; bench/RESULTS.md). peftlab groups batches by
length, so every batch of an epoch has its own width; the peer pads random batches to the longest
row, which with reviews cut at 512 tokens is nearly always the same width. This script times, on a
random LLaMA-2-7B-shaped model in bf16 and in one process:
  A. peftlab `fit` over 24 batches of widths it has never seen (what gpu_bench.py times);
  B. the same epoch again, every width now seen;
  E. the Trainer + peft peer on A's rows;
and the same A and E in a child process with the other setting of the CUDA caching allocator's
expandable segments (PYTORCH_CUDA_ALLOC_CONF). peftlab leaves cuDNN attention out of its passes
(peftlab.evaluate.scoring.CUDA_SDPA_BACKENDS); `--cudnn-sdp on` puts it back, to see what it costs.
For each: tokens/s (real tokens, padding not counted), the caching allocator's counters over the run
(cudaMalloc and cudaFree calls, allocation retries, peak reserved memory), and per step the GPU
time between consecutive forward passes (CUDA events) and the host time. (The runs recorded in
bench/RESULTS.md also timed C and D, widths rounded up to a multiple of 64, with the script of commit
423f433; peftlab dropped that option once it was measured to cost 6 % without cuDNN.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import (LABEL_IDS, bench_trainer_peer, random_model, synthetic_examples, sync,  # noqa: E402
                       write_report)

from peftlab.train.loop import Objective  # noqa: E402
from peftlab.config import MethodConfig, TrainConfig  # noqa: E402
from peftlab.evaluate import scoring  # noqa: E402
from peftlab.evaluate.scoring import build_rows  # noqa: E402
from peftlab.models import attach_method  # noqa: E402
from peftlab.models.methods import detach_method  # noqa: E402
from peftlab.train import loop  # noqa: E402

COUNTERS = ["num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams"]


def allocator_counters() -> dict:
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    return {k: stats.get(k, 0) for k in COUNTERS}


class StepClock:
    """CUDA events and host times at every forward pass of the model: per-step time without syncing."""

    def __init__(self, model):
        self.events, self.host, self.widths = [], [], []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(int(ids.shape[1]))
        self.host.append(time.perf_counter())
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def steps(self) -> list[dict]:
        self.handle.remove()
        self.hook(None, (), {"input_ids": torch.zeros(1, 0)})  # the end of the last step
        out = []
        for i in range(len(self.widths) - 1):
            gpu = self.events[i].elapsed_time(self.events[i + 1]) if self.events else float("nan")
            out.append({"width": self.widths[i], "gpu_ms": round(gpu, 1),
                        "host_ms": round(1000 * (self.host[i + 1] - self.host[i]), 1)})
        return out


def timed_fit(model, examples, batch_size: int, label: str) -> dict:
    rows = build_rows(examples, LABEL_IDS, gold_only=True)
    gold = [e.label for e in examples]
    cfg = TrainConfig(epochs=1, lr=5e-4, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = allocator_counters()
    clock = StepClock(model)
    sync()
    start = time.perf_counter()
    history = loop.fit(model, Objective(rows, gold, 2, 0, "lm"), cfg, progress=False)
    sync()
    seconds = time.perf_counter() - start
    steps = clock.steps()
    after = allocator_counters()
    result = {"label": label, "tokens": history[0].tokens, "seconds": seconds,
              "tokens_per_s": history[0].tokens / seconds,
              "allocator": {k: after[k] - before[k] for k in COUNTERS},
              "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
              "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
              "distinct_widths": len({s["width"] for s in steps}), "steps": steps}
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)
    return result


def peer(model, examples, batch_size: int, steps: int) -> dict:
    before = allocator_counters()
    result = bench_trainer_peer(model, examples, batch_size, steps)
    after = allocator_counters()
    result["allocator"] = {k: after[k] - before[k] for k in COUNTERS}
    result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    print(json.dumps(result), flush=True)
    return result


def run(shape: str, batch_size: int, steps: int, full: bool, cudnn_sdp: bool) -> dict:
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (cpu smoke test)",
              "torch": torch.__version__, "shape": shape, "batch_size": batch_size, "steps": steps,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
              "sdp": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                      "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                      "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}}
    if cudnn_sdp:  # peftlab leaves cuDNN attention out; put it back to see what it costs
        scoring.CUDA_SDPA_BACKENDS = ["CUDNN_ATTENTION"] + scoring.CUDA_SDPA_BACKENDS
    report["sdp"]["peftlab_backends"] = scoring.CUDA_SDPA_BACKENDS
    model = random_model(shape)
    if torch.cuda.is_available():
        report["expandable_in_use"] = any(seg.get("is_expandable", False)
                                          for seg in torch.cuda.memory._snapshot()["segments"])
    n = batch_size * steps
    rows_a = synthetic_examples(n, 512, 1)
    peft_model = attach_method(model, MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1), seed=0)
    timed_fit(peft_model, synthetic_examples(2 * batch_size, 512, 0), batch_size, "warm-up")  # as gpu_bench
    runs = [timed_fit(peft_model, rows_a, batch_size, "A fresh widths")]
    if full:
        runs.append(timed_fit(peft_model, rows_a, batch_size, "B same widths again"))
    report["peftlab"] = runs
    detach_method(peft_model)
    report["trainer_peer"] = peer(model, rows_a, batch_size, steps)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--child", action="store_true", help="internal: the run with the other allocator setting")
    parser.add_argument("--no-child", action="store_true", help="skip the run with the other allocator setting")
    parser.add_argument("--cudnn-sdp", default="off", choices=["on", "off"],
                        help="on: allow cuDNN attention in peftlab's passes (off: peftlab's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print("CHILD " + json.dumps(run(args.shape, args.batch_size, args.steps, False, args.cudnn_sdp == "on")),
              flush=True)
        return
    # The child runs with the other setting of expandable segments.
    report = {"date": time.strftime("%Y-%m-%d"),
              "run": run(args.shape, args.batch_size, args.steps, True, args.cudnn_sdp == "on")}
    write_report(report, args.out, f"gpu_shapes_{args.shape}.json")  # kept if the child run fails
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the child needs the GPU's memory
    if not args.no_child:
        expandable = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"expandable_segments:{not expandable}")
        child = subprocess.run([sys.executable, __file__, "--child", "--shape", args.shape, "--batch-size",
                                str(args.batch_size), "--steps", str(args.steps), "--cudnn-sdp", args.cudnn_sdp], env=env, capture_output=True,
                               text=True)
        sys.stderr.write(child.stderr[-4000:])
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("CHILD ")]
        report["child"] = json.loads(lines[-1][6:]) if lines else {"error": child.stdout[-2000:]}
    write_report(report, args.out, f"gpu_shapes_{args.shape}.json")


if __name__ == "__main__":
    main()
