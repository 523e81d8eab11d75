"""Scoring label words: one forward pass per example, logits only where they are read.

A label word's score is the sum of its tokens' log-probabilities after the prompt (the whole
word, as lm-evaluation-harness scores a multi-token continuation). When every label word is a
single token, one row per example reads one position and scores all classes at once; otherwise
each (example, class) pair is a row `prompt + word[:-1]` that reads len(word) positions.

Batches are right-padded: real tokens keep positions 0..n-1 whatever else is in the batch, and
virtual tokens of prompt tuning (prepended by peft in front of the whole row, peft issue #1093)
then shift every example by the same V. So an example's scores do not depend on its batch.
The same function gives training its differentiable scores.

Under a classification head (train.objective=head, models.head) the output at a position is the head's k
class logits instead of the vocabulary's: each example is one row read at its last prompt token, and class
c "reads" output c (`read_ids`), so the class scores are the log-softmax of the head's logits and everything
downstream (padding invariance, the shared prefix, calibration, metrics) is the same code.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass

import torch

from peftlab.models.head import class_head
from peftlab.prompts.encoding import EncodedExample


@dataclass
class Row:
    seq: list[int]            # token ids fed to the model
    positions: list[int]      # indices whose next-token distributions are read
    classes: list[int]        # classes this row scores
    targets: list[list[int]]  # per class: the target id read at each position


def build_rows(examples: list[EncodedExample], label_ids: list[list[int]], gold_only: bool = False
               ) -> list[list[Row]]:
    """The rows of each example (built once per run: tokenising is not repeated per epoch)."""
    single = all(len(ids) == 1 for ids in label_ids)
    out = []
    for ex in examples:
        n = len(ex.prompt_ids)
        if single:
            classes = [ex.label] if gold_only else list(range(len(label_ids)))
            out.append([Row(ex.prompt_ids, [n - 1], classes, [label_ids[c] for c in classes])])
            continue
        classes = [ex.label] if gold_only else range(len(label_ids))
        out.append([Row(ex.prompt_ids + label_ids[c][:-1], list(range(n - 1, n - 1 + len(label_ids[c]))),
                        [c], [label_ids[c]]) for c in classes])
    return out


def read_ids(model, label_ids: list[list[int]]) -> list[list[int]]:
    """What each class reads after the prompt: its label word's token ids under the LM head, or, under a
    classification head, its own index among the head's outputs, at one position (the last prompt token)."""
    return [[c] for c in range(len(label_ids))] if class_head(model) is not None else label_ids


def position_outputs(model, forward, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's outputs at `positions` of its input (virtual tokens included): (R, K, vocab) next-token
    logits, or (R, K, k) class logits under a classification head.

    LM head: `logits_to_keep`, so that it runs on the K read positions only. Classification head: the
    sequence classifier's forward applies `score` to every position and pools at the last non-pad input id;
    the per-position logits are taken from `score` itself (a forward hook), so that peftlab picks the
    position, as it does for label words, where transformers' pooling cannot (inputs_embeds, a prefix cache).
    """
    head = class_head(model)
    if head is None:
        with contiguous_lm_head(model):
            return forward(logits_to_keep=positions, **inputs).logits
    caught = []
    handle = head.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        forward(**inputs)
    finally:
        handle.remove()
    return caught[-1][:, positions]  # (R, T, k) -> (R, K, k)


def example_length(rows: list[Row]) -> int:
    return max(len(r.seq) for r in rows)


@contextlib.contextmanager
def contiguous_lm_head(model):
    """Make the LM head's input contiguous while scoring.

    transformers slices the kept positions out of the hidden states (a strided view); torch's
    matmul cannot fold a strided (B, K, H) input into one GEMM and instead copies the head's
    weight B times (16 x 576 x 49152 values for SmolLM2: 1.5 s of a 5 s batch, measured with
    torch.profiler). A contiguous input turns it back into one plain GEMM.
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def adapter_autocast(model, device: torch.device):
    """bf16 autocast when the frozen base is bf16, so fp32 adapter weights compute in bf16 too.

    peft keeps adapters in fp32 and, without autocast, casts each adapted layer's input up to
    fp32: a full-size fp32 copy and an fp32 GEMM per adapted layer. On an H100 that made peftlab's
    LoRA training 0.75x the Trainer peer's speed (bench/results/gpu-h100-run1-llama2-7b.json), which
    runs under bf16 autocast. Trainable weights and optimiser state stay fp32.
    """
    bf16 = model.get_input_embeddings().weight.dtype == torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# Attention kernels allowed on a GPU. cuDNN's is left out: it builds a plan for every batch shape it
# has not seen (~130 ms for a 7B model's forward and backward on an H100, and with the default CUDA
# allocator some steps stalled 1.4-2.4 s), and length-grouped batches bring a new shape almost every
# step, while the memory-efficient kernel runs as fast once shapes repeat. 7B LoRA training over 24
# fresh batch widths: 4,985 tok/s with cuDNN, 10,824-11,446 without, 11,592-11,935 with every width
# already seen; evaluation 25,141 -> 31,565 tok/s (bench/gpu_shapes.py, bench/gpu_bench.py, RESULTS.md).
# Rounding widths up to a multiple of 64 instead (fewer shapes) helped only while cuDNN was in use
# (4,985 -> 7,544 tok/s); without it the padding cost 6 %.
CUDA_SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]


