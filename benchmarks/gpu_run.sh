#!/usr/bin/env bash
# One device call (<= 8 minutes on one H200): attention backends checked and timed, the 1B train step and
# reference forward over T x layout, CoPG beside TRL 1.16's DPOTrainer. Every part is bounded by `timeout`;
# logs and JSON go to $OUT (run.log, attention.json, grid.json, trl.jsonl, summary.md: at most 8 files come
# back from the device tool).
#
#   bash benchmarks/gpu_run.sh [--smoke] [PART ...]     parts: versions attention grid trl report (default all)
#
# --smoke runs every part at tiny shapes (on CPU: the check that the script works end to end).
# The device image lacks `datasets` (which copg_jax.data imports) and trl: both come from the peer benchmark's
# wheels, so copy it into the checkout first: `mkdir -p .peer && cp -r ../shared/bench/. .peer/` (`.peer/` is
# git-ignored), and the device call carries it:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".peer"], timeout_s=560)
set -uo pipefail
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
PARTS="${*:-versions attention grid trl report}"
OUT="${OUT:-/tmp/copg_bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PY="${PYTHON:-python3}"
PEER="${PEER:-.peer}"
LOG="$OUT/run.log"
START=$(date +%s)

part() {  # part NAME SECONDS: runs the function NAME in a bounded shell, its output appended to run.log
  local name=$1 limit=$2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "=== $name: limit ${limit}s, started at +$(($(date +%s) - START))s" | tee -a "$LOG"
  timeout -k 5 "$limit" bash -c "$(declare -p ATTN MODEL GRID COPG TRL_MODEL TRL_CASES BACKEND); $(declare -f "$name"); $name" \
    2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} at +$(($(date +%s) - START))s" | tee -a "$LOG"
}

if ((SMOKE)); then
  ATTN=(--lengths 128 --tokens 512 --heads 4 --kv-heads 2 --head-dim 16 --check-length 64 --repeats 1
    --backends xla blockwise pallas_gpu cudnn --check-softcap 2)
  MODEL=(--sizes tiny --dtype float32 --repeats 1 --compile-threads 2)
  GRID=(--lengths 64 128 --tokens 512)
  COPG=(pairs_512=train,padded,2x2x64 pairs_2048=train,padded,1x2x128 k4=train,shared_prefix,2x4x0,16+48)
  TRL_MODEL=(--hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --vocab 512 --no-bf16 --warmup 1
    --steps 2 --num-workers 0)
  TRL_CASES=("pairs_512 --pairs 2 --prompt-len 16 --completion-len 48"
    "pairs_2048 --pairs 1 --prompt-len 32 --completion-len 96"
    "k4 --pairs 12 --prompt-len 16 --completion-len 48")
  LIMITS=(versions 60 attention 240 grid 400 trl 400)
else
  ATTN=(--lengths 8192 --tokens 16384 --heads 16 --kv-heads 8 --head-dim 128 --dtype bfloat16 --check-length 1024
    --repeats 3 --backends xla pallas_gpu cudnn pallas_gpu:128x64 --check-softcap 2)  # cap 2: tanh bends N(0, 1)
  MODEL=(--sizes 1b --device-kind gpu --repeats 2 --compile-threads 4)
  GRID=(--lengths 2048 8192 512 4096 --tokens 65536)  # the targets' row lengths first
  # CoPG on TRL's shapes (first): its pairs as K = 2 padded rows (prompt T/4 + completion 3T/4), and K = 4
  # completions of 384 tokens after a 128-token prompt in shared-prefix rows
  COPG=(pairs_512=train,padded,16x2x512 pairs_2048=train,padded,8x2x2048 k4=train,shared_prefix,16x4x0,128+384)
  TRL_MODEL=(--warmup 2 --steps 5)
  TRL_CASES=("pairs_512 --pairs 16 --prompt-len 128 --completion-len 384"
    "pairs_2048 --pairs 8 --prompt-len 512 --completion-len 1536"
    "k4 --pairs 24 --prompt-len 128 --completion-len 384")  # 4 prompts x 6 pairs = 12 sequences per prompt
  LIMITS=(versions 15 attention 85 grid 255 trl 100)
fi
declare -A LIMIT=()
for ((i = 0; i < ${#LIMITS[@]}; i += 2)); do LIMIT[${LIMITS[i]}]=${LIMITS[i + 1]}; done
export PY PEER OUT
BACKEND=auto

versions() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c 'import jax, flax, optax, datasets; print("jax", jax.__version__, "flax", flax.__version__, "optax",
    optax.__version__, "datasets", datasets.__version__, jax.devices())'
}

attention() {
  "$PY" benchmarks/attention.py "${ATTN[@]}" --layouts padded packed shared_prefix --json "$OUT/attention.json"
}

grid() {  # one process, one model state: the TRL-shaped cases, then T x layout x (train, forward)
  "$PY" benchmarks/step.py "${MODEL[@]}" --cases "${COPG[@]}" "${GRID[@]}" --layouts packed shared_prefix padded \
    --mode train forward --remat minimal_attention --attention "$BACKEND" --json "$OUT/grid.json"
}

trl() {
  : >"$OUT/trl.jsonl"
  if [[ ! -f "$PEER/trl_dpo_bench.py" ]]; then
    echo "trl: no $PEER/trl_dpo_bench.py: copy the peer benchmark first (mkdir -p .peer && cp -r ../shared/bench/. .peer/)"
    return 2
  fi
  for case in "${TRL_CASES[@]}"; do
    read -r -a words <<<"$case"
    echo "--- trl ${words[0]}: ${words[*]:1}"
    "$PY" "$PEER/trl_dpo_bench.py" "${TRL_MODEL[@]}" "${words[@]:1}" 2>&1 \
      | tee /dev/stderr | sed -n "s/^RESULT /${words[0]} /p" >>"$OUT/trl.jsonl"
  done
}

report() {
  "$PY" benchmarks/device_report.py "$OUT" | tee "$OUT/summary.md"
}

# The device image lacks `datasets` (copg_jax.data imports it) and trl: the peer folder's wheels (built for
# its Python 3.12) go to a site folder on PYTHONPATH; elsewhere (the smoke run) TRL alone, on local packages.
SITE=/tmp/copg_peer_site
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
if [[ -d "$PEER/whl" ]]; then
  "${PIP[@]}" "$PEER"/whl/*.whl 2>/dev/null || "${PIP[@]}" "$PEER"/whl/trl-*.whl || echo "peer wheels: not installed"
else
  echo "no $PEER/whl: on the device image nothing imports datasets and trl (see the header)" | tee -a "$LOG"
fi
export PYTHONPATH="$PWD:$SITE"

part versions "${LIMIT[versions]}"
part attention "${LIMIT[attention]}"
# The model parts run `auto` when every fused kernel passed its check on this machine, else blockwise.
if [[ -f "$OUT/attention.json" ]]; then
  BACKEND=$("$PY" -c 'import json, sys
checks = [c for c in json.load(open(sys.argv[1]))["checks"]
          if c["backend"] in ("pallas_gpu", "cudnn") and c.get("softcap") is None]  # the 1B model has no cap
print("auto" if checks and all(c["ok"] for c in checks) else "blockwise")' "$OUT/attention.json" || echo auto)
fi
echo "model attention backend: $BACKEND" | tee -a "$LOG"
part grid "${LIMIT[grid]}"
part trl "${LIMIT[trl]}"
part report 30
echo "total: $(($(date +%s) - START))s" | tee -a "$LOG"
