"""Several processes on the CPU (gloo): sharding is exact, and two processes train and score as one does."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftlab.config import build_config
from peftlab.distributed import Cluster, shard_order
from peftlab.evaluate.scoring import ScoreResult
from peftlab.runs import run_train


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_example_once_and_differ_by_at_most_one(world):
    for n in range(0, 17):
        lengths = [(7 * i) % 11 for i in range(n)]
        shards = shard_order(lengths, world)
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_batch_shares_add_up_to_the_batch(world):
    for size in range(1, 9):
        batch = list(range(10, 10 + size))
        parts = [Cluster(rank=r, world_size=world).shard_batch(batch) for r in range(world)]
        real = [p for p, share in parts if share > 0]
        assert sorted(i for p in real for i in p) == batch
        assert sum(share for _, share in parts) == pytest.approx(1.0)
        assert all(len(p) == 1 for p, share in parts if share == 0)  # stand-ins: one example, no weight


def _gather_worker(rank, world, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = []
    # 3 ranks; 7 examples: shares of 3, 2, 2; 2 examples: one rank has none (fsdp pads it with a copy).
    for strategy in ("ddp", "fsdp"):
        for n in (7, 2):
            cluster = Cluster(rank=rank, world_size=world, strategy=strategy, device="cpu")
            calls = []

            def score(rows, max_examples, max_tokens):  # a score that says which example it came from
                calls.append(len(rows))
                return ScoreResult(scores=torch.tensor([[float(r), -float(r)] for r in rows]), tokens=len(rows),
                                   seconds=0.1)

            lengths = [(5 * i) % 7 + 1 for i in range(n)]
            result = cluster.score(score, list(range(n)), lengths, 2, 3, 10**6)
            out.append((strategy, n, result.scores.tolist(), result.tokens - sum(lengths), sum(calls)))
    queue.put((rank, out))
    dist.destroy_process_group()


def test_gathered_scores_cover_the_test_set_exactly_once():
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 3, 29600 + os.getpid() % 300, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, cases in results.items():
        for strategy, n, scores, extra_tokens, _ in cases:
            assert [s[0] for s in scores] == [float(i) for i in range(n)]  # every example, in order, once
            assert extra_tokens == 0  # the examples' tokens; padding copies are not counted
    for case in range(4):  # fsdp: lockstep, every rank scores as many rows (ddp: no need)
        strategy, n = results[0][case][:2]
        if strategy == "fsdp":
            assert len({results[r][case][4] for r in results}) == 1, (n, [results[r][case] for r in results])


def _train_args(tiny_model_dir, imdb_dir, out):
    return ["train", "--model", str(tiny_model_dir), "--data", str(imdb_dir), "--n-train", "16", "--n-test", "14",
            "--epochs", "1", "--batch-size", "3", "--lr", "2e-2", "--lora-dropout", "0", "--loss", "classes",
            "--max-input-tokens", "40", "--eval-batch-size", "4", "--dtype", "fp32", "--device", "cpu",
            "--checkpoint-every", "0", "--select-on", "test", "--out", str(out), "--quiet"]


def _torchrun(args, strategy, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PEFTLAB_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 400), "-m", "peftlab", *args, "--strategy", strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, imdb_dir, tmp_path_factory):
    one = tmp_path_factory.mktemp("reference") / "one"
    cli = _train_args(tiny_model_dir, imdb_dir, one)
    layer = {k.lstrip("-").replace("-", "_"): v for k, v in zip(cli[1:-1:2], cli[2:-1:2])}
    keys = {"model": "model.name", "data": "data.source", "n_train": "data.n_train", "n_test": "data.n_test",
            "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
            "lora_dropout": "method.lora_dropout", "loss": "train.loss", "max_input_tokens": "prompt.max_input_tokens",
            "eval_batch_size": "eval.eval_batch_size", "dtype": "model.dtype", "device": "model.device",
            "checkpoint_every": "train.checkpoint_every", "select_on": "train.select_on", "out": "out"}
    return one, run_train(build_config({keys[k]: v for k, v in layer.items()}), progress=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_and_score_as_one(tiny_model_dir, imdb_dir, tmp_path, strategy, one_process):
    one, single = one_process
    two = tmp_path / "two"
    _torchrun(_train_args(tiny_model_dir, imdb_dir, two), strategy, tmp_path)
    double = json.loads((two / "metrics.json").read_text())
    assert double["distributed"] == {"world_size": 2, "strategy": strategy}
    assert [e["accuracy"] for e in double["per_epoch"]] == [e["accuracy"] for e in single["per_epoch"]]
    for a, b in zip(double["per_epoch"], single["per_epoch"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)  # same batches, split in two
    preds_one = [json.loads(x) for x in (one / "predictions.jsonl").read_text().splitlines()]
    preds_two = [json.loads(x) for x in (two / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds_two] == [p["id"] for p in preds_one]  # the test subset, each once
    assert len({p["id"] for p in preds_two}) == 14
    for p, q in zip(preds_two, preds_one):
        assert p["scores"] == pytest.approx(q["scores"], abs=1e-4)
    w1 = load_file(one / "adapter" / "adapter_model.safetensors")
    w2 = load_file(two / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    # Adam divides by the gradient's size: summation order moves a weight by < 1% of one step (lr 2e-2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 2e-4
    assert any(w1[k].abs().sum() > 0 for k in w1 if "lora_B" in k)  # trained: B starts at zero
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # rank 1 wrote nowhere


def test_shipped_accelerate_configs_load_and_say_how_to_launch():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((Path(__file__).resolve().parents[2] / "configs" / "accelerate").glob("*.yaml"))
    kinds = {}
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} "), path
        assert " -m peftlab " in first, path
        config = load_config_from_file(str(path))
        kinds[path.stem] = (config.distributed_type.value, config.num_machines, config.use_cpu)
    assert kinds["ddp-1node"] == ("MULTI_GPU", 1, False) and kinds["ddp-cpu"] == ("MULTI_GPU", 1, True)
    assert kinds["fsdp-70b"][0] == "FSDP" and kinds["multi-node"][1] > 1
