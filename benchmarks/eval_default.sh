#!/usr/bin/env bash
# Scorer accuracy of the default model through the edge runtime (fp32 ONNX), as in its model card.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-build/default-bundle}
[[ -f "$BUNDLE/manifest.json" ]] || "$PYTHON" -m edge.cli convert default -o "$BUNDLE"
exec "$PYTHON" -m edge.eval.fidelity "$BUNDLE" --scheduler euler --guidance 5 --steps 25 \
    -o "${OUT:-bench-results/default-fidelity.json}" "$@"
