#!/usr/bin/env bash
# Build, or reuse, a minimal arm64 Debian sysroot holding the device runtime's aarch64 wheels, so that
# apps/arm/run.sh can run `edge` under QEMU user-mode emulation on an x86_64 Linux host.
#
#   apps/arm/make_sysroot.sh            # builds build/arm64-sysroot (or $EDGE_ARM_SYSROOT); ~1 min cold, <1 s warm
#
# What it does, each step skipped when its stamp says it is already done:
#   1. qemu-user-static from the host's apt, if qemu-aarch64-static is missing (needs root, as CI is).
#   2. Debian bookworm's arm64 python3.11 and libstdc++6 with their dependencies, fetched with a private apt
#      configuration (its own sources list, state and cache; the host's apt state is never touched) and
#      unpacked with `dpkg -x`. No maintainer scripts run: a sysroot, not an installed system.
#   3. A fake ARM /proc/cpuinfo in the sysroot. QEMU looks for absolute paths under the sysroot first, and
#      onnxruntime's CPU probe crashes (SIGSEGV at import) when it reads the host's x86 cpuinfo.
#   4. The aarch64 cp311 wheels of numpy, onnxruntime, pillow and tokenizers (and their dependencies), pinned
#      to the versions installed in the host python ($PYTHON, default .venv/bin/python), so that x86 and
#      ARM run the same code. pip installs them into the sysroot's /usr/local/lib/python3.11/dist-packages.
#
# Environment: EDGE_ARM_SYSROOT (where), PYTHON (host python with pip and the runtime's packages),
# EDGE_DEBIAN_MIRROR / EDGE_DEBIAN_SECURITY (Debian archive URLs).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SYSROOT=${EDGE_ARM_SYSROOT:-$REPO/build/arm64-sysroot}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
MIRROR=${EDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${EDGE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SUITE=bookworm               # Debian 12: python3.11, glibc 2.36 (the wheels need manylinux_2_28 or older)
DEBS=(python3.11 libstdc++6)  # libstdc++ for onnxruntime and tokenizers; the rest come as dependencies
RUNTIME="numpy onnxruntime pillow tokenizers"
SITE=usr/local/lib/python3.11/dist-packages
DEBS_STAMP="debs: $SUITE ${DEBS[*]}; cpuinfo v1"

log() { echo "make_sysroot: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(uname -s) $(uname -m)" = "Linux x86_64" ] || die "needs an x86_64 Linux host, this is $(uname -s) $(uname -m)"
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || die "no host python at $PYTHON: set PYTHON, or run 'make venv'"

ensure_qemu() {
    command -v qemu-aarch64-static >/dev/null && return
    log "installing qemu-user-static (apt-get)"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        sudo -n true 2>/dev/null || die "qemu-aarch64-static is missing and this is not root: apt-get install qemu-user-static"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null || die "qemu-aarch64-static is missing and there is no apt-get to install qemu-user-static"
    "${sudo[@]}" apt-get update -q >&2 || die "apt-get update failed: cannot reach the Debian archive to install qemu-user-static"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static >&2 \
        || die "apt-get install qemu-user-static failed"
    command -v qemu-aarch64-static >/dev/null || die "qemu-user-static installed but qemu-aarch64-static is not on PATH"
}

fetch_debs() {  # $1: the new sysroot to fill
    local root=$1 apt=$1.apt
    { command -v apt-get && command -v dpkg-deb; } >/dev/null || die "needs apt-get and dpkg-deb (a Debian or Ubuntu host)"
    [ -r "$KEYRING" ] || die "no Debian archive keyring at $KEYRING: apt-get install debian-archive-keyring"
    mkdir -p "$apt"/state/lists/partial "$apt"/cache/archives/partial "$apt"/sources.list.d "$apt"/preferences.d
    : >"$apt/status"  # an empty dpkg database: apt resolves the whole dependency closure
    cat >"$apt/sources.list" <<EOF
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [arch=arm64 signed-by=$KEYRING] $SECURITY $SUITE-security main
EOF
    local opts=(-q -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
                -o "Dir::Etc::Preferences=$apt/preferences" -o "Dir::Etc::PreferencesParts=$apt/preferences.d"
                -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/status" -o "Dir::Cache=$apt/cache"
                -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64" -o "Debug::NoLocking=1"
                -o "APT::Update::Error-Mode=any" -o "APT::Sandbox::User=$(id -un)")
    log "fetching arm64 ${DEBS[*]} and their dependencies from $MIRROR ($SUITE)"
    apt-get "${opts[@]}" update >&2 || die "apt-get update of the private arm64 sources failed (is $MIRROR reachable?)"
    apt-get "${opts[@]}" -y --download-only --no-install-recommends install "${DEBS[@]}" >&2 \
        || die "downloading the arm64 packages failed"
    local deb n=0
    for deb in "$apt"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$root"; n=$((n + 1)); done
    rm -rf "$apt"
    [ -x "$root/usr/bin/python3.11" ] || die "unpacked $n packages but $root/usr/bin/python3.11 is missing"
    log "unpacked $n arm64 packages"
}

write_cpuinfo() {  # a Cortex-A72 (Raspberry Pi 4), one entry per host CPU: onnxruntime checks the counts agree
    local i n
    n=$(getconf _NPROCESSORS_CONF)
    mkdir -p "$1/proc"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done >"$1/proc/cpuinfo"
    printf 'Model\t\t: edge-diffusion arm64 sysroot for QEMU user-mode (Cortex-A72)\n' >>"$1/proc/cpuinfo"
}

host_constraints() {  # name==version of every distribution in the host python: the pins for the ARM install
    "$PYTHON" - "$RUNTIME" <<'EOF'
import importlib.metadata as md, sys
missing = [n for n in sys.argv[1].split() if not any(True for _ in md.distributions(name=n))]
if missing:
    sys.exit(f"host python {sys.executable} lacks {' '.join(missing)}: install the runtime there first")
pins = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions() if d.metadata["Name"]}
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
EOF
}

install_wheels() {  # $1: constraints file
    local new=$SYSROOT/$SITE.partial-$$ n pins=()
    for n in $RUNTIME; do pins+=("$(grep -i "^$n==" "$1")"); done
    log "installing aarch64 cp311 wheels: ${pins[*]} (dependencies pinned to the host's versions)"
    rm -rf "$new"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$new" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        -c "$1" "${pins[@]}" >&2 || die "pip could not install the aarch64 wheels of ${pins[*]} (is PyPI reachable?)"
    rm -rf "${SYSROOT:?}/$SITE"
    mv "$new" "$SYSROOT/$SITE"
}

main() {
    mkdir -p "$(dirname "$SYSROOT")"
    exec 9>"$SYSROOT.lock"
    flock 9  # one builder at a time; a second waits, then finds the work done
    ensure_qemu

    if [ "$(cat "$SYSROOT/.edge-debs" 2>/dev/null)" != "$DEBS_STAMP" ]; then
        local new=$SYSROOT.partial-$$
        trap 'rm -rf "$SYSROOT.partial-$$" "$SYSROOT.partial-$$.apt"' EXIT
        rm -rf "$new" && mkdir -p "$new"
        fetch_debs "$new"
        write_cpuinfo "$new"
        echo "$DEBS_STAMP" >"$new/.edge-debs"
        rm -rf "$SYSROOT" && mv "$new" "$SYSROOT"
    fi

    local stamp=$SYSROOT/.edge-wheels  # the constraints the installed wheels were resolved with
    host_constraints >"$stamp.new" || die "could not read the runtime's versions from $PYTHON"
    if ! cmp -s "$stamp.new" "$stamp" || [ ! -d "$SYSROOT/$SITE/onnxruntime" ]; then
        trap 'rm -rf "$SYSROOT/$SITE.partial-$$"' EXIT
        install_wheels "$stamp.new"
        mv "$stamp.new" "$stamp"
    fi
    rm -f "$stamp.new"
    log "ready: $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
}

main
