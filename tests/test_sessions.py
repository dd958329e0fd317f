"""onnxruntime's CPU arena as the runtime uses it: per run without a budget (given back after every run), off under
one; the same pictures either way."""

from __future__ import annotations

import numpy as np
import pytest

from edge.pipeline import Pipeline
from edge.sessions import run_options, session_options


def test_arena_modes_and_their_run_options():
    assert session_options(memory_arena="per_run").enable_cpu_mem_arena
    assert session_options(memory_arena="kept").enable_cpu_mem_arena
    assert session_options(memory_arena=True).enable_cpu_mem_arena
    assert not session_options(memory_arena="off").enable_cpu_mem_arena
    assert not session_options().enable_cpu_mem_arena
    shrink = run_options("per_run")
    assert shrink.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert run_options("kept") is None and run_options("off") is None and run_options(False) is None
    with pytest.raises(ValueError, match="choose one of off, per_run, kept"):
        session_options(memory_arena="sometimes")


def test_the_arena_per_run_without_a_budget_off_under_one(bundles):
    bundle = bundles["folder-epsilon"]
    fast = Pipeline.load(bundle)
    lean = Pipeline.load(bundle, memory_budget="4GB")
    assert fast.graphs.run_options is not None and fast._option_args["memory_arena"] == "per_run"
    assert lean.graphs.run_options is None and lean._option_args["memory_arena"] == "off"
    off = Pipeline.load(bundle, memory_arena="off")
    a = np.asarray(fast.generate("a red circle", steps=3, seed=5).images[0])
    b = np.asarray(off.generate("a red circle", steps=3, seed=5).images[0])
    assert np.array_equal(a, b)  # where the buffers come from changes no number
    again = np.asarray(fast.generate("a red circle", steps=3, seed=5).images[0])  # after the arena was shrunk
    assert np.array_equal(a, again)