def attention_kernels(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in CUDA_SDPA_BACKENDS])


@dataclass
class SharedPrefix:
    """The KV cache of the prompt prefix every row starts with: computed once per evaluation, or once per
    training batch with its graph kept (peftlab.train.loop.training_prefix)."""

    length: int   # the rows' own tokens it holds
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv_heads, virtual + length, head_dim)
    virtual: int = 0  # prompt tuning's virtual tokens in front of them: the rows then skip peft's forward

    @property
    def cached(self) -> int:
        return self.virtual + self.length


def virtual_prompt_method(model) -> bool:
    """peft prompt tuning or p-tuning: virtual token embeddings in front of the input (get_prompt)."""
    from peft import PeftType

    config = getattr(model, "active_peft_config", None)
    return config is not None and config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING)


def can_share_prefix(model, offset: int) -> bool:
    """Any method whose forward peftlab can split at the prefix: not prefix tuning and the other prompt
    learning methods that build their own cache or take task ids (`offset` > 0 only for virtual tokens)."""
    if virtual_prompt_method(model):
        return True
    return not offset and not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)


def common_prefix_length(rows: list[list[Row]], min_length: int = 8) -> int:
    """How many first tokens every row shares (the template's instruction part, ~45 tokens of Alpaca),
    stopping before the first scored position of any row; 0 when fewer than `min_length`."""
    if not rows:
        return 0
    first = rows[0][0].seq
    length = min(min(row.positions[0] for r in rows for row in r), len(first))
    for r in rows:
        for row in r:
            while length and row.seq[:length] != first[:length]:
                length -= 1
    return length if length >= min_length else 0


