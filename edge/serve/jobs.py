"""One generation at a time: a bounded queue, one worker thread, and job state that HTTP handlers await.

The worker thread runs jobs in order (onnxruntime releases the GIL, so the event loop keeps answering while a
UNet runs). A job's state changes only on the worker thread (or under the queue's lock, for a queued job
cancelled); each change bumps the job's `Changes`, which asyncio handlers (server-sent events, A1111's blocking
txt2img) await without a thread of their own.

Positions: 0 for the job running (or about to start), k for a job with k jobs to run before it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from edge.serve.params import ApiError, GenerationRequest

log = logging.getLogger("edge.serve")
FINAL = ("done", "failed", "cancelled")
KEEP_FINISHED = 256  # finished jobs still answerable by id


class Changes:
    """A version number that any thread bumps and asyncio tasks await."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def bump(self) -> None:
        with self._lock:
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    async def wait(self, seen: int, timeout: float) -> int:
        """The version, once it differs from `seen` or `timeout` seconds have passed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.version != seen:
                return self.version
            future = loop.create_future()
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            with self._lock:
                self._waiters = [w for w in self._waiters if w[1] is not future]
        return self.version


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class Job:
    """A generation (or, with request None, a bundle switch) and what has become of it."""

    request: GenerationRequest | None
    bundle: str  # resolved at submit time
    source: str = "api"  # "api" (the page) or "a1111": what the job's images and events are reported as
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0  # steps done of the current image
    steps: int = 0  # steps the current image runs (img2img: the last `strength` of them)
    image_no: int = 0  # which image of the request runs now
    images: list[Any] = field(default_factory=list)  # gallery entries (edge.serve.gallery.Entry)
    error: str | None = None
    status: int = 500  # HTTP status a failure is answered with (4xx: the request's fault)
    preview: bytes | None = None  # PNG of the latest preview
    preview_step: int = 0
    stop: str | None = None  # asked: "cancel" (drop it), "interrupt" (stop, keep what is there), "skip" (next image)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    changes: Changes = field(default_factory=Changes)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def set(self, **values: Any) -> None:
        """Change fields and tell the listeners (worker thread, or the queue's lock for a queued job)."""
        for name, value in values.items():
            setattr(self, name, value)
        if values.get("state") in FINAL:
            self.finished = time.time()
        self.changes.bump()


class QueueFull(ApiError):
    def __init__(self, capacity: int, retry_after: int):
        super().__init__(429, f"the queue is full ({capacity} jobs waiting); try again in about {retry_after} s",
                         headers={"Retry-After": str(retry_after)})


class Jobs:
    """The queue and its worker; `run(job)` does the work (edge.serve.runner.Runner.run)."""

    def __init__(self, run: Callable[[Job], None], capacity: int):
        self._run, self.capacity = run, capacity
        self._pending: deque[Job] = deque()
        self._known: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Condition()
        self.running: Job | None = None
        self._closing = False
        self._seconds = 10.0  # running mean of a job's duration, for Retry-After
        self._thread = threading.Thread(target=self._work, name="edge-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and wait for the worker to leave the running job (at its next step)."""
        with self._lock:
            self._closing = True
            cancelled = list(self._pending)
            self._pending.clear()
            if self.running is not None:
                self.running.stop = "cancel"
            self._lock.notify_all()
        for job in cancelled:
            job.set(state="cancelled")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue a job; its position, or QueueFull (429) when `capacity` jobs are already waiting."""
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down")
            if len(self._pending) >= self.capacity:
                ahead = len(self._pending) + (self.running is not None)
                raise QueueFull(self.capacity, max(1, round(self._seconds * ahead)))
            self._pending.append(job)
            self._known[job.id] = job
            self._lock.notify_all()
            return self._position(job)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._known.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for the latest {KEEP_FINISHED})", "id")
        return job

    def position(self, job: Job) -> int:
        with self._lock:
            return self._position(job)

    def _position(self, job: Job) -> int:
        if job is self.running or job.final:
            return 0
        try:
            return self._pending.index(job) + (self.running is not None)
        except ValueError:
            return 0  # taken by the worker a moment ago

    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    def cancel(self, job: Job) -> None:
        """A queued job is dropped now; a running one stops at its next step, without an image."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                queued = True
            else:
                queued = False
                if not job.final:
                    job.stop = "cancel"
        if queued:
            job.set(state="cancelled")
            self._moved()

    def stop_running(self, kind: str) -> Job | None:
        """A1111's interrupt / skip: the running job stops (keeping its partial image)."""
        with self._lock:
            job = self.running
            if job is not None and job.stop is None:
                job.stop = kind
        return job

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self.running = self._pending.popleft()
            self._moved()
            started = time.perf_counter()
            try:
                self._run(job)
            except Exception as e:  # the runner reports its own failures; this is a bug, kept from the worker
                log.exception("job %s: unexpected failure", job.id)
                job.error = f"internal error: {type(e).__name__}: {e}"
                job.set(state="failed")
            with self._lock:
                self.running = None
                self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - started)
                self._forget()
            self._moved()

    def _moved(self) -> None:
        """Queued jobs' positions changed: tell their listeners."""
        with self._lock:
            pending = list(self._pending)
        for job in pending:
            job.changes.bump()

    def _forget(self) -> None:
        finished = [k for k, j in self._known.items() if j.final]
        for k in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._known[k]
