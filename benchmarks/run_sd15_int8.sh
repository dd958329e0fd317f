#!/usr/bin/env bash
# Full-size Stable Diffusion 1.5 (random weights built from the published configs), 512x512: edge's int8
# bundles against its fp32 bundle, the fp32 peers (diffusers on torch, optimum's ONNX Runtime pipeline,
# optimum-intel's OpenVINO pipeline at the precision OpenVINO picks) and their int8 (torch's dynamic quantization
# of the UNet's Linear layers; optimum's ORTQuantizer with its avx512_vnni config; OpenVINO's 8-bit weight
# compression) and stable-diffusion.cpp's q8_0 and q4_0 gguf weights, each in its own process, same latents
# (sd.cpp: its own noise). One results folder per run under $OUT.
#
#   fp32      edge convert MODEL                                   (the peers run beside it)
#   int8      edge convert MODEL --precision int8 --quantize-ops MatMul,Gemm,Conv
#             (onnxruntime's dynamic quantization of MatMul and Conv: what optimum's quantizer writes)
#   int8s     edge convert MODEL --precision int8 --activations static
#             (calibrated QLinearConv UNet), also under --memory-budget 2GB
#
# Builds what is missing under $WORK (model ~4.3 GB, bundles 1-5 GB each; ~5 min per conversion on 2 cores).
#   STEPS=8 THREADS=2 benchmarks/run_sd15_int8.sh
#   VARIANTS="fp32 int8s" benchmarks/run_sd15_int8.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
EDGE=${EDGE:-.venv/bin/edge}
STEPS=${STEPS:-8}
THREADS=${THREADS:-2}
WORK=${WORK:-${EDGE_CACHE_DIR:-$HOME/.cache/edge-diffusion}/sd15-int8}
OUT=${OUT:-bench-results/sd15-int8-$(date +%Y%m%d-%H%M%S)}
VARIANTS=${VARIANTS:-fp32 int8 int8s}
MODEL=$WORK/sd15-random
declare -A ARGS=([fp32]="" [int8]="--precision int8 --quantize-ops MatMul,Gemm,Conv"
                 [int8s]="--precision int8 --activations static")

if [[ ! -f $MODEL/model_index.json ]]; then
    "$PYTHON" -m edge.converters.arch sd15 --seed 0 --save "$MODEL"
fi
bench() {  # bench VARIANT LABEL [extra edge bench args]
    local variant=$1 label=$2; shift 2
    "$PYTHON" -m edge.bench "$WORK/$variant" --steps "$STEPS" --height 512 --width 512 --threads "$THREADS" \
        --scheduler euler --guidance 7.5 --seed 0 --label "$label" -o "$OUT/$label" "$@"
}
for variant in $VARIANTS; do
    if [[ ! -f $WORK/$variant/manifest.json ]]; then
        # shellcheck disable=SC2086  # ARGS holds several words
        "$EDGE" convert "$MODEL" -o "$WORK/$variant" --overwrite ${ARGS[$variant]}
    fi
    if [[ $variant == fp32 ]]; then
        bench fp32 "sd15-fp32-${STEPS}steps" --peers diffusers,optimum,openvino
    elif [[ $variant == int8s ]]; then  # against what the peers' own tools make of int8
        bench int8s "sd15-int8s-${STEPS}steps" --peers diffusers-int8,optimum-int8,openvino-int8,sdcpp-q8_0,sdcpp-q4_0
    else
        bench "$variant" "sd15-$variant-${STEPS}steps" --no-peers
    fi
    if [[ $variant == int8s ]]; then
        bench int8s "sd15-int8s-${STEPS}steps-2GB" --no-peers --memory-budget 2GB
    fi
done
"$PYTHON" -m edge.bench compare "$OUT"/*/results.json -o "$OUT/compare"
