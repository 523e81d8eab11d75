"""The command line: parse, build a config (defaults < adapter record < YAML < flags), call runs.

    peftlab eval    --model smollm2 --data aclImdb_v1.tar.gz --n-test 2000
    peftlab train   --method lora --n-train 500 --epochs 2 --out runs/lora
    peftlab predict --adapter runs/lora/adapter "A wonderful film."

Every flag is generated from the config dataclasses (peftlab.config), so `--help` is their
documentation; each command offers the flags of the keys it reads (READS below). A user mistake is a
PeftlabError: printed as one line, exit status 2. Nothing here imports torch before a command runs, so
`--help` and a mistyped flag answer at once (issue 15).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.train.preemption import EXIT_PREEMPTED, Preempted

COMMANDS = {
    "eval": "zero-shot evaluation of a model (or of --adapter) on the test subset",
    "train": "train an adapter (LoRA, prompt tuning, ...) and evaluate it after each epoch",
    "predict": "classify texts given as arguments, with --file, or on stdin",
    "plan": "expected peak memory per device of a train/eval run and whether it fits, from the model's "
            "config alone (no weights are read)",
}
EXPERIMENT_COMMANDS = {
    "sweep": "run a grid of cells from a sweep YAML into a results store (finished cells are skipped)",
    "report": "write tables (markdown, CSV), plots (PNG) and an HTML page from a results store",
    "tune": "hyper-parameter search on Optuna from a tune YAML (a run config + search: + tune:); a killed search "
            "continues where it stopped",
    "merge-stores": "copy the cells and sweeps of results stores written elsewhere (another machine, a GPU, another "
                    "worktree) into one store, so that one report shows them",
}
DEFAULT_STORE = "runs/sweeps/results.sqlite"
EXPORT_HELP = ("merge a LoRA-family adapter into its base model and save it as a plain Hugging Face folder "
               "(safetensors + tokenizer) for AutoModelForCausalLM.from_pretrained")
COMPARE_HELP = ("compare two runs scored on the same examples, example by example: each accuracy with its Wilson "
                "interval (95 percent), the examples only one of them gets right, and McNemar's exact paired test "
                "(B against A)")
RERUN_HELP = ("run RUN_DIR/config.yaml again into a new folder and say whether the sample, metrics and "
              "adapter came out the same")


# The config keys each command reads; a section name stands for all its keys. A command offers flags
# for these keys only, and a flag of another command is refused naming the command that reads it
# (litgpt's `validate_args` does the same), so no flag is silently ignored. A --config YAML may hold
# every section (a run's config.yaml, a train YAML given to `plan`): a command takes from it the keys
# it reads and ignores the rest.
READS = {
    "train": ("model", "data", "prompt", "method", "train", "eval", "track", "out", "overwrite"),
    "eval": ("model", "data", "prompt", "eval", "track", "adapter", "out", "overwrite", "train.objective",
             "train.strategy",  # run_eval joins the process group with it
             "train.resume"),   # a killed evaluation continues from its journalled scores
    "predict": ("model", "prompt", "eval", "adapter", "train.objective"),
    "plan": ("model", "method.method", "method.lora_r", "method.lora_dropout", "method.lora_target_modules",
             "method.virtual_tokens", "train.batch_size", "train.gradient_checkpointing", "train.strategy",
             "prompt.max_input_tokens", "data.n_train", "eval", "adapter"),  # models.planner.request_from_config
    "sweep": ("model", "data", "prompt", "method", "train", "eval", "track", "adapter", "out"),  # base overrides
    "tune": ("model", "data", "prompt", "method", "train", "eval", "track", "out"),  # base overrides of every trial
}
# Keys of a section above that the command does not read: evaluation draws no training sample and
# chooses no epoch, so it has no use for a validation split.
NOT_READ = {"eval": ("data.n_train", "data.n_val", "data.val_source")}


def command_keys(command: str) -> set[str]:
    """The config keys `command` reads (empty for rerun and report, which take no config flags)."""
    from peftlab.config import leaves

    reads, skip = READS.get(command, ()), NOT_READ.get(command, ())
    return {leaf.key for leaf in leaves()
            if (leaf.key in reads or leaf.key.split(".")[0] in reads) and leaf.key not in skip}


def add_config_flags(parser: argparse.ArgumentParser, command: str, config_file: bool = True) -> None:
    """One flag per config field the command reads; values stay strings here and are typed by the dataclasses."""
    from peftlab.config import leaves

    if config_file:
        parser.add_argument("--config", metavar="FILE", help="YAML config file (flags given here override it); it "
                            "may hold every section, this command takes the keys it has flags for")
    keys = command_keys(command)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves():
        if leaf.key not in keys:
            continue
        section = leaf.key.split(".")[0] if "." in leaf.key else "run"
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = "all" if leaf.key == "data.n_test" and leaf.default is None else leaf.default
        help_text = f"{leaf.help} [{leaf.key}, default: {default}]".replace("%", "%%")
        kwargs = {"nargs": "?", "const": "true"} if leaf.type is bool else {}
        group.add_argument(leaf.flag, dest=leaf.key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=help_text, **kwargs)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def foreign_flag(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """'peftlab eval does not use --lr (train.lr); it is a `peftlab train` option', or None.

    Checked on the words before argparse sees them, so that a flag of another command is never read as an
    abbreviation of one of this command's flags.
    """
    from peftlab.config import leaves

    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if not argv or subparsers is None or argv[0] not in subparsers.choices:
        return None
    command, own = argv[0], subparsers.choices[argv[0]]._option_string_actions
    by_flag = {leaf.flag: leaf.key for leaf in leaves()}
    for word in argv[1:]:
        if word == "--":
            break
        flag = word.split("=", 1)[0]
        if flag in own or flag not in by_flag:
            continue
        users = [f"`peftlab {c}`" for c in READS if c not in ("sweep", "tune") and by_flag[flag] in command_keys(c)]
        users = users or ["`peftlab sweep`"]
        which = users[0] if len(users) == 1 else ", ".join(users[:-1]) + " or " + users[-1]
        return f"peftlab {command} does not use {flag} ({by_flag[flag]}); it is a {which} option"
    return None


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other peftlab error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"peftlab: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="peftlab", description="Parameter-efficient fine-tuning of causal "
                    "language models for text classification.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_flags(p, name)
        if name == "predict":
            p.add_argument("texts", nargs="*", help="texts to classify (default: --file, else stdin)")
            p.add_argument("--file", help="a text file (one text per line), .jsonl or .csv with a 'text' column")
        if name == "plan":
            add_plan_flags(p)
    add_experiment_parsers(sub)
    add_export_parser(sub)
    p = sub.add_parser("compare", help=COMPARE_HELP, description=COMPARE_HELP)
    p.add_argument("run_a", metavar="RUN_A", help="the --out folder of a finished train or eval run, or a "
                   "finished cell of a results store, STORE.sqlite:KEY (its folder may be gone)")
    p.add_argument("run_b", metavar="RUN_B", help="another, scored on the same examples")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p = sub.add_parser("rerun", help=RERUN_HELP, description=RERUN_HELP)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a train or eval run")
    p.add_argument("--out", help="folder of the new run [default: RUN_DIR-rerun-<n>]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP + "; prompt-learning adapters have "
                       "nothing to merge and are refused")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter/ folder of a training run")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="precision of the saved "
                   "weights (the merge itself runs in fp32) [default: fp32]")
    p.add_argument("--model", help="base model (default: the one in the adapter's peftlab record)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """`peftlab plan`'s own flags; the model, method, batch size, quantisation etc. are the run's config flags."""
    g = p.add_argument_group("plan options")
    g.add_argument("--seq-len", type=int, help="tokens per example (default: --max-input-tokens + 64 for the template)")
    g.add_argument("--devices", type=int, default=1, help="processes/GPUs the run is spread over [default: 1]; "
                   "with --strategy fsdp the frozen base is sharded across them")
    g.add_argument("--device-memory", type=float, metavar="GIB", help="memory of one device in GiB "
                   "(default: the first GPU's, else the host's RAM)")


def add_experiment_parsers(sub) -> None:
    p = sub.add_parser("sweep", help=EXPERIMENT_COMMANDS["sweep"], description=EXPERIMENT_COMMANDS["sweep"] +
                       ". Flags override the sweep's base config (and its cases) for every cell; a flag "
                       "naming a grid key runs only that value of it.")
    p.add_argument("sweep_config", metavar="CONFIG.yaml", help="sweep YAML: a run config plus grid: {key: [values]} "
                   "(the product gives the cells) and/or cases: {name: {key: value or [values]}} (a union of "
                   "named settings, each crossed with the grid)")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"results store (SQLite) [default: {DEFAULT_STORE}]")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their estimated cost; run nothing")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep them failed)")
    p.add_argument("--workers", type=int, help="run the cells in parallel on this many Ray workers, one cell per "
                   "GPU (or per share of the CPUs); overrides the YAML's ray.workers [default: one after another]")
    p.add_argument("--ray-address", help="Ray cluster to join ('auto', 'ray://host:10001') [default: start a "
                   "local one]; overrides ray.address")
    add_config_flags(p, "sweep", config_file=False)
    p = sub.add_parser("report", help=EXPERIMENT_COMMANDS["report"], description=EXPERIMENT_COMMANDS["report"])
    p.add_argument("stores", nargs="+", metavar="STORE", help="results store(s) written by `peftlab sweep`; "
                   "several give one report")
    p.add_argument("--out", help="report folder [default: report/ beside the (first) store]")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p = sub.add_parser("merge-stores", help=EXPERIMENT_COMMANDS["merge-stores"],
                       description=EXPERIMENT_COMMANDS["merge-stores"] + ". A finished cell replaces a missing, "
                       "running or failed one; a cell already finished in INTO is kept; a sweep gains the cells it "
                       "lacks. One transaction: INTO is either merged or untouched.")
    p.add_argument("into", metavar="INTO", help="the store to merge into (created if missing; not while a sweep "
                   "writes it)")
    p.add_argument("sources", nargs="+", metavar="FROM", help="stores to copy from (read only; a sweep may be "
                   "writing them)")
    add_tune_parser(sub)


def add_tune_parser(sub) -> None:
    import dataclasses

    from peftlab.experiments.search_space import TuneSpec

    import textwrap

    fields = "\n".join(textwrap.fill(f"tune.{f.name}: {f.metadata['help']} [default: {f.default}]", 100,
                                      initial_indent="  ", subsequent_indent="      ")
                        for f in dataclasses.fields(TuneSpec))
    epilog = ("The YAML is a run config (model:, data: with n_val > 0, method:, train:, ...) plus\n"
              "search: dotted config key -> distribution, one of\n"
              "  train.lr: loguniform(1e-5, 1e-2)    method.lora_dropout: uniform(0, 0.3)\n"
              "  method.virtual_tokens: int(4, 80)   (int(4, 80, log): on a log scale)\n"
              "  method.lora_r: [4, 8, 16]           (a list: categorical)\n"
              "tune: (optional)\n" + fields + "\n"
              "--out OUT is the search's folder [default: runs/tune/<study>]; it gets study.sqlite3 (watch it live:\n"
              "optuna-dashboard sqlite:///OUT/study.sqlite3), trials/ (one run per trial, validation only), best-run/\n"
              "(the best config, test subset scored once), best.yaml (runs with `peftlab train --config`), best.json,\n"
              "trials.csv, trials.md and plots/.\n"
              "Trials run one after another, or N at a time on Ray workers with --workers N (or a ray: section as\n"
              "in a sweep YAML: workers, address, gpus_per_worker, cpus_per_worker, max_worker_losses). The driver\n"
              "alone writes the study and the store; a worker that dies costs its trial one attempt. In parallel a\n"
              "trial's value equals a serial run of its parameters, but which trials are asked after TPE's startup\n"
              "trials, and which are pruned, depend on timing (constant-liar TPE).")
    p = sub.add_parser("tune", help=EXPERIMENT_COMMANDS["tune"], description=EXPERIMENT_COMMANDS["tune"],
                       epilog=epilog.replace("%", "%%"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tune_config", metavar="CONFIG.yaml", help="tune YAML (see below)")
    p.add_argument("--store", help="results store (SQLite) the trials are cells of; give a sweep's store to reuse "
                   "its finished cells [default: OUT/results.sqlite]")
    p.add_argument("--workers", type=int, help="run this many trials at a time on Ray workers, one per GPU (or per "
                   "share of the CPUs); overrides the YAML's ray.workers [default: one after another]")
    p.add_argument("--ray-address", help="Ray cluster to join ('auto', 'ray://host:10001') [default: start a "
                   "local one]; overrides ray.address")
    add_config_flags(p, "tune", config_file=False)


def run_tune_command(args: argparse.Namespace) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise PeftlabError("peftlab tune needs Optuna: pip install 'peftlab[tune]'") from None
    from peftlab.experiments import ResultsStore
    from peftlab.experiments.tune import load_tune, run_tune

    overrides = {k: v for k, v in vars(args).items() if "." in k}
    tune = load_tune(args.tune_config, overrides, out=getattr(args, "out", None))  # --out: the search's folder
    ray_options = parallel_options(tune.ray, args.workers, args.ray_address)
    with ResultsStore(args.store or tune.out / "results.sqlite", writer=True) as store:
        if ray_options is None:
            outcome = run_tune(tune, store, progress=False if args.quiet else None)
        else:
            from peftlab.experiments.tune_parallel import run_tune_parallel

            outcome = run_tune_parallel(tune, store, ray_options)
    test = outcome.test
    print(f"tune {tune.name}: best {tune.spec.objective} {outcome.best_value:.4f} with {outcome.best_params}; "
          f"test accuracy {test['accuracy']:.2%} (95% CI {test['ci95'][0]:.2%}-{test['ci95'][1]:.2%}) -> "
          f"{outcome.paths['best_yaml']}")
    return 0


def merge_stores(into: str, sources: list[str]) -> int:
    from peftlab.experiments import ResultsStore

    for source in sources:
        if Path(source).expanduser().resolve() == Path(into).expanduser().resolve():
            raise PeftlabError(f"{source} is the store merged into; give INTO once and the other stores after it")
    with ResultsStore(into, writer=True) as target:
        for source in sources:
            with ResultsStore(source) as other:
                counts = target.merge_from(other)
            print(f"merged {source} into {into}: {counts.describe()}")
    return 0


def run_experiment_command(args: argparse.Namespace) -> int:
    """`peftlab sweep`, `peftlab report` and `peftlab tune`."""
    if args.command == "tune":
        return run_tune_command(args)
    if args.command == "merge-stores":
        return merge_stores(args.into, args.sources)
    if args.command == "report":
        from peftlab.report import write_report

        out = args.out or Path(args.stores[0]).expanduser().parent / "report"
        paths = write_report(args.stores, out, plots=not args.no_plots)
        print(f"report: {paths['html']} (markdown {paths['markdown']}, CSV in {paths['tables']})")
        return 0
    quiet_libraries()
    from peftlab.experiments import ResultsStore, load_sweep, run_sweep

    overrides = {k: v for k, v in vars(args).items() if "." in k or k == "adapter"}
    sweep = load_sweep(args.sweep_config, overrides, out=getattr(args, "out", None))
    # The store records the whole table (grid.Sweep.members), so the command kept with it runs the whole table:
    # a flag that runs one value of a grid key (`--n-train 500`, one row) is left out of it.
    sweep.command = sweep_command(args.sweep_config, {k: v for k, v in overrides.items() if k not in sweep.grid},
                                  sweep.out, args.store)
    if args.dry_run:
        from peftlab.experiments.estimate import estimate_sweep, format_estimates

        store = ResultsStore(args.store) if Path(args.store).expanduser().is_file() else None
        try:
            print(format_estimates(sweep, estimate_sweep(sweep, store), args.store))
        finally:
            if store is not None:
                store.close()
        return 0
    ray_options = parallel_options(sweep.ray, args.workers, args.ray_address)
    with ResultsStore(args.store, writer=True) as store:
        if ray_options is None:
            outcome = run_sweep(sweep, store, progress=False if args.quiet else None, retry_failed=args.retry_failed)
        else:
            from peftlab.experiments.parallel import run_sweep_parallel

            outcome = run_sweep_parallel(sweep, store, ray_options, retry_failed=args.retry_failed)
    print(f"sweep {sweep.name}: {len(outcome.ran)} cells run, {len(outcome.skipped)} already done, "
          f"{len(outcome.failed)} failed -> {args.store}; `peftlab report {args.store}` writes the tables")
    return 1 if outcome.failed else 0


def parallel_options(from_yaml, workers: int | None, address: str | None):
    """The YAML's `ray:` section with the flags on top; None for a serial sweep or tune."""
    import dataclasses

    from peftlab.experiments.grid import RayOptions

    if from_yaml is None and workers is None and address is None:
        return None
    options = from_yaml or RayOptions()
    changes = {k: v for k, v in (("workers", workers), ("address", address)) if v is not None}
    return dataclasses.replace(options, **changes)


