#!/usr/bin/env bash
# Full-size Stable Diffusion 1.5 (random weights built from the published configs), 512x512, 20 steps,
# classifier-free guidance (UNet batch 2): edge, diffusers on torch, optimum's ONNX Runtime pipeline,
# optimum-intel's OpenVINO pipeline (at the precision OpenVINO picks on this CPU; openvino-int8: with its 8-bit
# weight compression) and stable-diffusion.cpp with its q8_0 and q4_0 gguf weights (sdcpp-q8_0, sdcpp-q4_0; it
# draws its own noise, so only its timings and memory compare), each in its own process, same latents. Writes
# results.json / results.md / results.png to $OUT.
#
# First run on a machine (cached afterwards under $EDGE_CACHE_DIR or ~/.cache/edge-diffusion):
#   build SD 1.5 with random weights (~1 min, 4.3 GB on disk), `edge convert` it (~5 min, ~5 GB RAM),
#   create optimum's and OpenVINO's virtual environments (~1 min, ~1.5 GB each), optimum's ONNX export (~5 min),
#   OpenVINO's IR export and its int8 weight compression (~5 min), stable-diffusion.cpp's environment (compiled
#   here with the native CPU flags: ~3 min on 2 cores), its LDM checkpoint and two gguf conversions (~1.5 min,
#   4.3 + 3.2 + 3.1 GB on disk: sd.cpp keeps the 3x3 convolutions at the checkpoint's fp32).
# Each run after that, on 2 cores: ~4 min per runtime at 20 steps; peak RAM ~7.5 GB (optimum's).
#
#   benchmarks/run_sd15.sh                       # all defaults
#   STEPS=4 REPEAT=1 benchmarks/run_sd15.sh      # a quicker look
#   PEERS=diffusers THREADS=2 OUT=bench-results/sd15-2t benchmarks/run_sd15.sh
#   PEERS=openvino,openvino-int8 STEPS=3 THREADS=2 benchmarks/run_sd15.sh     # edge against OpenVINO only
#   PEERS=sdcpp-q8_0,sdcpp-q4_0 STEPS=3 THREADS=2 benchmarks/run_sd15.sh      # against stable-diffusion.cpp only
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-20}
REPEAT=${REPEAT:-1}
PEERS=${PEERS:-diffusers,optimum,openvino,openvino-int8,sdcpp-q8_0,sdcpp-q4_0}
OUT=${OUT:-bench-results/sd15-$(date +%Y%m%d-%H%M%S)}
EXTRA=()
if [[ -n "${THREADS:-}" ]]; then EXTRA+=(--threads "$THREADS"); fi
if [[ -n "${MEMORY_BUDGET:-}" ]]; then EXTRA+=(--memory-budget "$MEMORY_BUDGET"); fi

exec "$PYTHON" -m edge.bench --arch sd15 --random-weights --steps "$STEPS" --repeat "$REPEAT" \
    --height 512 --width 512 --scheduler euler --guidance 7.5 --seed 0 \
    --peers "$PEERS" --label "sd15-random-${STEPS}steps" -o "$OUT" "${EXTRA[@]}"
