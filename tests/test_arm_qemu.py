"""The device runtime on 64-bit ARM, under QEMU user-mode emulation: same wheels, same picture as on x86.

apps/arm/make_sysroot.sh builds (once; later runs reuse it) an arm64 Debian sysroot with the aarch64 wheels of
numpy, onnxruntime, pillow and tokenizers at the host's versions; apps/arm/run.sh runs the real CLI there.
Emulation is tens to hundreds of times slower than native, so only the default (tiny) model, 4 steps.
A machine that cannot fetch qemu, the arm64 packages or the wheels FAILS this test: it does not skip.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from edge.metrics import psnr
from edge.pipeline import Pipeline

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason=f"QEMU arm64 emulation test runs on x86_64 Linux hosts, this is {sys.platform} {platform.machine()}",
)

SYSROOT = Path(os.environ.get("EDGE_ARM_SYSROOT", REPO / "build/arm64-sysroot")).resolve()  # as the scripts pick it
RUNTIME = ("numpy", "onnxruntime", "pillow", "tokenizers")
PROMPT, STEPS, SEED = "a red circle on a blue background", 4, 0
PROBE = """
import json, platform
from importlib import metadata
import edge, numpy, onnxruntime
print(json.dumps({"machine": platform.machine(), "edge": edge.__file__, "numpy": numpy.__file__,
                  "versions": {n: metadata.version(n) for n in %r}}))
""" % (RUNTIME,)


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable})


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return proc


@functools.cache
def _build_sysroot() -> subprocess.CompletedProcess:
    """Once per session, by the script a person runs; a warm sysroot is reused in well under a second."""
    t = time.perf_counter()
    proc = _run(["bash", str(REPO / "apps/arm/make_sysroot.sh")], timeout=900)
    print(f"arm64 sysroot ready in {time.perf_counter() - t:.1f}s")
    return proc


def _arm_python() -> list[str]:
    """The sysroot's python under QEMU; the test FAILS (never skips) when the sysroot cannot be built."""
    _check(_build_sysroot(), "apps/arm/make_sysroot.sh")
    return ["bash", str(REPO / "apps/arm/run.sh")]


def test_emulated_python_is_arm64_with_the_hosts_wheels():
    out = _check(_run([*_arm_python(), "-c", PROBE], timeout=300), "the emulated python").stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["machine"] == "aarch64"
    assert probe["versions"] == {n: metadata.version(n) for n in RUNTIME}
    assert probe["edge"].startswith(str(REPO / "edge"))  # this checkout's runtime, not an installed copy
    assert probe["numpy"].startswith(str(SYSROOT))  # the aarch64 wheel, not the host's


def test_arm64_image_matches_x86(bundles, tmp_path):
    bundle = bundles["folder-epsilon"]
    native = Pipeline.load(bundle, threads=1).generate(PROMPT, steps=STEPS, seed=SEED).images[0]

    t = time.perf_counter()
    args = ["-m", "edge.cli", "generate", str(bundle), PROMPT, "--steps", str(STEPS), "--seed", str(SEED),
            "--threads", "1", "-o", str(tmp_path / "arm.png")]
    proc = _check(_run([*_arm_python(), *args], timeout=600), "edge generate under arm64 emulation")
    print(f"emulated generation {time.perf_counter() - t:.1f}s: {proc.stdout.strip().splitlines()[-1]}")

    a = np.asarray(native.convert("RGB"))  # (H, W, 3) uint8
    b = np.asarray(Image.open(tmp_path / "arm.png").convert("RGB"))  # (H, W, 3) uint8
    assert a.shape == b.shape
    figure = psnr(a, b, peak=255.0)
    print(f"arm64 vs x86 PSNR {figure:.1f} dB")
    assert figure >= 40.0, f"arm64 image differs from x86: PSNR {figure:.1f} dB < 40"


def test_arm64_static_int8_is_as_close_to_fp32_as_on_x86(tmp_path):
    """Static int8 runs its convolutions as QLinearConv, whose arm64 kernels differ from x86's (VNNI); rounding
    of the requantization differs, so the two int8 images are not bit-equal (measured 30.3 dB apart on the
    default model, 4 steps), but each is equally close to the fp32 image (27.8 dB both)."""
    from edge.converters.convert import Options, convert

    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    convert("default", fp32, options=Options(profile_memory=False, tiled_vae=False), log=lambda s: None)
    convert("default", int8, options=Options(precision="int8", activations="static", profile_memory=False,
                                             tiled_vae=False), log=lambda s: None)
    image = lambda b: np.asarray(Pipeline.load(b, threads=1).generate(PROMPT, steps=STEPS, seed=SEED).images[0])
    reference, x86 = image(fp32), image(int8)
    args = ["-m", "edge.cli", "generate", str(int8), PROMPT, "--steps", str(STEPS), "--seed", str(SEED),
            "--threads", "1", "-o", str(tmp_path / "arm.png")]
    _check(_run([*_arm_python(), *args], timeout=600), "static int8 edge generate under arm64 emulation")
    arm = np.asarray(Image.open(tmp_path / "arm.png").convert("RGB"))
    on_x86, on_arm = psnr(reference, x86, peak=255.0), psnr(reference, arm, peak=255.0)
    print(f"static int8 vs fp32: x86 {on_x86:.1f} dB, arm64 {on_arm:.1f} dB; "
          f"arm64 vs x86 {psnr(x86, arm, peak=255.0):.1f} dB")
    assert on_arm >= on_x86 - 1.0 and on_x86 > 20.0
    # and the manifest's own figures, on the Pi 4's core (no dot product), on one with dot product, i8mm and SVE,
    # and with SME too (QEMU's "max": where edge.cpu turns KleidiAI's int8 kernels off): the same figures on all
    for cpu in ("cortex-a72", "max,sme=off", "max"):
        proc = subprocess.run([*_arm_python(), "-m", "edge.cli", "check", str(int8)], capture_output=True,
                              text=True, timeout=600, cwd=REPO, env={**os.environ, "QEMU_CPU": cpu})
        assert proc.returncode == 0, f"edge check on arm64 {cpu}:\n{proc.stdout}\n{proc.stderr[-2000:]}"
        expected = "NEON widening multiply" if cpu == "cortex-a72" else "dot product + i8mm"
        assert expected in proc.stdout and proc.stdout.count(" ok") == 2, proc.stdout
