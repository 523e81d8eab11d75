"""Memory planner: the expected peak memory per device of a peftlab run, from the model's config alone.

    peftlab plan --model meta-llama/Llama-2-70b-hf --quantization 4bit --gradient-checkpointing

No weights are read. The estimate adds up what a peftlab run keeps alive at its peak, per device:
weights, adapters (fp32, their own master copy), their gradients and AdamW's two fp32 moments,
the activations autograd saves for the backward pass, the logits (peftlab computes them only at
the scored positions), and the working memory of one layer. The per-layer activation terms were
read off `torch.autograd.graph.saved_tensors_hooks` on a LLaMA decoder (see tests/unit/test_planner.py,
which checks them against a real model) and match Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models") for a frozen base with SDPA attention.
The measured error on SmolLM2 is in docs/memory-planner.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.config import QUANTIZATIONS
from peftlab.errors import PeftlabError

GIB = 2**30
STRATEGIES = ("ddp", "fsdp")
PLANNED_METHODS = ("lora", "prompt-tuning")
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Bits per quantised weight: NF4 with double quantisation stores 4 bits plus 8-bit block scales per 64
# weights and an fp32 scale per 256 blocks (QLoRA, Dettmers et al. 2023, section 3: 0.127 bits);
# LLM.int8 stores one byte plus an fp32 scale per output row (counted separately).
QUANT_BITS = {"4bit": 4 + 8 / 64 + 32 / (64 * 256), "8bit": 8}
FITS_SHARE = 0.9  # above 90% of the device the allocator's fragmentation decides: reported as "tight"
# Runtime outside tensors: the CUDA context and kernels on a GPU; Python, torch and transformers on a CPU.
RUNTIME_BYTES = {"cuda": int(0.6 * GIB), "cpu": int(0.5 * GIB)}

_LLAMA2 = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
# The study's models, so that `peftlab plan` sizes them offline (values from their config.json on the hub).
BUILTIN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40),
    "meta-llama/Llama-2-70b-hf": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8),
}
for _size in ("7b", "13b", "70b"):
    BUILTIN_CONFIGS[f"meta-llama/Llama-2-{_size}-chat-hf"] = BUILTIN_CONFIGS[f"meta-llama/Llama-2-{_size}-hf"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-style decoder (llama, mistral, qwen2, SmolLM2, ...) that decide its memory."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by its module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_parameters(self) -> int:
        """Parameters of the decoder layers' linear layers: what bitsandbytes quantises."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_parameters(self) -> int:
        """Embeddings, LM head and norms: kept in 16 or 32 bits even in a quantised model."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    def parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()


def shape_from_config(config: dict, name: str) -> ModelShape:
    """Read the sizes out of a config.json mapping (or a transformers config's to_dict())."""
    config = config.get("text_config") or config  # multimodal wrappers keep the decoder's sizes inside
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelShape(
            name=name, model_type=str(config.get("model_type", "unknown")), vocab=int(config["vocab_size"]),
            hidden=hidden, intermediate=int(config.get("intermediate_size") or 4 * hidden),
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise PeftlabError(f"the config of {name} has no {exc.args[0]}; the planner reads LLaMA-style "
                           "decoder configs (hidden_size, num_hidden_layers, num_attention_heads, ...)") from None


def read_model_shape(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The model's shape from a built-in config, a config.json file, a folder, a GGUF file or the hub."""
    builtin = {k.lower(): k for k in BUILTIN_CONFIGS}
    if name.lower() in builtin:
        key = builtin[name.lower()]
        return shape_from_config(BUILTIN_CONFIGS[key], key)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            return shape_from_config(json.loads(path.read_text(encoding="utf-8")), name)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"{path} is not valid JSON ({exc.msg}); give a model's config.json") from None
    from peftlab.models.loading import gguf_cache_folder, resolve_model_source

    source = resolve_model_source(name)
    if source.gguf_file:
        cached = gguf_cache_folder(source) / "config.json"
        if cached.is_file():  # the dequantised copy peftlab made on the first run: instant
            return shape_from_config(json.loads(cached.read_text()), name)
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        meta = load_gguf_checkpoint(os.path.join(source.location, source.gguf_file), return_tensors=False)
        return shape_from_config(meta["config"], name)
    if source.is_local:
        return shape_from_config(json.loads((Path(source.location) / "config.json").read_text()), name)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeftlabError(f"cannot read the config of {name!r} ({first}). Offline? Pass its config.json or "
                           f"model folder with --model, or a built-in shape: {', '.join(BUILTIN_CONFIGS)}") from None
    return shape_from_config(config.to_dict(), name)


@dataclass
class PlanRequest:
    """What is planned: method, precision, batch shape and devices of a peftlab run."""

    method: str = "lora"
    quantization: str = "none"
    dtype: str = "bf16"                # compute precision of the frozen base
    device: str = "cuda"               # cuda | cpu: decides the runtime overhead and dropout mask size
    batch_size: int = 8                # training examples per micro-batch, split across the devices
    seq_len: int = 512                 # tokens per example (prompt, review and label word)
    devices: int = 1
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None
    virtual_tokens: int = 20
    evaluate_only: bool = False        # `peftlab eval`: no training step; adapter: an adapter is loaded
    adapter: bool = True
    eval_batch_size: int = 16          # peftlab's scoring batches: at most this many examples ...
    max_batch_tokens: int = 8192       # ... and this many tokens, padding included

    def __post_init__(self):
        if self.method not in PLANNED_METHODS:
            raise PeftlabError(f"the planner sizes {' and '.join(PLANNED_METHODS)}, not {self.method!r}")
        for key, value, choices in (("quantization", self.quantization, QUANTIZATIONS),
                                    ("strategy", self.strategy, STRATEGIES), ("dtype", self.dtype, tuple(BYTES)),
                                    ("device", self.device, ("cuda", "cpu"))):
            if value not in choices:
                raise PeftlabError(f"{key}={value!r} is not one of {', '.join(choices)}")
        for key in ("batch_size", "seq_len", "devices", "lora_r", "virtual_tokens", "eval_batch_size",
                    "max_batch_tokens"):
            if getattr(self, key) <= 0:
                raise PeftlabError(f"{key}={getattr(self, key)} must be > 0")


@dataclass
class MemoryPlan:
    """Bytes per device by component, for a training step and for an evaluation batch."""

    shape: ModelShape
    request: PlanRequest
    trainable: int
    train: dict[str, int] = field(default_factory=dict)
    eval: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The larger of the two: a training run evaluates after every epoch with its optimiser alive."""
        return max(sum(self.train.values()), sum(self.eval.values()))  # train is {} for evaluate_only

    def verdict(self, device_memory: int) -> str:
        share = self.peak / device_memory
        return "fits" if share <= FITS_SHARE else "tight (may not fit)" if share <= 1.0 else "does NOT fit"


def lora_targets(shape: ModelShape, targets: list[str] | None) -> list[str]:
    """The linear layers LoRA adapts: as given, else peft's default for the architecture."""
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        targets = defaults.get(shape.model_type, ["q_proj", "v_proj"])
    if targets in ("all-linear", ["all-linear"]):
        targets = list(shape.linears())
    unknown = [t for t in targets if t not in shape.linears()]
    if unknown:
        raise PeftlabError(f"the planner knows the LLaMA-style linear layers {', '.join(shape.linears())}, "
                           f"not {', '.join(unknown)}")
    return list(targets)


def trainable_parameters(shape: ModelShape, req: PlanRequest) -> int:
    if req.method == "prompt-tuning":
        return req.virtual_tokens * shape.hidden
    linears = shape.linears()
    return shape.layers * sum(req.lora_r * sum(linears[t]) for t in lora_targets(shape, req.lora_target_modules))


def layer_activation_bytes(shape: ModelShape, req: PlanRequest, tokens_per_row: int, act: int) -> float:
    """Bytes one decoder layer saves for backward, per token (a frozen base: weights need no saved input)."""
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    norms = 2 * 4 * h                  # each RMSNorm upcasts its input to fp32 and keeps it
    # SDPA keeps q, k, v and its output, k and v repeated to all heads (transformers passes GQA to
    # SDPA only without a padding mask, and peftlab's batches are padded), plus the fp32 logsumexp ...
    attention = act * 4 * q + 4 * shape.heads
    mask = act * tokens_per_row        # ... and a float copy of the padding mask (B, 1, T, T), per layer
    mlp = 3 * act * i                  # SwiGLU keeps gate, silu(gate) and up
    lora = 0
    if req.method == "lora":
        # peft casts the input to the fp32 adapter and lora_A keeps it; dropout keeps its mask too
        # (fp32 on the CPU, bool on CUDA: measured on the CPU, the CUDA figure from native_dropout).
        mask_bytes = 0 if req.lora_dropout == 0 else 4 if req.device == "cpu" else 1
        lora = sum((4 + mask_bytes) * shape.linears()[t][0] for t in lora_targets(shape, req.lora_target_modules))
    return norms + attention + mask + mlp + lora


def weight_bytes(shape: ModelShape, req: PlanRequest, training: bool) -> int:
    """The frozen base on one device (all of it with DDP; a 1/N shard with FSDP)."""
    act = BYTES[req.dtype]
    if req.quantization == "none":
        total = shape.parameters() * act
    else:
        linear = shape.linear_parameters()
        total = linear * QUANT_BITS[req.quantization] / 8
        if req.quantization == "8bit":
            total += 4 * shape.layers * sum(out for _, out in shape.linears().values())
        # peft's prepare_model_for_kbit_training casts what is not quantised to fp32 for training.
        total += shape.other_parameters() * (4 if training else act)
    return int(total / (req.devices if req.strategy == "fsdp" else 1))


def eval_rows(req: PlanRequest, row: int) -> int:
    """Examples per scoring batch: peftlab's length-grouped batches at the longest rows."""
    return max(1, min(req.eval_batch_size, req.max_batch_tokens // row))


def plan_memory(shape: ModelShape, req: PlanRequest) -> MemoryPlan:
    """Expected peak bytes per device of a training step and of an evaluation batch."""
    # The quantised path computes in bf16 inside each layer but keeps the residual stream in fp32:
    # prepare_model_for_kbit_training made the embeddings fp32, and bitsandbytes returns its input's dtype.
    act = 4 if req.quantization != "none" else BYTES[req.dtype]
    virtual = req.virtual_tokens if req.method == "prompt-tuning" else 0
    row = req.seq_len + virtual
    trainable = trainable_parameters(shape, req)
    plan = MemoryPlan(shape=shape, request=req, trainable=trainable)
    per_layer = layer_activation_bytes(shape, req, row, act)
    rows = math.ceil(req.batch_size / req.devices)  # peftlab splits each training batch across the processes
    tokens = rows * row
    largest = max(a * b for a, b in shape.linears().values())
    layer_params = sum(a * b for a, b in shape.linears().values()) + 2 * shape.hidden
    gathered = 2 * layer_params * BYTES[req.dtype]  # FSDP: the layer computing and the one prefetched

    # Training: weights + adapter state + saved activations + the backward working set of one layer.
    if req.gradient_checkpointing:
        saved = shape.layers * act * shape.hidden * tokens  # only each layer's input is kept
    else:
        saved = shape.layers * per_layer * tokens
    saved += 4 * shape.hidden * tokens                     # the final norm's fp32 input
    # Logits: peftlab reads one position per example, but the LM head runs on every (row, kept
    # position) pair: B x K x vocab with K <= B distinct positions; then fp32 log-softmax and its grad.
    logits = rows ** 2 * shape.vocab * BYTES[req.dtype] + 3 * rows * shape.vocab * 4
    temporaries = int(per_layer * tokens)                  # one layer's backward (or recomputed forward)
    temporaries += rows * row * row * (1 + act)            # the 4D attention mask, bool and float
    if req.quantization != "none":
        temporaries += 2 * largest * 2                     # bf16 dequantised copies of the largest weight
    if req.strategy == "fsdp" and req.devices > 1:
        temporaries += gathered                            # all-gathered layers: this one and the next
    if req.devices > 1:
        temporaries += 4 * trainable                       # flat buffer of the gradient all-reduce
    runtime = RUNTIME_BYTES[req.device]
    if not req.evaluate_only:
        plan.train = {"weights": weight_bytes(shape, req, training=True), "adapters": 4 * trainable,
                      "gradients": 4 * trainable, "optimiser": 8 * trainable, "activations": int(saved),
                      "logits": int(logits), "temporaries": int(temporaries), "runtime": runtime}

    # Evaluation (after each epoch, optimiser alive): peftlab's scoring batches, no saved activations.
    n_eval = eval_rows(req, row)
    eval_tokens = n_eval * row
    # Inference frees each intermediate when its consumer has run: the peak is the widest stage of one
    # layer: the MLP (silu(gate), up, their product, and three (T, h): residual, norm, output), the
    # RMSNorm (residual + three fp32 temporaries) or attention (q, k, v and k, v repeated, output).
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    act = BYTES[req.dtype] if req.evaluate_only else act  # `peftlab eval` skips the k-bit training preparation
    kv = shape.kv_heads * shape.head_dim
    stage = max(3 * act * i + 3 * act * h, act * h + 12 * h, act * (2 * h + 3 * q + 2 * kv))
    working = eval_tokens * stage + n_eval * row * row * (1 + act)  # + the 4D mask, bool and float
    if req.quantization != "none":
        working += largest * 2
    if req.strategy == "fsdp" and req.devices > 1:
        working += gathered
    eval_logits = n_eval ** 2 * shape.vocab * BYTES[req.dtype] + 2 * n_eval * shape.vocab * 4
    adapter = 4 * trainable if req.adapter or not req.evaluate_only else 0
    plan.eval = {"weights": weight_bytes(shape, req, training=not req.evaluate_only), "adapters": adapter,
                 "gradients": 0, "optimiser": 0 if req.evaluate_only else 8 * trainable, "activations": 0,
                 "logits": int(eval_logits), "temporaries": int(working), "runtime": runtime}
    return plan


def detect_device_memory(device: str) -> tuple[int, str]:
    """(bytes, where from): the first GPU's memory, else the host's RAM."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"detected: {props.name}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "detected: host RAM"


def format_plan(plan: MemoryPlan, device_memory: int, memory_source: str) -> str:
    """The plan as a table: components per device for a training step and an evaluation batch."""
    s, r = plan.shape, plan.request
    method = (f"LoRA r={r.lora_r} on {','.join(lora_targets(s, r.lora_target_modules))}" if r.method == "lora"
              else f"prompt tuning, {r.virtual_tokens} virtual tokens")
    if r.evaluate_only:
        method = f"evaluation only, {'with an adapter: ' + method if r.adapter else 'zero-shot (n_train 0)'}"
    base = {"none": f"{r.dtype} base", "8bit": "8-bit LLM.int8 base", "4bit": "4-bit NF4 base (double quant)"}
    row = r.seq_len + (r.virtual_tokens if r.method == "prompt-tuning" else 0)
    scoring = f"scoring batches of {eval_rows(r, row)} x {row} tokens"
    if r.evaluate_only:
        work = f"{scoring} per device"
    else:
        method += f" ({plan.trainable / 1e6:.2f} M trainable)"
        per_device = f" ({math.ceil(r.batch_size / r.devices)} per device)" if r.devices > 1 else ""
        work = (f"batch {r.batch_size} x {r.seq_len} tokens{per_device}, {scoring}; gradient checkpointing "
                f"{'on' if r.gradient_checkpointing else 'off'}")
    lines = [f"model     {s.name}: {s.model_type}, {s.parameters() / 1e9:.2f} B parameters, {s.layers} layers, "
             f"hidden {s.hidden}, vocab {s.vocab}",
             f"run       {method}, {base[r.quantization]}, {r.dtype} compute",
             f"          {work}; {r.devices} {r.device} device(s), "
             f"{r.strategy if r.devices > 1 else 'single process'}",
             "", f"{'GiB per device':<16}{'train step':>12}{'evaluation':>12}"]
    cell = lambda part, key: f"{part[key] / GIB:>12.2f}" if key in part else f"{'-':>12}"  # noqa: E731
    for key in plan.eval:
        lines.append(f"{key:<16}{cell(plan.train, key)}{cell(plan.eval, key)}")
    totals = {"total": sum(plan.train.values())} if plan.train else {}
    lines.append(f"{'total':<16}{cell(totals, 'total')}{sum(plan.eval.values()) / GIB:>12.2f}")
    lines += ["", f"peak      {plan.peak / GIB:.2f} GiB of {device_memory / GIB:.1f} GiB per device ({memory_source}): "
              f"{plan.verdict(device_memory)} ({plan.peak / device_memory:.0%})"]
    if plan.verdict(device_memory) != "fits":
        hints = ([] if r.gradient_checkpointing else ["--gradient-checkpointing"]) + ["a smaller --batch-size"]
        hints += [] if r.quantization == "4bit" or r.strategy == "fsdp" else ["--quantization 4bit"]
        hints += [] if r.quantization != "none" else ["more --devices with --strategy fsdp"]
        lines.append(f"hint      try {', '.join(hints)}")
    if r.device == "cpu":
        lines.append("note      on the CPU, glibc's heap keeps freed blocks: resident memory ran 30-40% above these "
                     "figures (docs/memory-planner.md); MALLOC_MMAP_THRESHOLD_=65536 removes that")
    if s.model_type not in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite"):
        lines.append(f"note      {s.model_type} is estimated as a LLaMA-style decoder (SwiGLU, RMSNorm)")
    return "\n".join(lines)


def seq_len_for(max_input_tokens: int) -> int:
    """Tokens per example when only the input budget is known: the budget plus the Alpaca template (~64)."""
    return max_input_tokens + 64


def request_from_config(config, seq_len: int | None = None, devices: int = 1) -> PlanRequest:
    """The PlanRequest of a peftlab RunConfig: what `peftlab train` with the same flags would do."""
    import torch

    from peftlab.models.loading import device_type, dtype_name

    device = device_type(config.model.device)
    dtype = dtype_name(config.model.dtype, device)  # as loading does
    strategy = "ddp" if config.train.strategy == "auto" else config.train.strategy
    return PlanRequest(method=config.method.method, quantization=config.model.quantization, dtype=dtype,
                       device=device, batch_size=config.train.batch_size,
                       seq_len=seq_len or seq_len_for(config.prompt.max_input_tokens), devices=devices,
                       strategy=strategy, gradient_checkpointing=config.train.gradient_checkpointing,
                       lora_r=config.method.lora_r, lora_dropout=config.method.lora_dropout,
                       lora_target_modules=config.method.lora_target_modules,
                       virtual_tokens=config.method.virtual_tokens, evaluate_only=config.data.n_train == 0,
                       adapter=bool(config.adapter), eval_batch_size=config.eval.eval_batch_size,
                       max_batch_tokens=config.eval.max_batch_tokens)


def plan_report(config, seq_len: int | None = None, devices: int = 1, device_memory_gib: float | None = None) -> str:
    """`peftlab plan`: the table for a RunConfig, with the verdict against the device's memory."""
    req = request_from_config(config, seq_len, devices)
    shape = read_model_shape(config.model.name, config.model.revision, config.model.trust_remote_code)
    plan = plan_memory(shape, req)
    if device_memory_gib is not None:
        if device_memory_gib <= 0:
            raise PeftlabError(f"--device-memory {device_memory_gib} must be > 0 (GiB)")
        memory, source = int(device_memory_gib * GIB), "given"
    else:
        memory, source = detect_device_memory(req.device)
    return format_plan(plan, memory, source)


def plan_from_shape(config: dict, **request) -> dict:
    """The plan of a config.json-style mapping as plain numbers (GiB), for scripts such as bench/gpu_bench.py."""
    plan = plan_memory(shape_from_config(config, config.get("_name_or_path", "model")), PlanRequest(**request))
    out = {"train": {k: v / GIB for k, v in plan.train.items()}, "eval": {k: v / GIB for k, v in plan.eval.items()}}
    for part in [p for p in ("train", "eval") if out[p]]:
        out[f"{part}_total_gib"] = sum(out[part].values())
        # What torch.cuda.max_memory_allocated sees: everything but the runtime outside tensors.
        out[f"{part}_allocated_gib"] = out[f"{part}_total_gib"] - out[part]["runtime"]
    return out
