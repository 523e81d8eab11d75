#!/usr/bin/env bash
# The closing-note figures of the core pipeline (issue 2): SmolLM2-135M-Instruct, IMDB, 2000 balanced
# test reviews cut to 128 tokens (head+tail), data_seed 0, seed 0. Run from the repository root.
# (The two training runs were killed once while the machine was overloaded and continued with --resume.)
set -euo pipefail
DATA=${DATA:-../shared/data/aclImdb_labeled.tar.gz}
peftlab eval  --data "$DATA" --n-test 2000 --max-input-tokens 128 --out results/core/zero-shot --quiet
peftlab train --data "$DATA" --n-test 2000 --max-input-tokens 128 --method lora --n-train 500 --epochs 2 \
    --out results/core/lora-n500 --quiet --resume
peftlab train --data "$DATA" --n-test 2000 --max-input-tokens 128 --method prompt-tuning --n-train 500 --epochs 2 \
    --out results/core/prompt-tuning-n500 --quiet --resume
