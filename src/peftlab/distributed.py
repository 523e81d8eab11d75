"""Several processes: `accelerate launch` or `torchrun` run one peftlab command on N ranks.

    accelerate launch --config_file configs/accelerate/ddp-1node.yaml -m peftlab train ...
    torchrun --nproc_per_node 2 -m peftlab train ...            # CPU: gloo; GPUs: NCCL

The launcher sets RANK, WORLD_SIZE and LOCAL_RANK; `join_cluster` reads them (and accelerate's
ACCELERATE_USE_FSDP / ACCELERATE_USE_CPU), starts torch.distributed and says what this process does:

- ddp: every rank holds the whole model. Each training batch is split across the ranks; each rank
  weights its loss by its share of the batch and the adapter's gradients are summed (one all-reduce
  of a flat buffer), so an optimiser step equals the single-process one up to reduction order. The
  model is not wrapped in DistributedDataParallel: an adapter's gradients are a few MB, so DDP's
  overlap of communication with backward buys nothing, and peft and the scorer see the model as it is.
- fsdp: as ddp, and the frozen base is sharded across the ranks with torch's FSDP2 (`fully_shard`,
  one unit per decoder layer): a 70B base in bf16 fits on 2+ 80 GB GPUs. The adapter is left out
  of the sharding (`ignored_params`): it stays whole on every rank and is synchronised as in ddp.
  FSDP gathers weights collectively, so every rank runs the same number of forward passes.

Evaluation splits the test examples across the ranks (strided over the length order, so every
rank gets as many long examples as short ones), scores each share, and gathers the scores once:
every example is scored by exactly one rank, whatever the world size. Rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch

from peftlab.config import ModelConfig
from peftlab.errors import PeftlabError
from peftlab.evaluate.scoring import ScoreResult


@dataclass(frozen=True)
class Cluster:
    """This process's place among the launched processes (rank 0 of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp
    device: str | None = None  # the device of this rank when launched, e.g. cuda:3

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def record(self) -> dict:
        return {"world_size": self.world_size, "strategy": self.strategy}

    def model_config(self, config: ModelConfig) -> ModelConfig:
        """Where this rank loads the base: its own GPU (ddp), or the CPU before sharding (fsdp)."""
        if not self.distributed:
            return config
        if self.strategy == "fsdp":
            if config.quantization != "none":
                raise PeftlabError("model.quantization with FSDP is not supported by peftlab: shard a bf16 base "
                                   "across GPUs (fsdp) or quantise it on each GPU (ddp), not both")
            from peftlab.models.loading import choose_dtype

            dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[
                choose_dtype(config.dtype, torch.device(self.device))]
            return dataclasses.replace(config, device="cpu", dtype=dtype)  # sharded onto self.device after
        return dataclasses.replace(config, device=self.device)

    def shard_batch(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's examples of a training batch and their share of it.

        A rank whose share is empty (a batch smaller than the world) computes a stand-in example
        weighted 0: it must still take part in the backward's collectives.
        """
        if not self.distributed:
            return batch, 1.0
        mine = batch[self.rank::self.world_size]
        return (mine, len(mine) / len(batch)) if mine else (batch[:1], 0.0)

    def all_reduce_gradients(self, params) -> None:
        """Sum the trainable parameters' gradients over the ranks (losses are already weighted by share)."""
        if not self.distributed:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (for epoch totals: loss, examples, tokens)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def prepare_model(self, model):
        """fsdp: shard the frozen base onto this rank's device (one FSDP unit per decoder layer)."""
        if not (self.distributed and self.strategy == "fsdp"):
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = torch.device(self.device)
        mesh = init_device_mesh(device.type, (self.world_size,))
        # Left whole on every rank: what trains, and a loaded adapter (fp32, while the base is 16-bit:
        # an FSDP unit all-gathers its parameters in one buffer of one dtype).
        frozen = [p for p in model.parameters() if not p.requires_grad]
        numel: dict = {}
        for p in frozen:
            numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
        base_dtype = max(numel, key=numel.get) if numel else None
        trainable = {p for p in model.parameters() if p.requires_grad or p.dtype != base_dtype}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_names = set(getattr(base, "_no_split_modules", None) or ())
        if not layer_names:
            raise PeftlabError(f"{type(base).__name__} does not name its decoder layers (_no_split_modules); "
                               "FSDP cannot shard it: use ddp")
        # Bottom-up: each layer is moved to the device and sharded alone, so no rank ever holds the whole base.
        for module in list(model.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module, mesh=mesh, ignored_params=trainable)
        # The rest (embeddings, final norm, head) in a root unit that reshards after each forward too:
        # rank 0 alone saves the adapter, and a state_dict() call would otherwise reshard the root on
        # rank 0 only, so that the next forward's all-gathers no longer match across ranks.
        fully_shard(model, mesh=mesh, ignored_params=trainable, reshard_after_forward=True)
        for p in trainable:  # FSDP leaves ignored parameters where they are
            p.data = p.data.to(device)
        return model

    def score(self, score: Callable[[list, int, int], ScoreResult], rows: list, tokens: list[int],
              n_classes: int, max_examples: int, max_tokens: int) -> ScoreResult:
        """`score(rows, max_examples, max_tokens)` over all rows, each scored by one rank, gathered on all.

        `tokens[i]`: what example i costs (it orders the shares and is the reported token count).
        """
        if not self.distributed:
            return score(rows, max_examples, max_tokens)
        shards = shard_order(tokens, self.world_size)
        mine = shards[self.rank]
        per_rank = max(len(s) for s in shards)
        if self.strategy == "fsdp":
            # FSDP's all-gathers need every rank to run the same number of forwards: pad each share
            # to the same size with copies of one example (dropped below) and batch by count only.
            mine = mine + [shards[0][0]] * (per_rank - len(mine))
            max_examples = max(1, min(max_examples, max_tokens // max(max(tokens), 1)))
            max_tokens = 2**62
        result = score([rows[i] for i in mine], max_examples, max_tokens) if mine else None
        local = torch.zeros(per_rank, n_classes, dtype=torch.float32)
        if result is not None:
            local[: len(shards[self.rank])] = result.scores[: len(shards[self.rank])]
        gathered = gather_padded(local, self.device, self.world_size)
        scores = torch.empty(len(rows), n_classes)
        counts = torch.zeros(len(rows), dtype=torch.long)
        for rank, indices in enumerate(shards):
            scores[indices] = gathered[rank][: len(indices)]
            counts[indices] += 1
        if not bool((counts == 1).all()):  # by construction; a failure here is a peftlab bug
            raise AssertionError(f"gathered scores cover the test set unevenly: {counts.bincount().tolist()}")
        slowest = max_over_ranks(result.seconds if result is not None else 0.0, self.device)
        return ScoreResult(scores=scores, tokens=sum(tokens), seconds=slowest)  # padding copies not counted


SINGLE = Cluster()  # one process, nothing launched


def shard_order(lengths: list[int], world_size: int) -> list[list[int]]:
    """Example indices of each rank: strided over the longest-first order, so shares differ by at most one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[rank::world_size] for rank in range(world_size)]


def gather_padded(local: torch.Tensor, device: str | None, world_size: int) -> list[torch.Tensor]:
    """All ranks' equally shaped tensors, on the CPU (NCCL gathers on the GPU)."""
    import torch.distributed as dist

    local = local.to(device)
    out = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def max_over_ranks(value: float, device: str | None) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def join_cluster(model: ModelConfig, strategy: str = "auto") -> Cluster:
    """The Cluster of this process; starts torch.distributed when a launcher started several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Cluster()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cpu = (model.device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
              or not torch.cuda.is_available())
    device = "cpu" if on_cpu else f"cuda:{local_rank}"
    if not on_cpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if on_cpu else "nccl", timeout=datetime.timedelta(minutes=30))
    if strategy == "auto":
        strategy = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
    return Cluster(rank=rank, world_size=world_size, local_rank=local_rank, strategy=strategy, device=device)


def leave_cluster() -> None:
    """End torch.distributed if this process started it (at the end of a CLI command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