def sweep_command(path: str, overrides: dict, out, store: str) -> str:
    """The command line that reruns this sweep, kept in the store for the report."""
    import shlex

    from peftlab.config import leaves

    flags = {leaf.key: leaf.flag for leaf in leaves()}
    words = ["peftlab", "sweep", path] + [w for k, v in overrides.items() for w in (flags[k], str(v))]
    return shlex.join(words + ["--out", str(out), "--store", store])


def resolve_config(args: argparse.Namespace):
    """Merge the layers into a validated RunConfig."""
    from peftlab.config import build_config, flatten, load_yaml

    reads = command_keys(args.command)
    given = {k: v for k, v in vars(args).items() if k in reads}
    yaml_layer = flatten(load_yaml(args.config), args.config) if args.config else {}
    yaml_layer = {k: v for k, v in yaml_layer.items() if k in reads}  # see READS: the rest is another command's
    adapter = given.get("adapter", yaml_layer.get("adapter"))
    record_layer = adapter_layer(adapter) if adapter else {}
    return build_config(record_layer, yaml_layer, given)


def adapter_layer(adapter: str) -> dict:
    """The model and prompt an adapter was trained with, so that eval/predict use them by default."""
    from peftlab.records import read_adapter_record

    if not Path(adapter).is_dir():
        raise PeftlabError(f"adapter folder {adapter} does not exist; give the adapter/ folder of a training run")
    record = read_adapter_record(adapter)
    if record is None:
        return {}
    config, prompt = record.get("config", {}), record.get("prompt", {})
    layer = {f"prompt.{k}": v for k, v in config.get("prompt", {}).items()}
    layer["model.name"] = config.get("model", {}).get("name", "smollm2")
    if "objective" in config.get("train", {}):  # a head adapter is scored by its head (issue 13)
        layer["train.objective"] = config["train"]["objective"]
    layer["prompt.instruction"] = prompt.get("instruction", layer.get("prompt.instruction"))
    if prompt.get("words_by_class"):
        layer["prompt.label_words"] = prompt["words_by_class"]
    evaluate = config.get("eval", {})  # decide as the run did (issue 13); a validation prior needs its split
    layer.update({f"eval.{k}": evaluate[k] for k in ("score_norm", "calibration") if evaluate.get(k, "val") != "val"})
    return layer


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise PeftlabError(f"--file {path} does not exist")
        if path.suffix in (".jsonl", ".csv", ".tsv", ".json", ".parquet"):
            from peftlab.data.sources import read_rows

            rows = read_rows(path)
            if rows and "text" not in rows[0]:
                raise PeftlabError(f"--file {path} has no 'text' column")
            return [str(r["text"]) for r in rows]
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()]
    if sys.stdin is not None and not sys.stdin.isatty():
        # Untrusted bytes: invalid UTF-8 becomes U+FFFD instead of a UnicodeDecodeError.
        text = sys.stdin.buffer.read().decode("utf-8", "replace") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    return []


