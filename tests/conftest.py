"""Shared fixtures: tiny random SD pipelines on disk, and the bundles `edge convert` makes of them.

Built once per test session; every test reads them, none modifies them (copy first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge  # noqa: F401  first: it takes the checkout's root (`python -m pytest` puts it on sys.path) off sys.path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
EDGE = [sys.executable, "-m", "edge.cli"]


def run_edge(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, as a user runs it."""
    proc = subprocess.run([*EDGE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def euler_pipeline(folder: Path):
    """diffusers' StableDiffusionPipeline of a tiny model folder with the Euler sampler: the adapters' reference."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny pipelines as diffusers folders and as LDM single files with their config folders."""
    from edge.converters.tiny import save_tiny, save_tiny_single_file

    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for pred in ("epsilon", "v_prediction"):
        out[f"folder-{pred}"] = save_tiny(root / f"folder-{pred}", prediction_type=pred, seed=1)
        path = root / f"single-{pred}.safetensors"
        save_tiny_single_file(path, root / f"config-{pred}", prediction_type=pred, seed=1)
        out[f"single-{pred}"] = path
        out[f"config-{pred}"] = root / f"config-{pred}"
    return out


@pytest.fixture(scope="session")
def bundles(models, tmp_path_factory) -> dict[str, Path]:
    """`edge convert` of each model in `models`, through the library call."""
    from edge.converters.convert import convert

    root = tmp_path_factory.mktemp("bundles")
    out: dict[str, Path] = {}
    for pred in ("epsilon", "v_prediction"):
        out[f"folder-{pred}"] = root / f"folder-{pred}"
        convert(str(models[f"folder-{pred}"]), out[f"folder-{pred}"], log=lambda s: None)
        out[f"single-{pred}"] = root / f"single-{pred}"
        convert(str(models[f"single-{pred}"]), out[f"single-{pred}"], config=str(models[f"config-{pred}"]),
                log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The embedded default model converted (fp32, no tiled decoder, no memory profile): read it, never modify it."""
    from edge.converters.convert import Options, convert

    out = tmp_path_factory.mktemp("default") / "bundle"
    convert("default", out, options=Options(tiled_vae=False, profile_memory=False), log=lambda s: None)
    return out
