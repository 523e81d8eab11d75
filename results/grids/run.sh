#!/usr/bin/env bash
# The measured SmolLM2 grids of the study's tables 2 and 3 (issue 3), quick variants that fit this 2-core
# CPU: N in {50, 150, 500} (no 2500), 200 balanced test reviews (data_seed 0; 95% CI about +-6 points),
# reviews cut to 64 tokens (head+tail), best of 2 epochs, seed 0. Run from the repository root; about
# 25 minutes per grid on an idle 2-core machine. A killed sweep continues where it stopped when started again.
# With the committed stores (the default) every cell is already finished and only the report is written;
# STORES=runs/fresh bash results/grids/run.sh runs every cell again.
set -euo pipefail
DATA=${DATA:-../shared/data/aclImdb_labeled.tar.gz}
STORES=${STORES:-results/grids/stores}
peftlab sweep configs/sweeps/smollm2-lora-quick.yaml --data "$DATA" \
    --store "$STORES/lora-quick.sqlite" --out runs/sweeps/lora-quick --quiet
peftlab sweep configs/sweeps/smollm2-prompt-tuning-quick.yaml --data "$DATA" \
    --store "$STORES/prompt-tuning-quick.sqlite" --out runs/sweeps/prompt-tuning-quick --quiet
# One report from both stores: report.md, report.html (self-contained), tables/*.csv, plots/*.png
peftlab report "$STORES/lora-quick.sqlite" "$STORES/prompt-tuning-quick.sqlite" --out results/grids
