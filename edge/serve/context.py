"""What every route shares: the server's parts, the bounded body reader, and waiting on a job from asyncio."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from edge.serve.bundles import Bundles
from edge.serve.config import ServeConfig
from edge.serve.gallery import Gallery
from edge.serve.jobs import Job, Jobs
from edge.serve.params import ApiError

log = logging.getLogger("edge.serve")


@dataclass
class Server:
    config: ServeConfig
    bundles: Bundles
    gallery: Gallery
    jobs: Jobs
    a1111_options: dict[str, Any] = field(default_factory=dict)  # POSTed options kept for GET (no effect)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read no further than `limit` bytes (413 beyond: a declared length is
    refused before reading, a chunked body as soon as it passes the limit)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body is larger than this server's limit of {limit} bytes (--max-body); "
                            "send smaller pictures")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def wait_final(job: Job, request: Request, jobs: Jobs) -> bool:
    """Wait until the job ends; if the client goes away first, cancel it (its answer has nowhere to go) and
    return False. The worker goes on with the next job either way."""
    seen = -1
    while not job.final:
        seen = await job.changes.wait(seen, 0.5)
        if not job.final and await request.is_disconnected():
            log.info("job %s: client disconnected, cancelling it", job.id)
            jobs.cancel(job)
            return False
    return True


def job_view(server: Server, job: Job) -> dict[str, Any]:
    """GET /api/jobs/{id}: the page's view of a job."""
    images = [e.as_dict() for e in job.images]
    return {"id": job.id, "state": job.state, "position": server.jobs.position(job), "step": job.step,
            "steps": job.steps, "error": job.error, "image": images[0] if images else None, "images": images,
            "seed": None if job.request is None else job.request.seed, "bundle": job.bundle}
