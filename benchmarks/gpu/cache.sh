#!/usr/bin/env bash
# Step caching on real weights (issue 23): FLUX.1-dev, 1024 x 1024, 28 steps, TeaCache thresholds 0.25 / 0.4 / 0.6,
# seconds per image and PSNR against no cache, one JSON line per setting (benchmarks/cache.py --only pipeline).
#
#   MODEL=/path/to/FLUX.1-dev benchmarks/gpu/cache.sh            # a diffusers folder, a BFL file set or a model id
#
# Environment (defaults in brackets): MODEL [black-forest-labs/FLUX.1-dev], SIZE [1024], STEPS [28],
# SETTINGS [teacache:0.25,teacache:0.4,teacache:0.6], PROMPTS [4], DEVICE [cuda], DTYPE [bfloat16],
# PYTHON [.venv/bin/python], OUT [cache-gpu.jsonl, appended].
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${MODEL:-black-forest-labs/FLUX.1-dev}"
SIZE="${SIZE:-1024}"
STEPS="${STEPS:-28}"
SETTINGS="${SETTINGS:-teacache:0.25,teacache:0.4,teacache:0.6}"
PROMPTS="${PROMPTS:-4}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-cache-gpu.jsonl}"
read -r -a MODELS <<< "$MODEL"
ARGS=()
for m in "${MODELS[@]}"; do ARGS+=(--model "$m"); done
"$PYTHON" benchmarks/cache.py --only pipeline "${ARGS[@]}" --height "$SIZE" --width "$SIZE" --steps "$STEPS" \
    --settings "$SETTINGS" --prompts "$PROMPTS" --device "$DEVICE" --dtype "$DTYPE" | tee -a "$OUT"