def prefix_cache(model, ids: list[int]) -> SharedPrefix:
    """One forward pass over `ids` (a batch of one); its keys and values stand for every row's prefix.

    For prompt tuning the pass runs peft's virtual tokens and then `ids` through the base model, as
    peft's forward would (prompt embeddings in the base's dtype, positions from 0), and the rows later
    go to the base model directly, behind this cache. Under autograd (training) the cache keeps its
    graph: the rows' gradients flow back through the one pass, summed over the batch, so a step
    computes the prefix once instead of once per example.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids_t = torch.tensor([ids], device=device)
    virtual = 0
    # A cache of full layers only, not the model's own (DynamicCache(config=...)): a sliding-window layer
    # (Gemma 3, Mistral) would keep just its last `sliding_window` keys, and the rows behind the prefix
    # need all of them, at their own positions; their sliding mask still limits what each row sees.
    full = {cache_argument(model): DynamicCache()}
    if class_head(model) is None:
        full["logits_to_keep"] = 1  # the LM head's logits are not read; a sequence classifier has no such argument
    with adapter_autocast(model, device), attention_kernels(device):
        if virtual_prompt_method(model):
            base = model.get_base_model()
            embeds = base.get_input_embeddings()(ids_t)
            prompt = model.get_prompt(batch_size=1).to(embeds.dtype)
            virtual = prompt.shape[1]
            out = base(inputs_embeds=torch.cat([prompt, embeds], dim=1), use_cache=True, **full)
        else:
            out = model(input_ids=ids_t, use_cache=True, **full)
    cache = out.get("cache") or out.get("past_key_values")  # renamed to `cache` in transformers 5.24
    return SharedPrefix(len(ids), [(layer.keys, layer.values) for layer in cache.layers], virtual)


def shareable_prefix(model, rows: list[list[Row]], offset: int, min_length: int = 8) -> list[int] | None:
    """The token ids all rows start with, where the method lets peftlab run them apart (None: none)."""
    length = common_prefix_length(rows, min_length) if can_share_prefix(model, offset) else 0
    return rows[0][0].seq[:length] if length else None


@torch.inference_mode()
def shared_prefix(model, rows: list[list[Row]], offset: int, min_length: int = 8) -> SharedPrefix | None:
    """The cache of the prefix all rows share, computed once for a whole evaluation (None: nothing shared)."""
    ids = shareable_prefix(model, rows, offset, min_length)
    return prefix_cache(model, ids) if ids else None


def cache_argument(model) -> str:
    """transformers >= 5.24 renamed forward's `past_key_values` to `cache`; older releases know only the former."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def example_scores(model, batch: list[list[Row]], n_classes: int, pad_id: int, offset: int = 0,
                   prefix: SharedPrefix | None = None) -> torch.Tensor:
    """(B, C) label-word log-probabilities of a batch of examples; -inf where a class was not scored."""
    flat = [(b, row) for b, rows in enumerate(batch) for row in rows]
    device = next(model.parameters()).device
    skip = prefix.length if prefix else 0  # the rows' tokens whose keys and values come from the prefix cache
    cached = prefix.cached if prefix else 0  # positions in that cache: virtual tokens included
    width = max(len(row.seq) for _, row in flat) - skip
    input_ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(flat), cached + width), dtype=torch.long)
    for r, (_, row) in enumerate(flat):
        input_ids[r, : len(row.seq) - skip] = torch.tensor(row.seq[skip:])
        attention_mask[r, : cached - skip + len(row.seq)] = 1
    keep = sorted({p for _, row in flat for p in row.positions})
    where = {p: k for k, p in enumerate(keep)}
    r_idx, k_idx, t_idx, b_idx, c_idx, seg = [], [], [], [], [], []
    for r, (b, row) in enumerate(flat):
        for c, targets in zip(row.classes, row.targets):
            for p, t in zip(row.positions, targets):
                r_idx.append(r), k_idx.append(where[p]), t_idx.append(t), seg.append(len(b_idx))
            b_idx.append(b), c_idx.append(c)
    # One host-to-device copy of everything the batch needs, from pinned memory and asynchronous:
    # a copy from pageable memory waits for the GPU to drain, which serialised the CPU's kernel
    # launches with the GPU's work at every step (peftlab trained at 0.67x the Trainer peer on an H100).
    ints = to_device(torch.tensor(keep + r_idx + k_idx + t_idx + seg + b_idx + c_idx), device)
    keep_t, r_t, k_t, t_t, seg_t, b_t, c_t = torch.split(
        ints, [len(keep), len(r_idx), len(k_idx), len(t_idx), len(seg), len(b_idx), len(c_idx)])
    extra, forward = {}, model
    if prefix:
        from transformers import DynamicCache

        n = len(flat)
        extra = {cache_argument(model): DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                                                 for k, v in prefix.kv]),
                 "position_ids": torch.arange(cached, cached + width, device=device).expand(n, -1)}
        if prefix.virtual:  # the virtual tokens are in the cache: peft's forward would add them again
            forward = model.get_base_model()
    # Only the K read positions are read (position_outputs). Output i is position i of the input, which starts
    # `offset` virtual tokens before the row, or after the cache.
    with adapter_autocast(model, device), attention_kernels(device):
        logits = position_outputs(model, forward, keep_t + (offset - cached), input_ids=to_device(input_ids, device),
                                  attention_mask=to_device(attention_mask, device), use_cache=bool(prefix),
                                  **extra)                                             # (R, K, vocab or k)
    picked = logits[r_t, k_t].float()                                                  # (P, vocab or k)
    token_lp = torch.log_softmax(picked, dim=-1).gather(1, t_t[:, None])[:, 0]         # (P,)
    per_pair = torch.zeros(len(b_idx), device=device).index_add(0, seg_t, token_lp)
    scores = torch.full((len(batch), n_classes), float("-inf"), device=device)
    return scores.index_put((b_t, c_t), per_pair)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def length_batches(lengths: list[int], max_examples: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first into batches of at most max_examples and max_tokens (padding included)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_examples or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class ScoreResult:
    scores: torch.Tensor  # (N, C) on CPU
    tokens: int           # real tokens processed (virtual tokens included)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class EvaluationStopped(Exception):
    """An evaluation saw a stop request between two batches (its finished batches are in the run's journal);
    the training loop saves the epoch's checkpoint and turns it into train.preemption.Preempted."""

    def __init__(self, signal_name: str):
        super().__init__(f"evaluation stopped by {signal_name}")
        self.signal_name = signal_name


@torch.inference_mode()
def score_examples(model, rows: list[list[Row]], n_classes: int, pad_id: int, offset: int,
                   max_examples: int = 16, max_tokens: int = 8192, progress: bool = True,
                   desc: str = "scoring", share_prefix: bool = True, journal=None, ids: list[str] | None = None,
                   stop=None) -> ScoreResult:
    """Label-word scores of every example, in length-grouped batches.

    With a `journal` (records.ScoreJournal) and the examples' `ids`, each finished batch is journalled and
    batches the journal holds already are taken from it; the batches are the same whatever was done
    before, so the scores are too. With `stop` (train.preemption.StopRequest), a stop request raises
    EvaluationStopped between two batches.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    lengths = [example_length(r) * len(r) for r in rows]
    scores = torch.empty((len(rows), n_classes))
    tokens = sum(len(row.seq) + offset for r in rows for row in r)
    start = time.perf_counter()
    prefix = shared_prefix(model, rows, offset) if share_prefix else None
    try:
        with tqdm(total=len(rows), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            for batch in length_batches(lengths, max_examples, max_tokens):
                if journal is not None and all(ids[i] in journal.known for i in batch):
                    scores[batch] = torch.tensor([journal.known[ids[i]] for i in batch], dtype=scores.dtype)
                else:
                    if stop is not None and stop.signal is not None:
                        raise EvaluationStopped(stop.signal)
                    scores[batch] = example_scores(model, [rows[i] for i in batch], n_classes, pad_id, offset,
                                                   prefix).float().cpu()
                    if journal is not None:
                        journal.append([ids[i] for i in batch], scores[batch].tolist())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return ScoreResult(scores=scores, tokens=tokens, seconds=seconds)
