"""`edge serve`: a web app and HTTP API over the runtime, for a board or a Mac on the local network.

Rooms, each one job:
- config.py   the server's settings and limits (frozen dataclasses; the CLI fills them)
- auth.py     the access token: loopback needs none, any other bind refuses requests without it (401)
- params.py   what a generation request is (GenerationRequest), and the checks at the HTTP boundary
- a1111.py    the AUTOMATIC1111 web UI's API mapped onto GenerationRequest, and its responses
- bundles.py  the bundles served; one pipeline loaded at a time, unloaded before another is loaded
- jobs.py     the bounded queue and its single worker thread; job state that asyncio handlers await
- runner.py   one job on one pipeline: progress, previews, cancel / interrupt, images into the gallery
- gallery.py  the outputs folder: atomic writes, listing with parameters, names that cannot escape it
- app.py      the ASGI app (Starlette): routes, body limits, server-sent events
- cli.py      `edge serve` argument parsing, then uvicorn

Nothing here is imported by the runtime; starlette and uvicorn (the `serve` extra) are imported only by
app.py and cli.py's run function, so `edge --help` works without them.
"""
