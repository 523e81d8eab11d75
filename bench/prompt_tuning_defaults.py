"""How prompt tuning's defaults were chosen: loss x learning rate on SmolLM2 (issue 2, "prompt tuning must learn").

    python bench/prompt_tuning_defaults.py --data ../shared/data/aclImdb_labeled.tar.gz

N=400 training reviews, one epoch, 200 test reviews, reviews cut to 128 tokens, V=20 virtual tokens
initialised from the instruction text; the base model is loaded once and shared by the cells.
"""

from __future__ import annotations

import argparse
import json
import time

from peftlab.config import build_config
from peftlab.models import load_base_model
from peftlab.runs import run_train

VARIANTS = {"lm-3e-2": {"train.loss": "lm", "train.lr": 3e-2},
            "classes-3e-2": {"train.loss": "classes", "train.lr": 3e-2},
            "classes-3e-1": {"train.loss": "classes", "train.lr": 3e-1},
            "lm-3e-1": {"train.loss": "lm", "train.lr": 3e-1}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="/tmp/pt-defaults")
    args = parser.parse_args()
    base = {"data.source": args.data, "data.n_train": 400, "data.n_test": 200, "prompt.max_input_tokens": 128,
            "train.epochs": 1, "method.method": "prompt-tuning", "method.virtual_tokens": 20,
            "method.prompt_init": "text"}
    model, tokenizer = load_base_model(build_config(base).model)
    for name in args.variants.split(","):
        cfg = build_config({**base, **VARIANTS[name], "out": f"{args.out}/{name}"})
        start = time.time()
        m = run_train(cfg, model, tokenizer, progress=False)
        print(json.dumps({"variant": name, "accuracy": m["accuracy"], "train_loss": m["per_epoch"][0]["train_loss"],
                          "seconds": round(time.time() - start), "train_tokens_per_s": m["train_tokens_per_s"]}),
              flush=True)


if __name__ == "__main__":
    main()
