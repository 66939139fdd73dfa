#!/usr/bin/env bash
# Build .whl/: the CPython 3.12 x86-64 wheels the lent GPU image lacks (DeepSpeed, Hydra,
# datasets and their pure-Python dependencies; ~6 MB). The image has torch 2.11 (CUDA 13),
# numpy, pyarrow, tokenizers, transformers, rich, tqdm, pytest; see shared/notes/gpu_image.md.
# W&B is not carried (its wheel bundles a large Go binary): GPU checks run with W&B disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
bin=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d .whl)
pip download -q "${bin[@]}" pydantic-core==2.41.5 pydantic==2.12.5 annotated-types typing-inspection \
    hydra-core==1.3.2 omegaconf==2.3.0 datasets==5.2.0 dill multiprocess hjson xxhash fsspec \
    2>/dev/null || pip download -q "${bin[@]}" pydantic pydantic-core annotated-types typing-inspection \
    hydra-core omegaconf datasets dill multiprocess hjson
# sdist-only packages become py3-none-any wheels here
pip wheel -q --no-deps -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
ls -la .whl && du -sh .whl
