"""The same bundle, the same accuracy on every CPU: int8 on x86 with and without VNNI, and on ARM.

The host covers its own CPU (this project's machines: AVX-512 VNNI / AMX, or AVX2 only). The other x86 kind
runs under QEMU user-mode emulation (apps/x86/emulate.sh): the same python and onnxruntime, with the CPUID
instruction answering as an AVX2-only CPU (AMD EPYC Zen 1, QEMU's "EPYC" model), so onnxruntime takes
that CPU's kernels. ARM is tests/test_arm_qemu.py. Emulation is ~1,000x slower than native for these
kernels, so what runs there is `edge check` (each int8 graph on its stored inputs), not whole generations.
A machine that cannot install qemu-user-static FAILS these tests: it does not skip.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import REPO, run_edge
from edge.bundle import read_manifest
from edge.cpu import CpuFeatures, features, session_config
from edge.metrics import psnr
from edge.selfcheck import check_bundle
from edge.sessions import session_options

EMULATE = REPO / "apps/x86/emulate.sh"
on_x86_linux = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                  reason="x86 CPU emulation runs on x86_64 Linux hosts")
AVX2_ONLY = CpuFeatures("x86_64", "cpuid", ("avx", "fma", "f16c", "avx2"))
VNNI = CpuFeatures("x86_64", "cpuid", ("avx", "avx2", "avx512f", "avx512bw", "avx512_vnni"))
# What the saturating U8S8 kernel does to a random-weight int8 graph when nothing is done about it:
# measured under the EPYC model, tiny UNet 34.1 dB / VAE decoder 37.8 dB where VNNI gets 55.5 / 67.8.
SATURATION_LOSS_DB = 5.0
PROBE = """
import json, sys
import onnxruntime as ort
from edge.cpu import features
from edge.selfcheck import check_bundle
rows = check_bundle(sys.argv[1])
# the same graphs opened with onnxruntime's defaults: what a device got before edge.cpu
default = check_bundle(sys.argv[1], options=ort.SessionOptions(), verify=False)
plain = {r["component"]: r["measured_db"] for r in default}
print(json.dumps({"cpu": features().as_dict(), "rows": rows, "plain": plain}))
"""


def _emulated(cpu: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(EMULATE), cpu, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable})
    if proc.returncode != 0:
        pytest.fail(f"emulate.sh {cpu} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}",
                    pytrace=False)
    return proc


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    """The default model with dynamic int8 text encoder and UNet: what `--precision int8` gives a user."""
    out = tmp_path_factory.mktemp("cpu") / "int8"
    run_edge("convert", "default", "-o", out, "--precision", "int8", "--no-tiled-vae")
    return out


def test_this_cpu_is_read_from_the_processor_and_agrees_with_the_kernel():
    cpu = features()
    assert cpu.arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    if cpu.arch == "x86_64" and sys.platform == "linux":
        assert cpu.source == "cpuid"
        kernel = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
        for flag in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"):
            assert cpu.has(flag) == (flag in kernel), flag  # cpuid and the kernel see the same CPU
    assert features() is cpu  # read once


def test_the_exact_int8_path_is_asked_for_exactly_where_u8s8_saturates():
    assert session_config(AVX2_ONLY) == {"session.x64quantprecision": "1"}
    assert "u8u8" in AVX2_ONLY.int8_path and not AVX2_ONLY.int8_dot
    for fast in (VNNI, CpuFeatures("x86_64", "cpuid", ("avx2", "avx_vnni")),
                 CpuFeatures("x86_64", "cpuid", ("avx2", "amx_int8")), CpuFeatures("aarch64", "hwcap", ("asimddp",))):
        assert session_config(fast) == {} and fast.int8_dot, fast
    pi4 = CpuFeatures("aarch64", "hwcap", ())  # Cortex-A72: widening multiplies, exact, nothing to fix
    assert session_config(pi4) == {} and not pi4.int8_dot and "no faster" in pi4.int8_path
    sme = CpuFeatures("aarch64", "hwcap", ("asimddp", "i8mm", "sme"))  # KleidiAI's SME int8 kernels: off
    assert session_config(sme) == {"mlas.disable_kleidiai": "1"} and session_config(sme, int8=False) == {}
    options = session_options(cpu=AVX2_ONLY)
    assert options.get_session_config_entry("session.x64quantprecision") == "1"
    with pytest.raises(ValueError, match="basic"):
        session_options(optimization="basic", cpu=AVX2_ONLY)


def test_int8_bundle_reaches_its_manifest_figures_on_this_cpu(int8_bundle):
    rows = check_bundle(int8_bundle)
    assert {r["component"] for r in rows} == {"text_encoder", "unet"}
    for r in rows:
        assert r["ok"] and abs(r["measured_db"] - r["recorded_db"]) <= 1.0, r
    out = run_edge("check", int8_bundle).stdout
    assert "int8:" in out and out.count(" ok") == 2


def test_check_fails_loudly_when_a_device_falls_short(int8_bundle, tmp_path):
    """A manifest figure this device does not reach is a failed check, exit 1, naming the component."""
    copy = tmp_path / "b"
    subprocess.run(["cp", "-r", str(int8_bundle), str(copy)], check=True)
    data = json.loads((copy / "manifest.json").read_text())
    data["components"]["unet"]["quantization"]["psnr_vs_fp32_db"] += 10.0
    (copy / "manifest.json").write_text(json.dumps(data))
    proc = run_edge("check", copy, check=False)
    assert proc.returncode == 1 and "unet" in proc.stdout and "FAIL" in proc.stdout


@on_x86_linux
def test_avx2_only_cpu_gets_the_manifest_accuracy(int8_bundle):
    """On an AVX2-only CPU (emulated AMD EPYC Zen 1) the int8 bundle measures what its manifest says; with
    onnxruntime's default session it would not (U8S8 saturation) - so the emulation is the real hazard."""
    probe = json.loads(_emulated("EPYC", "-c", PROBE, str(int8_bundle)).stdout.strip().splitlines()[-1])
    assert probe["cpu"]["flags"] == ["avx", "fma", "f16c", "avx2"] and not probe["cpu"]["int8_dot"]
    for r in probe["rows"]:
        assert r["ok"] and abs(r["measured_db"] - r["recorded_db"]) <= 1.0, r
    unet = next(r for r in probe["rows"] if r["component"] == "unet")
    assert probe["plain"]["unet"] < unet["recorded_db"] - SATURATION_LOSS_DB, probe  # the hazard is real there


