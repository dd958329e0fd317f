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
