#!/usr/bin/env bash
# Issue 16's bar, on this machine in one run: full-size SD 1.5 architecture (random weights from the published
# configs), 512x512, 20 Euler steps, guidance 7.5 (UNet batch 2), 2 threads, each runtime in its own process from
# the same latents (sd.cpp draws its own noise).
#
#   fp32       edge convert MODEL                       against OpenVINO held to fp32 (openvino-f32) and at the
#                                                       precision it picks (bf16 where the CPU has it); edge on
#                                                       onnxruntime and on OpenVINO
#   int8s      edge convert MODEL --precision int8 --activations static --deep-cache
#                                                       against OpenVINO's 8-bit weights and sd.cpp's q8_0; edge on
#                                                       both engines, then under --memory-budget 2GB, then with
#                                                       DeepCache (--cache-interval 2 and 3), edge only
#
# Builds what is missing under $WORK (model 4.3 GB, bundles 1.5-5 GB; conversions ~5-10 min each on 2 cores) and
# the peers' environments and exports (see run_sd15.sh). Then ~25 min of runs on a 2-core VNNI machine.
#   benchmarks/bar_sd15.sh
#   STEPS=4 benchmarks/bar_sd15.sh            # a quicker look
#   RUNS="int8s" benchmarks/bar_sd15.sh       # one half
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-20}
THREADS=${THREADS:-2}
WORK=${WORK:-${EDGE_CACHE_DIR:-$HOME/.cache/edge-diffusion}/sd15-bar}
OUT=${OUT:-bench-results/sd15-bar-$(date +%Y%m%d-%H%M%S)}
RUNS=${RUNS:-fp32 int8s}
MODEL=$WORK/sd15-random
declare -A ARGS=([fp32]="" [int8s]="--precision int8 --activations static --deep-cache")

if [[ ! -f $MODEL/model_index.json ]]; then
    "$PYTHON" -m edge.converters.arch sd15 --seed 0 --save "$MODEL"
fi
bench() {  # bench BUNDLE LABEL [extra edge bench args]
    local bundle=$1 label=$2; shift 2
    "$PYTHON" -m edge.bench "$WORK/$bundle" --steps "$STEPS" --height 512 --width 512 --threads "$THREADS" \
        --scheduler euler --guidance 7.5 --seed 0 --label "$label" -o "$OUT/$label" "$@"
}
for run in $RUNS; do
    if [[ ! -f $WORK/$run/manifest.json ]]; then
        # shellcheck disable=SC2086  # ARGS holds several words
        "$PYTHON" -m edge.cli convert "$MODEL" -o "$WORK/$run" --overwrite ${ARGS[$run]}
    fi
done
for run in $RUNS; do
    if [[ $run == fp32 ]]; then
        bench fp32 "fp32" --backends onnx,openvino --peers openvino-f32,openvino
    else
        bench int8s "int8s" --backends onnx,openvino --peers openvino-int8,sdcpp-q8_0
        bench int8s "int8s-2GB" --no-peers --memory-budget 2GB
        bench int8s "int8s-cache2" --no-peers --cache-interval 2
        bench int8s "int8s-cache3" --no-peers --cache-interval 3
    fi
done
"$PYTHON" -m edge.bench compare "$OUT"/*/results.json -o "$OUT/compare"
