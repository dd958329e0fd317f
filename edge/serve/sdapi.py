"""The routes of AUTOMATIC1111's API (`/sdapi/v1/...`); the field mapping and its differences: edge/serve/a1111.py.

txt2img and img2img answer when their job is done, as A1111 does: the job waits in the same queue as the
page's jobs (429 + Retry-After when it is full), and a client that disconnects first cancels it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge.png import read_parameters_text
from edge.serve import a1111
from edge.serve.bundles import embedding_files, lora_files
from edge.serve.context import Server, read_json, wait_final
from edge.serve.info import memory
from edge.serve.jobs import Job
from edge.serve.params import ApiError

# Endpoints of A1111 whose subject does not exist here: clients that list them get an empty answer, not a 404.
EMPTY: dict[str, Any] = {"upscalers": [], "latent-upscale-modes": [], "sd-vae": [], "hypernetworks": [],
                         "face-restorers": [], "realesrgan-models": [], "prompt-styles": [],
                         "scripts": {"txt2img": [], "img2img": []},
                         "script-info": [], "extensions": []}


def routes(server: Server) -> list[Route]:
    limits = server.config.limits

    async def generate(request: Request, img2img: bool) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        req, bundle, echo = a1111.request(body, img2img, limits, server.bundles)
        req = bundle.resolve(req, limits)
        job = Job(req, bundle.name, source="a1111")
        server.jobs.submit(job)
        if not await wait_final(job, request, server.jobs):
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
        if job.state == "failed":
            raise ApiError(job.status, job.error or "the job failed")
        if job.state == "cancelled":
            raise ApiError(503, "the job was cancelled before it made an image (the server is shutting down, or "
                                "it was cancelled through /api/jobs)")
        paths = [server.gallery.path(e.name) for e in job.images]
        pngs, texts = [p.read_bytes() for p in paths], [read_parameters_text(p) for p in paths]
        return JSONResponse(a1111.response(job, echo, pngs, texts, bundle, img2img))

    async def txt2img(request: Request) -> Response:
        return await generate(request, img2img=False)

    async def img2img(request: Request) -> Response:
        return await generate(request, img2img=True)

    async def progress(request: Request) -> Response:
        skip = request.query_params.get("skip_current_image", "false").lower() in ("1", "true")
        return JSONResponse(a1111.progress(server.jobs.running, skip))

    async def interrupt(request: Request) -> Response:
        server.jobs.stop_running("interrupt")
        return JSONResponse({})

    async def skip(request: Request) -> Response:
        server.jobs.stop_running("skip")
        return JSONResponse(None)

    async def get_options(request: Request) -> Response:
        return JSONResponse(a1111.options(server.bundles, server.a1111_options, str(server.gallery.folder),
                                          server.config.preview_every))

    async def set_options(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        checkpoint = body.pop("sd_model_checkpoint", None)
        if checkpoint is not None:
            bundle = a1111.find_checkpoint(server.bundles, checkpoint)
            job = Job(None, bundle.name, source="a1111")  # loading is a job: it waits its turn in the queue
            server.jobs.submit(job)
            if await wait_final(job, request, server.jobs) and job.state == "failed":
                raise ApiError(job.status, f"could not load {bundle.name}: {job.error}")
        server.a1111_options.update(body)
        return JSONResponse(None)

    def constant(value: Any):
        async def answer(request: Request) -> Response:
            return JSONResponse(value)
        return answer

    return [
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
        Route("/sdapi/v1/progress", progress, methods=["GET"]),
        Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
        Route("/sdapi/v1/skip", skip, methods=["POST"]),
        Route("/sdapi/v1/options", get_options, methods=["GET"]),
        Route("/sdapi/v1/options", set_options, methods=["POST"]),
        Route("/sdapi/v1/samplers", constant(a1111.samplers()), methods=["GET"]),
        Route("/sdapi/v1/schedulers", constant(list(a1111.SCHEDULERS)), methods=["GET"]),
        Route("/sdapi/v1/sd-models", lambda r: JSONResponse(a1111.sd_models(server.bundles)), methods=["GET"]),
        Route("/sdapi/v1/memory", lambda r: JSONResponse(memory()), methods=["GET"]),
        Route("/sdapi/v1/refresh-checkpoints", constant(None), methods=["POST"]),
        Route("/sdapi/v1/cmd-flags", constant({}), methods=["GET"]),
        Route("/sdapi/v1/loras", lambda r: JSONResponse(lora_files(server.config.lora_dir)), methods=["GET"]),
        Route("/sdapi/v1/embeddings", lambda r: JSONResponse(
            {"loaded": {p.stem: {} for p in embedding_files(server.config.embeddings_dir)}, "skipped": {}}),
              methods=["GET"]),
        *(Route(f"/sdapi/v1/{path}", constant(value), methods=["GET"]) for path, value in EMPTY.items()),
    ]