def run_command(args: argparse.Namespace) -> int:
    if args.command in EXPERIMENT_COMMANDS:
        return run_experiment_command(args)
    if args.command == "rerun":
        return rerun_command(args)
    if args.command == "compare":
        from peftlab.evaluate.paired import compare_bits, compare_runs, describe_comparison
        from peftlab.experiments.store import stored_correct_bits

        bits = [stored_correct_bits(run) for run in (args.run_a, args.run_b)]
        result = (compare_runs(args.run_a, args.run_b) if bits == [None, None]
                  else compare_bits(args.run_a, bits[0], args.run_b, bits[1]))
        print(json.dumps(result) if args.json else describe_comparison(result))
        return 0
    if args.command == "export":
        quiet_libraries()
        from peftlab.models.export import export_merged

        print(f"merged model: {export_merged(args.adapter, args.out, args.dtype, args.model)}")
        return 0
    config = resolve_config(args)
    progress = False if args.quiet else None
    quiet_libraries()
    if args.command == "plan":
        from peftlab.models.planner import plan_report

        print(plan_report(config, args.seq_len, args.devices, args.device_memory))
        return 0
    from peftlab import runs

    if args.command == "predict":
        texts = read_texts(args)
        from peftlab.records import read_adapter_record

        record = read_adapter_record(config.adapter) if config.adapter else None
        classes = record["prompt"]["classes"] if record else None
        for row in runs.predict(texts, config, classes=classes):
            print(json.dumps(row, ensure_ascii=False))
        return 0
    from peftlab.distributed import leave_cluster
    from peftlab.tracking import run_tracked

    try:
        metrics = run_tracked(args.command, config, progress=progress)  # plain run_train/run_eval without trackers
    finally:
        leave_cluster()  # launched on several processes (accelerate launch, torchrun): end torch.distributed
    if os.environ.get("RANK", "0") == "0":  # one summary line, from rank 0
        print(summary_line(metrics))
    return 0


