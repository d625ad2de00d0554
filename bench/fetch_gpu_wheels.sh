#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on the lent GPU machine and cannot get there (it has no
# network, and ../shared does not travel): run here, once, before the `run` call that carries
# [".whl"] (docs/benchmarks.md, "GPU check").
#
#   bash bench/fetch_gpu_wheels.sh [DEST]     # DEST defaults to .whl (git-ignored)
#
# 1. Wheels for Python 3.12 (the GPU image's python3) of what its image lacks: nltk (+ defusedxml),
#    trl (+ datasets, dill, multiprocess) and gguf. Pure Python, ~4 MB in all. Everything else
#    they require (accelerate, transformers, pandas, pyarrow, xxhash, fsspec, requests, ...) is in
#    the image. Versions: those of the CPU benchmarks in docs/benchmarks.md.
# 2. DEST/data: the SmolLM tokenizer.json and the HH-RLHF test splits from ../shared/data (the
#    layout of ../shared/data, so SMOLLM_SHARED_DATA can point at it; bench/gpu_check.py looks
#    there when ../shared/data is absent), and nltk_data unless dpo/bundled has it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DEST=${1:-.whl}
SHARED=${SMOLLM_SHARED_DATA:-$REPO/../shared/data}
WHEELS=(nltk==3.10.4 defusedxml==0.7.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        gguf==0.19.0)

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

# Two versions of one distribution stop the whole install there: refuse them here.
dupes=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-.' 'a-z__' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "fetch_gpu_wheels: error: $DEST holds several versions of: $dupes; remove all but one" >&2
    exit 1
fi

mkdir -p "$DEST/data/smollm-135m"
cp "$SHARED/smollm-135m/tokenizer.json" "$DEST/data/smollm-135m/"
cp -r "$SHARED/hh-rlhf" "$DEST/data/"
if [ ! -d dpo/bundled/nltk_data ]; then
    cp -r "$SHARED/nltk_data" "$DEST/data/"
fi
chmod -R u+w "$DEST/data"  # ../shared is read-only; the copy must be replaceable next time
du -sh "$DEST"
