"""`edge serve` on 64-bit ARM, under QEMU user-mode emulation: the aarch64 runtime serves one A1111 txt2img
request from a client on the host, over loopback, and the picture is the x86 pipeline's.

The sysroot is apps/arm/make_sysroot.sh's (the runtime's aarch64 wheels; anyio, click, h11 and idna come with
them). starlette and uvicorn are pure Python: the emulated python reads the host's copies, linked into a
folder of their own, so nothing x86 is on its path. Skips with the reason where the sysroot cannot be had.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason=f"QEMU arm64 emulation runs on x86_64 Linux hosts, this is {sys.platform} {platform.machine()}",
)
httpx = pytest.importorskip("httpx", reason="needs httpx (pip install -e '.[test]')")
PURE = ("starlette", "uvicorn")  # the serve extra's packages the sysroot lacks
PROMPT, STEPS, SEED = "a red circle on a blue background", 4, 0
SERVE = """
import sys
sys.path.append(sys.argv.pop(1))  # after the sysroot's own packages: only starlette and uvicorn come from here
from edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def arm_python(tmp_path_factory) -> tuple[list[str], Path]:
    """apps/arm/run.sh (built or reused by make_sysroot.sh) and the folder of the serve packages it adds."""
    proc = subprocess.run(["bash", str(REPO / "apps/arm/make_sysroot.sh")], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        pytest.skip(f"no arm64 sysroot (apps/arm/make_sysroot.sh failed: {proc.stderr.strip()[-300:]})")
    site = tmp_path_factory.mktemp("arm-serve-site")
    for name in PURE:
        module = __import__(name)
        source = Path(module.__file__).parent
        assert not list(source.rglob("*.so")), f"{name} is not pure Python here: {source}"
        (site / name).symlink_to(source)
    return ["bash", str(REPO / "apps/arm/run.sh")], site


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from edge.converters.convert import Options, convert

    out = tmp_path_factory.mktemp("arm-serve") / "bundle"
    convert("default", out, options=Options(profile_memory=False, tiled_vae=False), log=lambda s: None)
    return out


def test_emulated_server_answers_a_txt2img(arm_python, bundle, tmp_path):
    run, site = arm_python
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    argv = [*run, "-c", SERVE, str(site), "serve", str(bundle), "--port", str(port), "--outputs",
            str(tmp_path / "outputs"), "--threads", "1"]
    server = subprocess.Popen(argv, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        while True:
            try:
                info = httpx.get(url + "/api/info", timeout=5).json()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.perf_counter() - t > 300:
                    pytest.fail(f"emulated edge serve did not start:\n{log.read_text()[-3000:]}", pytrace=False)
                time.sleep(0.5)
        started = time.perf_counter() - t
        t = time.perf_counter()
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": STEPS, "seed": SEED,
                                                        "sampler_name": "Euler", "cfg_scale": 7.5}, timeout=600)
        print(f"emulated server: up in {started:.1f}s, txt2img answered in {time.perf_counter() - t:.1f}s")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert info["cpu_features"]["arch"] == "aarch64", info["cpu_features"]
    assert r.status_code == 200, r.text[-1000:]
    import base64
    import io

    from edge.metrics import psnr
    from edge.pipeline import Pipeline

    arm = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert "Seed: 0" in arm.text["parameters"]
    native = Pipeline.load(bundle, threads=1).generate(PROMPT, steps=STEPS, seed=SEED, guidance=7.5,
                                                       scheduler="euler", prompt_syntax="a1111").images[0]
    figure = psnr(np.asarray(native.convert("RGB")), np.asarray(arm.convert("RGB")), peak=255.0)
    print(f"arm64 server image vs x86 pipeline: {figure:.1f} dB")
    assert figure >= 40.0, f"{figure:.1f} dB"
    assert "Traceback" not in log.read_text()