def rerun_command(args: argparse.Namespace) -> int:
    quiet_libraries()
    from peftlab.rerun import rerun

    metrics, same = rerun(args.run_dir, args.out, progress=False if args.quiet else None)
    print(summary_line(metrics))
    if not same["original_finished"]:
        print(f"{args.run_dir} did not finish: nothing to compare with")
        return 0
    checks = {"training sample": same["same_train_sample"], "test sample": same["same_test_sample"],
              "accuracy": same["same_accuracy"], "per-epoch metrics": same["same_per_epoch"],
              "adapter sha256": same["same_adapter"]}
    words = [f"{name} {'same' if ok else 'DIFFERENT'}" for name, ok in checks.items() if ok is not None]
    versions = f" (versions changed: {', '.join(same['changed_versions'])})" if same["changed_versions"] else ""
    print(f"compared with {args.run_dir}: {', '.join(words)}{versions}")
    return 0


def summary_line(metrics: dict) -> str:
    low, high = metrics["ci95"]
    text = (f"accuracy {metrics['accuracy']:.2%} (95% CI {low:.2%}-{high:.2%}, n={metrics['n']}), "
            f"eval {metrics['eval_tokens_per_s']:.0f} tok/s")
    if "best_epoch" in metrics:
        text += (f", best epoch {metrics['best_epoch']}, train {metrics['train_tokens_per_s']:.0f} tok/s")
    return text + f" -> {metrics['out']}"


def quiet_libraries() -> None:
    """Silence transformers' and peft's noise; called when a command runs, not for --help or a bad flag,
    which must answer without importing torch (issue 15)."""
    import transformers

    transformers.logging.disable_progress_bar()  # weight-loading bars: noise around peftlab's own
    # peft asks transformers for a renamed property on every get_peft_model: noise, not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    refused = foreign_flag(parser, argv)
    if refused:
        parser.exit(2, f"peftlab: error: {refused}; see `peftlab {argv[0]} --help`\n")
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except PeftlabError as exc:
        print(f"peftlab: error: {' '.join(str(exc).split(chr(10)))}", file=sys.stderr)  # one line, always
        return 2
    except Preempted as stopped:  # SIGTERM or a first Ctrl-C during training (peftlab.train.preemption)
        print(f"peftlab: interrupted: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("peftlab: interrupted; finished results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
