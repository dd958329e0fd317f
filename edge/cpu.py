"""What this CPU can do for int8, read once from the processor itself, and what the runtime does about it.

onnxruntime multiplies uint8 activations by int8 weights (U8S8). Where the CPU has 8-bit dot-product
instructions (x86 AVX-512 VNNI, AVX-VNNI, AMX; ARM dot product / i8mm) that is exact and fast. On x86
without them (AVX2, or AVX-512 without VNNI: Haswell..Skylake, AMD Zen 1-3) onnxruntime's kernel sums
pairs of products into 16 bits with `vpmaddubsw`, which saturates: measured on the tiny bundle under
QEMU's AMD EPYC (Zen 1) model, int8 UNet 34.1 dB against fp32 where a VNNI CPU gets 55.5 dB. There the
runtime turns on onnxruntime's `session.x64quantprecision`, which rewrites the int8 weights to uint8 at
load time (exactly the same values, zero point 128) and runs its U8U8 kernels: no saturation, the same
numbers as on VNNI. It is never turned on where VNNI exists: it drops AMX/VNNI matrix products from
~1,000 to 167 GMAC/s (benchmarks/RESULTS.md, "int8 on every CPU").

The features come from the CPUID instruction (x86: a 24-byte function run from an executable page, so an
emulator's CPU model is what is read, as onnxruntime reads it), from the kernel's hardware capability
bits (ARM Linux) or sysctl (macOS). /proc/cpuinfo is only a fallback: under QEMU it shows the host.

ARM with SME (Armv9.2 cores, Apple M4): onnxruntime 1.32 sends int8 matrix products to KleidiAI's SME
kernels, and under QEMU 7.2's SME model those return wrong numbers (default model's int8 text encoder 9.0 dB
against fp32 where every other ARM and x86 CPU gets 44.4; UNet 19.9 against 59.6), while its fp32 kernels
stay exact (139 dB). No SME hardware was at hand to tell an emulator bug from a kernel bug, so int8 graphs
run with KleidiAI off there (`mlas.disable_kleidiai`: exact again, 44.4 / 59.6 dB); fp32 graphs keep it.
`edge check BUNDLE` on such a device shows whether that is still needed.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# x86-64 System V: cpuid(leaf=edi, subleaf=esi, out=rdx) -> out[0:4] = eax, ebx, ecx, edx
_CPUID_SYSV = bytes.fromhex("53" "4989d0" "89f8" "89f1" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3")
# xgetbv(ecx=edi) -> edx:eax as one 64-bit value: which register states the OS saves (XCR0)
_XGETBV_SYSV = bytes.fromhex("89f9" "0f01d0" "48c1e220" "4809d0" "c3")
XCR0_AVX, XCR0_AVX512, XCR0_AMX = 0x6, 0xE6, 0x60000  # SSE+AVX; + opmask, ZMM hi; AMX tile config + data
AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_ASIMDDP, HWCAP2_I8MM, HWCAP2_SME = 1 << 20, 1 << 13, 1 << 23


@dataclass(frozen=True)
class CpuFeatures:
    arch: str  # "x86_64", "aarch64", or what platform.machine() says
    source: str  # where the features were read: "cpuid", "hwcap", "sysctl", "/proc/cpuinfo", "none"
    flags: tuple[str, ...]  # the int8-relevant features present, lower case (avx2, avx512_vnni, asimddp, ...)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def int8_dot(self) -> bool:
        """An 8-bit dot-product instruction onnxruntime uses for U8S8: exact, and faster than fp32."""
        return any(self.has(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))

    @property
    def u8s8_saturates(self) -> bool:
        """x86 whose U8S8 kernel is vpmaddubsw (16-bit pair sums): AVX2 / AVX-512 without VNNI."""
        return self.arch == "x86_64" and not self.int8_dot

    @property
    def int8_path(self) -> str:
        """Which int8 kernels onnxruntime takes here, in a few words."""
        if self.arch == "x86_64":
            for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
                if self.has(flag):
                    return f"u8s8 on {name}: exact, faster than fp32"
            simd = "AVX-512" if self.has("avx512bw") else "AVX2" if self.has("avx2") else "SSE"
            known = "" if self.source != "none" else " (features unknown: assumed)"
            return (f"u8u8 on {simd} without VNNI{known}: exact (int8 weights shifted to uint8 at load), "
                    "no faster than fp32 - int8 saves memory here, not time")
        if self.arch in ("aarch64", "arm64"):
            if self.has("asimddp"):
                extras = "".join(f" + {f}" for f in ("i8mm", "sme") if self.has(f))
                kleidi = " (KleidiAI int8 kernels off: wrong under emulated SME)" if self.has("sme") else ""
                return f"dot product{extras}{kleidi}: exact, faster than fp32"
            return "NEON widening multiply (no dot product): exact, no faster than fp32 - int8 saves memory"
        return f"onnxruntime's portable kernels on {self.arch}"

    def describe(self) -> str:
        return f"{self.arch} [{' '.join(self.flags) or 'no int8 features'}] via {self.source}; int8: {self.int8_path}"

    def as_dict(self) -> dict:
        return {"arch": self.arch, "source": self.source, "flags": list(self.flags), "int8_path": self.int8_path,
                "int8_dot": self.int8_dot}


def session_config(cpu: CpuFeatures | None = None, int8: bool = True) -> dict[str, str]:
    """onnxruntime session config entries that make int8 exact on this CPU (empty where it already is);
    `int8=False` for a graph without int8 weights (the U8U8 switch costs such a graph nothing either way)."""
    cpu = features() if cpu is None else cpu
    config = {"session.x64quantprecision": "1"} if cpu.u8s8_saturates else {}
    if int8 and cpu.has("sme"):
        config["mlas.disable_kleidiai"] = "1"
    return config


@functools.cache
def features() -> CpuFeatures:
    """This process's CPU, read once."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    try:
        if arch == "x86_64":
            return CpuFeatures(arch, "cpuid", _x86_flags(_cpuid_function()))
        if arch == "aarch64" and sys.platform == "linux":
            return CpuFeatures(arch, "hwcap", _arm_hwcap_flags())
        if arch == "aarch64" and sys.platform == "darwin":
            return CpuFeatures(arch, "sysctl", _arm_sysctl_flags())
    except (OSError, ValueError, AttributeError):
        pass
    flags = _proc_cpuinfo_flags()
    return CpuFeatures(arch, "/proc/cpuinfo" if flags is not None else "none", flags or ())


