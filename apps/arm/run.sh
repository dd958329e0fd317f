#!/usr/bin/env bash
# Run the arm64 python of the sysroot (apps/arm/make_sysroot.sh) under QEMU user-mode emulation, with this
# repository's edge/ on its path and nothing from the host's python:
#
#   apps/arm/run.sh -m edge.cli generate BUNDLE "a red circle" --steps 4 -o arm.png
#   apps/arm/run.sh -c "import platform; print(platform.machine())"     # aarch64
#
# Emulated numeric code runs tens to hundreds of times slower than native: use the default (tiny) model.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SYSROOT=${EDGE_ARM_SYSROOT:-$REPO/build/arm64-sysroot}

if [ ! -x "$SYSROOT/usr/bin/python3.11" ] || [ ! -e "$SYSROOT/.edge-wheels" ]; then
    echo "run.sh: no arm64 sysroot at $SYSROOT: run apps/arm/make_sysroot.sh first" >&2
    exit 2
fi
command -v qemu-aarch64-static >/dev/null || { echo "run.sh: qemu-aarch64-static is missing: run apps/arm/make_sysroot.sh" >&2; exit 2; }

export QEMU_LD_PREFIX=$SYSROOT          # the guest's /lib, /usr, /proc/cpuinfo, ... come from here first
export QEMU_CPU=${QEMU_CPU:-cortex-a72}  # Raspberry Pi 4's core; QEMU's default "max" CPU makes numpy warn spuriously
export PYTHONPATH=$REPO                 # edge/ is pure Python; the wheels sit in the sysroot's dist-packages
export PYTHONNOUSERSITE=1               # never the host's ~/.local x86 packages
unset PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV
exec qemu-aarch64-static "$SYSROOT/usr/bin/python3.11" "$@"
