"""The command line: parse, build a config (defaults < adapter record < YAML < flags), call runs.

    peftlab eval    --model smollm2 --data aclImdb_v1.tar.gz --n-test 2000
    peftlab train   --method lora --n-train 500 --epochs 2 --out runs/lora
    peftlab predict --adapter runs/lora/adapter "A wonderful film."

Every flag is generated from the config dataclasses (peftlab.config), so `--help` is their
documentation. A user mistake is a PeftlabError: printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftlab.errors import PeftlabError

COMMANDS = {
    "eval": "zero-shot evaluation of a model (or of --adapter) on the test subset",
    "train": "train an adapter (LoRA, prompt tuning, ...) and evaluate it after each epoch",
    "predict": "classify texts given as arguments, with --file, or on stdin",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; values stay strings here and are typed by the dataclasses."""
    from peftlab.config import leaves

    parser.add_argument("--config", metavar="FILE", help="YAML config file (flags given here override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves():
        section = leaf.key.split(".")[0] if "." in leaf.key else "run"
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = "all" if leaf.key == "data.n_test" and leaf.default is None else leaf.default
        help_text = f"{leaf.help} [{leaf.key}, default: {default}]".replace("%", "%%")
        kwargs = {"nargs": "?", "const": "true"} if leaf.type is bool else {}
        group.add_argument(leaf.flag, dest=leaf.key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=help_text, **kwargs)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of causal "
                                     "language models for text classification.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_flags(p)
        if name == "predict":
            p.add_argument("texts", nargs="*", help="texts to classify (default: --file, else stdin)")
            p.add_argument("--file", help="a text file (one text per line), .jsonl or .csv with a 'text' column")
    return parser


def resolve_config(args: argparse.Namespace):
    """Merge the layers into a validated RunConfig."""
    from peftlab.config import build_config, flatten, load_yaml

    given = {k: v for k, v in vars(args).items() if "." in k or k in ("adapter", "out")}
    yaml_layer = flatten(load_yaml(args.config), args.config) if args.config else {}
    adapter = given.get("adapter", yaml_layer.get("adapter"))
    record_layer = adapter_layer(adapter) if adapter and args.command != "train" else {}
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
    layer["prompt.instruction"] = prompt.get("instruction", layer.get("prompt.instruction"))
    if prompt.get("words_by_class"):
        layer["prompt.label_words"] = prompt["words_by_class"]
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
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return []


def run_command(args: argparse.Namespace) -> int:
    from peftlab import runs

    config = resolve_config(args)
    progress = False if args.quiet else None
    if args.command == "predict":
        texts = read_texts(args)
        from peftlab.records import read_adapter_record

        record = read_adapter_record(config.adapter) if config.adapter else None
        classes = record["prompt"]["classes"] if record else None
        for row in runs.predict(texts, config, classes=classes):
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if args.command == "eval":
        metrics = runs.run_eval(config, progress=progress)
    else:
        metrics = runs.run_train(config, progress=progress)
    print(summary_line(metrics))
    return 0


def summary_line(metrics: dict) -> str:
    low, high = metrics["ci95"]
    text = (f"accuracy {metrics['accuracy']:.2%} (95% CI {low:.2%}-{high:.2%}, n={metrics['n']}), "
            f"eval {metrics['eval_tokens_per_s']:.0f} tok/s")
    if "best_epoch" in metrics:
        text += (f", best epoch {metrics['best_epoch']}, train {metrics['train_tokens_per_s']:.0f} tok/s")
    return text + f" -> {metrics['out']}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.disable_progress_bar()  # weight-loading bars: noise around peftlab's own
    try:
        return run_command(args)
    except PeftlabError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted; finished results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
