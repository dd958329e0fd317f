"""The page's own API (edge/serve/static/ codes against exactly this):

    GET  /api/info                        bundles (name, path, bundle_id, precision, default_size [h, w], size_multiple,
                                          sizes [[h, w], ...], family, inpainting, backend), current, backend, threads,
                                          memory_budget (bytes | null), plan_peak_bytes (int | null), schedulers,
                                          limits {max_steps, max_pixels, max_side, max_batch, max_body_bytes,
                                          max_prompt_chars, queue}, cpu
    POST /api/jobs                        {prompt, negative_prompt, steps, scheduler, guidance, seed (-1: random),
                                          width, height, bundle, image (data URL or base64 PNG/JPEG/WebP),
                                          mask (same; white = repaint), strength, mask_blur, prompt_syntax}
                                          -> 202 {id, position, seed}; 4xx {error, field}; 429 {error} + Retry-After
    GET  /api/jobs/{id}                   {id, state (queued|running|done|failed|cancelled), position, step, steps,
                                          error, image {name, url, params} | null, images, seed, bundle}
    GET  /api/jobs/{id}/events            server-sent events, JSON data: queued {position}, progress {step, steps,
                                          preview: "data:image/png;base64,..." when a new one is ready}, then one of
                                          done {image, images}, failed {error}, cancelled {}; the stream then ends
    POST /api/jobs/{id}/cancel            -> {state}: "cancelled" once it stopped (a running job stops at its next step)
    GET  /api/gallery?offset=&limit=      {images: [{name, url, params, created (ISO 8601)}], total}, newest first
    GET  /api/gallery/{name}[?download=1] the PNG (download=1: as an attachment)
    DELETE /api/gallery/{name}            {deleted: name}

Positions: 0 = running (or about to start), k = k jobs will run before it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge.serve.context import Server, job_view, read_json
from edge.serve.info import server_info
from edge.serve.jobs import Job
from edge.serve.params import ApiError, job_request, take

HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle event stream


def routes(server: Server) -> list[Route]:
    limits = server.config.limits

    async def info(request: Request) -> Response:
        return JSONResponse(server_info(server))

    async def submit(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        req = job_request(body, limits)
        bundle = server.bundles.find(req.bundle)
        req = bundle.resolve(req, limits)
        job = Job(req, bundle.name)
        position = server.jobs.submit(job)
        return JSONResponse({"id": job.id, "position": position, "seed": req.seed}, status_code=202)

    async def status(request: Request) -> Response:
        return JSONResponse(job_view(server, server.jobs.get(request.path_params["id"])))

    async def events(request: Request) -> Response:
        job = server.jobs.get(request.path_params["id"])
        return StreamingResponse(_stream(server, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def cancel(request: Request) -> Response:
        job = server.jobs.get(request.path_params["id"])
        server.jobs.cancel(job)
        seen, waited = -1, 0.0
        while not job.final and waited < 2.0:  # a running job stops at its next step: usually well within this
            seen = await job.changes.wait(seen, 0.25)
            waited += 0.25
        return JSONResponse({"state": job.state})

    async def gallery(request: Request) -> Response:
        query = _query_ints(request, offset=0, limit=50)
        entries, total = server.gallery.entries(query["offset"], min(query["limit"], 500))
        return JSONResponse({"images": [e.as_dict() for e in entries], "total": total})

    async def picture(request: Request) -> Response:
        path = server.gallery.path(request.path_params["name"])
        attach = request.query_params.get("download") in ("1", "true")
        return FileResponse(path, media_type="image/png", filename=path.name if attach else None,
                            content_disposition_type="attachment" if attach else "inline")

    async def delete(request: Request) -> Response:
        name = request.path_params["name"]
        server.gallery.delete(name)
        return JSONResponse({"deleted": name})

    return [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{id}", status, methods=["GET"]),
        Route("/api/jobs/{id}/events", events, methods=["GET"]),
        Route("/api/jobs/{id}/cancel", cancel, methods=["POST"]),
        Route("/api/gallery", gallery, methods=["GET"]),
        Route("/api/gallery/{name}", picture, methods=["GET"]),
        Route("/api/gallery/{name}", delete, methods=["DELETE"]),
    ]


def _query_ints(request: Request, **defaults: int) -> dict[str, int]:
    values: dict[str, Any] = {}
    for name, default in defaults.items():
        text = request.query_params.get(name)
        if text is not None and not text.isdigit():
            raise ApiError(422, f"{name} must be a whole number >= 0, got {text!r}", name)
        values[name] = default if text is None else int(text)
    return values


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _stream(server: Server, job: Job) -> AsyncIterator[str]:
    """The job's events until it ends. A client that goes away ends only the stream (Starlette cancels this
    generator), never the job: its image still goes to the gallery."""
    seen, sent_position, sent_step, sent_preview = -1, None, None, None
    while True:
        version = await job.changes.wait(seen, HEARTBEAT)
        if version == seen:
            yield ": keep-alive\n\n"
            continue
        seen = version
        state = job.state
        if state == "queued" or (state == "running" and not job.steps):
            position = server.jobs.position(job)
            if position != sent_position:
                sent_position = position
                yield _event("queued", {"position": position})
        elif state == "running" and (job.image_no, job.step) != sent_step:
            sent_step = (job.image_no, job.step)
            data: dict[str, Any] = {"step": job.step, "steps": job.steps, "image_no": job.image_no,
                                    "images": job.request.num_images if job.request else 1}
            preview = job.preview
            if preview is not None and (job.image_no, job.preview_step) != sent_preview:
                sent_preview = (job.image_no, job.preview_step)
                data["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode("ascii")
            yield _event("progress", data)
        if job.final:
            yield _final(job)
            return
        await asyncio.sleep(0)


def _final(job: Job) -> str:
    images = [e.as_dict() for e in job.images]
    if job.state == "done":
        return _event("done", {"image": images[0] if images else None, "images": images})
    if job.state == "failed":
        return _event("failed", {"error": job.error})
    return _event("cancelled", {})
