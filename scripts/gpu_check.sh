#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (run through the device tool with carry=[".whl"]):
#   1. installs the carried wheels (.whl/, built by scripts/gpu_wheels.sh) into .site
#   2. MX/FP8 quantizers on CUDA equal the CPU results bit for bit (scripts/gpu_check.py)
#   3. a short BF16 and an MXFP8-emulated training run on one GPU through DeepSpeed (NCCL)
#   4. python -m bench.overhead on the GPU
# Everything it prints also lands in $OUT/gpu_check.log. Status: written against the image's
# documented contents; not yet run on a GPU (no device was lent to the session that wrote it).
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. quantizers: CUDA vs CPU bitwise"
timeout 240 $py scripts/gpu_check.py || echo "gpu_check.py FAILED"

echo "== 2. training on one GPU"
for recipe in bf16 mxfp8_e4m3 fp8_delayed; do
  timeout 240 $py train/run.py +recipe=$recipe model=20m trainer.max_steps=30 trainer.log_every=10 \
      trainer.global_batch_size=32 data=pydoc logger.wandb.enabled=false \
      hydra.run.dir="$OUT/outputs/$recipe" || echo "run $recipe FAILED"
  tail -n 1 "$OUT/outputs/$recipe/metrics.jsonl" 2>/dev/null
done

echo "== 3. overhead against a plain PyTorch loop"
timeout 180 $py -m bench.overhead --recipes bf16 --steps 40 --reps 4 model=20m data=pydoc || echo "overhead FAILED"
