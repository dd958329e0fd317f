"""The ASGI app: the page, its API (edge/serve/api.py) and A1111's (edge/serve/sdapi.py), behind the token
(edge/serve/auth.py) and, only when asked, CORS.

    app = create_app(ServeConfig(bundles=(Path("bundle"),)))   # reads every manifest, loads the first bundle
    uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge.serve import a1111, api, sdapi
from edge.serve.auth import TokenAuth
from edge.serve.bundles import Bundles
from edge.serve.config import ServeConfig
from edge.serve.context import Server
from edge.serve.gallery import Gallery
from edge.serve.jobs import Jobs
from edge.serve.params import ApiError
from edge.serve.runner import Runner

log = logging.getLogger("edge.serve")
STATIC = Path(__file__).resolve().parent / "static"


def create_app(config: ServeConfig, preload: bool = True) -> Starlette:
    """The app over `config`'s bundles. `preload` loads the first bundle now, so that a budget it cannot meet,
    or a damaged graph, stops the server before it listens (the error names it) instead of failing a request."""
    bundles = Bundles(config)
    if preload:
        bundles.pipeline(bundles.current)
    gallery = Gallery(config.outputs)
    jobs = Jobs(Runner(bundles, gallery, config.preview_every, config.lora_dir).run, config.limits.queue)
    server = Server(config, bundles, gallery, jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        jobs.start()
        try:
            yield
        finally:
            jobs.close()
            bundles.unload()

    async def page(request: Request) -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "the page is not installed (edge/serve/static/index.html is missing); the APIs work")
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    routes = [Route("/", page, methods=["GET"]), *api.routes(server), *sdapi.routes(server),
              Mount("/static", app=StaticFiles(directory=STATIC, check_dir=False), name="static")]
    middleware = []
    if config.cors:  # outside the token check: a browser's preflight carries no credentials
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type"]))
    if config.token is not None:
        middleware.append(Middleware(TokenAuth, token=config.token))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _refusal, 404: _not_found, 405: _not_allowed})
    app.state.server = server
    return app


async def _refusal(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    if request.url.path.startswith("/sdapi/"):
        body = a1111.error_body(e)
    else:
        body = {"error": e.message, **({"field": e.field} if e.field else {})}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def _not_found(request: Request, e: Exception) -> Response:
    return await _refusal(request, ApiError(404, f"no such page or endpoint: {request.url.path}"))


async def _not_allowed(request: Request, e: Exception) -> Response:
    return await _refusal(request, ApiError(405, f"{request.method} is not accepted at {request.url.path}"))
