#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200, at most ~5 minutes (section timeouts sum to 300 s) so that a rerun fits in a
# 15-minute window. Run through the device tool with carry=[".whl"] (wheels built by
# scripts/gpu_wheels.sh; Transformer Engine is not carried: the te rows say "skipped").
# Sections in priority order, each under its own timeout; each writes its result file into $OUT
# as soon as it finishes, so a run cut short still returns what it measured:
#   1. GPU tests (pytest -m gpu): real FP8 scaled-matmul layers on CUDA against the CPU   -> gpu_tests.txt
#   2. MX/FP8 quantizers on CUDA equal the CPU results bit for bit (scripts/gpu_check.py)  -> quantizers.txt
#   3. the parity harness on CUDA (python -m train.parity)                                -> parity_*.json/.txt
#   4. step time, tokens/s and MFU: bf16 vs fp8_current / fp8_delayed on the torch backend
#      (real FP8 GEMMs) and emulated, at 125m and 1.3b on one GPU (bench.recipe_step)       -> bench_*.md
#   5. the scaled matmul kernels alone (bench.scaled_mm)                                   -> scaled_mm.md
#   6. a short fp8_delayed training run on the torch backend through DeepSpeed (NCCL)      -> run_fp8_delayed.txt
# Everything it prints also lands in $OUT/gpu_check.log. Status: not yet run on a GPU (no device
# was lent to the sessions that wrote it); README "GPU check" records the last run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
py=${PYTHON:-python3}
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --target .site .whl/*.whl
fi
# No editable install on the GPU image: train, recipes, bench and scripts import from the checkout
# (and the carried wheels from .site, when there are any).
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled LOWBIT_OUTPUTS="$OUT/outputs" LOWBIT_CACHE="$OUT/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/device.txt"
$py -c "from recipes.fp8.gemm import features; print(features('cuda').describe())" | tee -a "$OUT/device.txt"

section() { echo; echo "== $1 ($(date +%T))"; }

section "1. GPU tests"
timeout 40 $py -m pytest -q -m gpu tests/test_torch_backend.py tests/test_te_backend.py -p no:cacheprovider \
  > "$OUT/gpu_tests.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu_tests.txt"; tail -n 15 "$OUT/gpu_tests.txt"

section "2. quantizers: CUDA vs CPU bitwise"
timeout 25 $py scripts/gpu_check.py > "$OUT/quantizers.txt" 2>&1 || echo "gpu_check.py FAILED" >> "$OUT/quantizers.txt"
tail -n 5 "$OUT/quantizers.txt"

section "3. parity harness on CUDA"
for recipe in fp8_current fp8_rowwise; do
  timeout 30 $py -m train.parity --json "$OUT/parity_$recipe.json" --steps 5 --sequences 8 \
      +recipe=$recipe trainer.device=cuda data=pydoc > "$OUT/parity_$recipe.txt" 2>&1 \
    || echo "parity $recipe FAILED" >> "$OUT/parity_$recipe.txt"
  grep -v Warning "$OUT/parity_$recipe.txt" | tail -n 12
done

section "4. step time / tokens/s / MFU on one GPU"
for model in 125m 1.3b; do
  batch=$([ "$model" = 125m ] && echo 16 || echo 4)
  timeout 60 $py -m bench.recipe_step --device cuda --model $model --batch $batch --steps 8 --warmup 3 \
      --recipes fp8_current fp8_delayed --backends torch emulated > "$OUT/bench_$model.md" 2>&1 \
    || echo "bench $model FAILED (or cut by its timeout)" >> "$OUT/bench_$model.md"
  grep "|\|model=\|peak" "$OUT/bench_$model.md"
done

section "5. scaled matmul kernels"
timeout 15 $py -m bench.scaled_mm --device cuda --shapes 4096x4096x4096 8192x2048x8192 --reps 5 \
  > "$OUT/scaled_mm.md" 2>&1; grep "|" "$OUT/scaled_mm.md"

section "6. fp8_delayed on the torch backend through DeepSpeed"
timeout 40 $py train/run.py +recipe=fp8_delayed recipe.backend=torch model=20m trainer.max_steps=30 \
    trainer.log_every=10 trainer.global_batch_size=32 data=pydoc logger=none \
    hydra.run.dir="$OUT/outputs/fp8_delayed_torch" > "$OUT/run_fp8_delayed.txt" 2>&1 \
  || echo "run FAILED" >> "$OUT/run_fp8_delayed.txt"
grep "step \|lowbit" "$OUT/run_fp8_delayed.txt" | tail -n 5
section "done"
