"""A bundle's graphs as live sessions: opened at first use, kept or freed as the memory plan says.

The one place that loads and frees; stages ask it for sessions and run them through it, so that a backend
(onnxruntime here, Core ML in edge.coreml_backend) only says how one graph becomes a session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.bundle import Component, Manifest, verify_files
from edge.memprobe import release_memory

Session = Any  # onnxruntime.InferenceSession, or an adapter with its get_inputs / get_outputs / run


class Graphs:
    def __init__(self, bundle: Path, manifest: Manifest, make_session: Callable[[Component, int], Session],
                 verify: bool):
        self.bundle, self.manifest, self._make, self._verify = bundle, manifest, make_session, verify
        self.sessions: dict[str, list[Session]] = {}  # loaded components, graphs in run order
        self.load_seconds: dict[str, float] = {}  # session creation per component, latest load
        # set to a list to log every run as (name, start, end), wall clock (the UNet: one entry per call)
        self.timed_calls: list[tuple[str, float, float]] | None = None
        self.run_options = None  # onnxruntime RunOptions every run gets (edge.sessions.run_options)
        self._verified: set[str] = set()

    def open(self, name: str, count: int | None = None) -> list[Session]:
        """The component's first `count` (default: all) sessions, loading those not resident."""
        component = self.manifest.components[name]
        count = len(component.graphs) if count is None else count
        loaded = self.sessions.setdefault(name, [])
        if len(loaded) < count:
            t = time.perf_counter()
            loaded += [self.load(component, k) for k in range(len(loaded), count)]
            self.load_seconds[name] = time.perf_counter() - t
        return loaded

    def reload(self, name: str, k: int) -> None:
        """Graph k of a component again, if it is resident (its weights changed: run-time LoRA)."""
        loaded = self.sessions.get(name, [])
        if k < len(loaded):
            loaded[k] = None  # the old session goes before the new one is made
            release_memory()
            loaded[k] = self.load(self.manifest.components[name], k)

    def load(self, component: Component, k: int) -> Session:
        """Graph k of a component as a new session (not kept: `open` keeps); its files are checked once."""
        if self._verify and component.name not in self._verified:
            verify_files(self.bundle, component)
            self._verified.add(component.name)
        return self._make(component, k)

    def prefetch(self, component: Component, k: int) -> None:
        """Ask the OS to start reading graph k's files now (a chunk loaded for every call: its read then overlaps
        the chunk running before it). Read-ahead fills the page cache, which is not the process's memory; where
        the OS has no posix_fadvise (macOS) the chunk is read when it loads."""
        if not hasattr(os, "posix_fadvise"):
            return
        graph = component.graphs[k]
        for rel in (r for r in (graph, graph + ".data") if r in component.files):
            fd = os.open(self.bundle / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def run(self, name: str, session: Session, feeds: dict[str, np.ndarray],
            outputs: list[str] | None = None, timed: bool = True) -> list[np.ndarray]:
        """One run, with `run_options`; logged in `timed_calls` (when a list) unless `timed` is False (the UNet's
        chunks: denoise logs the whole call)."""
        extra = () if self.run_options is None else (self.run_options,)
        if self.timed_calls is None or not timed:
            return session.run(outputs, feeds, *extra)
        start = time.time()  # wall clock, to line calls up with other timelines
        try:
            return session.run(outputs, feeds, *extra)
        finally:
            self.timed_calls.append((name, start, time.time()))

    def free(self, name: str) -> None:
        """Drop a component's sessions (and its cut pieces', e.g. vae_decoder_head) and return the memory."""
        for loaded in [n for n in self.sessions if n == name or n.startswith(name + "_")]:
            del self.sessions[loaded]
        release_memory()
