"""The device runtime never loads torch, diffusers or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = """
import json, sys
from edge import Pipeline
from edge.png import save_png
pipe = Pipeline.load(sys.argv[1])
for scheduler in ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lcm"):
    result = pipe.generate("a red circle", steps=2, scheduler=scheduler)
save_png(result.images[0], sys.argv[2], result.params)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "coremltools"))
print(json.dumps(heavy))
"""


def test_generation_imports_no_host_libraries(bundles, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundles["folder-epsilon"]), str(tmp_path / "o.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "o.png").stat().st_size > 0


SHADOW = """
import importlib.util, json, sys
import edge
found = {name: importlib.util.find_spec(name) for name in ("kernels", "converters")}
print(json.dumps({name: spec.origin if spec else None for name, spec in found.items()}))
"""


def test_checkout_folders_do_not_shadow_pypi_packages():
    # `python -c`/`-m` from the checkout puts its root on sys.path, where `kernels/` would stand in for Hugging
    # Face's `kernels` (transformers >= 5.25 imports it). Importing edge takes the root off again.
    proc = subprocess.run([sys.executable, "-c", SHADOW], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    origins = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, origin in origins.items():
        assert origin is None or not origin.startswith(str(REPO / name)), (name, origin)
    from edge.kernels import attention  # noqa: F401  the folders still import under the edge namespace
