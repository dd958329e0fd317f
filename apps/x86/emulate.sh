#!/usr/bin/env bash
# Run this checkout's python on an emulated x86-64 CPU, to check edge on CPUs this machine is not:
#
#   apps/x86/emulate.sh EPYC -m edge.cpu                 # AMD EPYC Zen 1: AVX2, no VNNI
#   apps/x86/emulate.sh Haswell -m edge.cli check BUNDLE # Intel Haswell: AVX2, no VNNI
#
# QEMU user-mode emulation (qemu-x86_64-static, from the host's apt if missing) runs the same python, wheels
# and onnxruntime as the host, but the CPUID instruction answers as the named QEMU CPU model (`qemu-x86_64-static
# -cpu help`), so onnxruntime picks that CPU's kernels. QEMU 7.2 emulates AVX2 but no AVX-512, so the models
# worth running are the AVX2-only ones; the host itself covers AVX-512 VNNI / AMX. Tens of times slower than
# native: a correctness tool, never a speed measurement.
# Environment: PYTHON (default .venv/bin/python).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ $# -ge 1 ] || { echo "usage: $0 QEMU_CPU_MODEL [python args...]" >&2; exit 2; }
CPU=$1; shift
[ "$(uname -s) $(uname -m)" = "Linux x86_64" ] || { echo "emulate.sh: needs an x86_64 Linux host" >&2; exit 2; }
if ! command -v qemu-x86_64-static >/dev/null; then
    echo "emulate.sh: installing qemu-user-static (apt-get)" >&2
    sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo -n)
    "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends qemu-user-static >&2 \
        || { echo "emulate.sh: cannot install qemu-user-static" >&2; exit 2; }
fi
models=$(qemu-x86_64-static -cpu help || true)  # it exits non-zero after listing
grep -q "^x86 $CPU " <<<"$models" \
    || { echo "emulate.sh: QEMU knows no CPU model '$CPU' (see: qemu-x86_64-static -cpu help)" >&2; exit 2; }
# QEMU warns once per thread about host features its TCG cannot emulate; they are not the program's output.
exec qemu-x86_64-static -cpu "$CPU" "$PYTHON" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