# ----------------------------------------------------------------------------------------------- x86


def _cpuid_function():
    """A callable cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx) from machine code on an executable page, with
    `.xgetbv()` -> XCR0 beside it."""
    if sys.platform == "win32":
        raise OSError("cpuid through an executable page is not implemented on Windows")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CPUID_SYSV + _XGETBV_SYSV)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(address + len(_CPUID_SYSV))

    def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        function(leaf, subleaf, out)
        return tuple(out)

    cpuid.xgetbv = lambda _page=page: int(xgetbv(0))  # each function keeps the page mapped while it lives
    cpuid.page = page
    return cpuid


def _x86_flags(cpuid) -> tuple[str, ...]:
    max_leaf = cpuid(0)[0]
    _, _, ecx1, _ = cpuid(1)
    _, ebx7, ecx7, edx7 = cpuid(7, 0) if max_leaf >= 7 else (0, 0, 0, 0)
    eax71 = cpuid(7, 1)[0] if max_leaf >= 7 else 0
    # A feature counts only where the OS saves its registers (XCR0), as onnxruntime checks before using it:
    # a VM or kernel may hide AVX-512 or AMX state while CPUID still reports the instructions.
    xcr0 = cpuid.xgetbv() if ecx1 >> 27 & 1 else 0  # OSXSAVE
    avx, avx512, amx = ((xcr0 & m) == m for m in (XCR0_AVX, XCR0_AVX512, XCR0_AMX))
    bits = [("avx", ecx1, 28, avx), ("fma", ecx1, 12, avx), ("f16c", ecx1, 29, avx), ("avx2", ebx7, 5, avx),
            ("avx512f", ebx7, 16, avx512), ("avx512bw", ebx7, 30, avx512), ("avx512_vnni", ecx7, 11, avx512),
            ("amx_bf16", edx7, 22, amx), ("amx_tile", edx7, 24, amx), ("amx_int8", edx7, 25, amx),
            ("avx_vnni", eax71, 4, avx), ("avx512_bf16", eax71, 5, avx512)]
    return tuple(name for name, reg, bit, usable in bits if reg >> bit & 1 and usable)


# ----------------------------------------------------------------------------------------------- ARM


def _arm_hwcap_flags() -> tuple[str, ...]:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hwcap, hwcap2 = getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    bits = (("asimddp", hwcap & HWCAP_ASIMDDP), ("i8mm", hwcap2 & HWCAP2_I8MM), ("sme", hwcap2 & HWCAP2_SME))
    return tuple(name for name, on in bits if on)


def _arm_sysctl_flags() -> tuple[str, ...]:
    libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")

    def sysctl(name: str) -> bool:
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        ok = libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
        return ok == 0 and value.value != 0

    names = (("asimddp", "hw.optional.arm.FEAT_DotProd"), ("i8mm", "hw.optional.arm.FEAT_I8MM"),
             ("sme", "hw.optional.arm.FEAT_SME"))
    return tuple(flag for flag, key in names if sysctl(key))


def _proc_cpuinfo_flags() -> tuple[str, ...] | None:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    words = {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for w in line.split(":", 1)[1].split()}
    wanted = ("avx", "fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_bf16", "amx_tile",
              "amx_int8", "avx_vnni", "avx512_bf16", "asimddp", "i8mm", "sme")
    return tuple(w for w in wanted if w in words)


if __name__ == "__main__":
    print(features().describe())


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (lscpu's "Model name"; a Raspberry Pi's "Model"), for every
    figure that must name the machine it was measured on."""
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for key in ("model name", "Model", "Hardware", "cpu model"):  # x86; Raspberry Pi; older ARM boards
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"