@on_x86_linux
def test_edge_info_says_which_int8_path_an_avx2_cpu_takes(int8_bundle):
    out = _emulated("EPYC", "-m", "edge.cli", "info", str(int8_bundle)).stdout
    assert "u8u8 on AVX2 without VNNI" in out and "no faster than fp32" in out
    plan = _emulated("EPYC", "-m", "edge.cli", "plan", str(int8_bundle), "--memory-budget", "2GB").stdout
    assert "note: text_encoder, unet int8 on this CPU" in plan and "no faster than fp32" in plan
    native = run_edge("info", int8_bundle).stdout
    assert f"int8: {features().int8_path}" in native


def test_plan_says_when_int8_is_not_faster_here(int8_bundle):
    from edge.plan import int8_notes

    manifest = read_manifest(int8_bundle)
    assert int8_notes(manifest, VNNI) == ()
    (note,) = int8_notes(manifest, AVX2_ONLY)
    assert "text_encoder, unet" in note and "no faster than fp32" in note
    assert int8_notes(manifest, CpuFeatures("aarch64", "hwcap", ())) != ()


def test_u8u8_is_the_same_arithmetic_as_vnni(int8_bundle):
    """The fix is exact, not approximate: on any CPU the U8U8 session and the default one agree to float
    rounding where the default is exact (VNNI/ARM), and the stored fp32 outputs are matched alike."""
    if features().u8s8_saturates:
        pytest.skip("this CPU's default U8S8 kernel saturates; the emulated test covers the comparison")
    c = read_manifest(int8_bundle).components["unet"]
    with np.load(int8_bundle / c.quantization["check"]["file"]) as data:
        feeds = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    default = ort.InferenceSession(str(int8_bundle / c.file), providers=["CPUExecutionProvider"]).run(None, feeds)
    options = session_options()
    options.add_session_config_entry("session.x64quantprecision", "1")
    u8u8 = ort.InferenceSession(str(int8_bundle / c.file), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    assert psnr(default[0], u8u8[0]) > 90


def test_a_feature_counts_only_where_the_os_saves_its_registers():
    """CPUID can report AVX-512 VNNI on a VM whose OS does not save ZMM state (XCR0); onnxruntime then does not
    use it, so neither may edge: that CPU saturates, and gets the exact path. The registers are the ones a
    Sapphire Rapids reports (leaf 1 ECX with OSXSAVE, leaf 7 with AVX2/AVX-512/VNNI/AMX bits)."""
    from edge.cpu import _x86_flags

    regs = {(0, 0): (0x20, 0, 0, 0), (1, 0): (0, 0, (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29), 0),
            (7, 0): (0, (1 << 5) | (1 << 16) | (1 << 30), 1 << 11, (1 << 24) | (1 << 25)), (7, 1): (0, 0, 0, 0)}

    def cpu_with(xcr0: int):
        def cpuid(leaf: int, subleaf: int = 0):
            return regs[leaf, subleaf]

        cpuid.xgetbv = lambda: xcr0
        return CpuFeatures("x86_64", "cpuid", _x86_flags(cpuid))

    full, no_zmm = cpu_with(0x600E7), cpu_with(0x7)
    assert full.has("avx512_vnni") and full.has("amx_int8") and session_config(full) == {}
    assert no_zmm.flags == ("avx", "fma", "f16c", "avx2") and session_config(no_zmm) == AVX2_ONLY_CONFIG


AVX2_ONLY_CONFIG = {"session.x64quantprecision": "1"}
