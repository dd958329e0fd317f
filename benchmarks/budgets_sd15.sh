#!/usr/bin/env bash
# Issue 5's measurement: full-size SD 1.5 (random weights from its published config), 512x512, 3 steps,
# peak RSS of `edge generate` unconstrained, with --memory-budget 4GB (fp32 bundle, UNet in 4 chunks)
# and with --memory-budget 2GB (int8 bundle incl. convolutions, UNet in 2 chunks), against the plan.
# Bundles are cached under $EDGE_CACHE_DIR (default ~/.cache/edge-diffusion/bundles); converting each
# takes ~5-10 min and ~9 GB RAM on 2 cores. Results in $OUT (default bench-results/budgets-sd15).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${EDGE_CACHE_DIR:-$HOME/.cache/edge-diffusion}
OUT=${OUT:-bench-results/budgets-sd15}
STEPS=${STEPS:-3}
MODEL=$CACHE/models/sd15-random
if [[ ! -d $MODEL ]]; then
    "$PYTHON" -c "from pathlib import Path; from edge.converters.arch import save_random; save_random('sd15', Path('$MODEL'))"
fi
FP32=$CACHE/bundles/sd15-fp32-sliced-s4
INT8=$CACHE/bundles/sd15-int8conv-sliced-s2
[[ -d $FP32 ]] || "$PYTHON" -m edge.cli convert "$MODEL" -o "$FP32" --attention sliced --attention-chunk 1024 \
    --split-unet 4
[[ -d $INT8 ]] || "$PYTHON" -m edge.cli convert "$MODEL" -o "$INT8" --precision int8 \
    --quantize-ops MatMul,Gemm,Conv --attention sliced --attention-chunk 1024 --split-unet 2
"$PYTHON" benchmarks/memory_budget.py "$FP32" --budgets none,4GB --steps "$STEPS" -o "$OUT/fp32"
"$PYTHON" benchmarks/memory_budget.py "$INT8" --budgets none,2GB --steps "$STEPS" -o "$OUT/int8"
