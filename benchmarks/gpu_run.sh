#!/usr/bin/env bash
# One device call: versions, then the train-step benchmark presets on the GPU. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT="${OUT:-/tmp/copg_bench}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 benchmarks/step.py --device-kind gpu --repeats 5 --json "$OUT/gpu_preset.json" 2>&1 | tee "$OUT/gpu_preset.log"
python3 benchmarks/step.py --device-kind gpu --sizes 1b --shapes 16x4x1024 --remat full --repeats 5 \
  --json "$OUT/gpu_1b_remat_full.json" 2>&1 | tee "$OUT/gpu_1b_remat_full.log"
