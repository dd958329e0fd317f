"""`edge serve BUNDLE [BUNDLE ...]`: parse, build the ServeConfig, run uvicorn. Imports nothing of the serve
extra until the command runs, so `edge --help` works without it."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from edge.serve.config import Limits, ServeConfig
from edge.validate import count_arg

DEFAULTS = Limits()


def _size(flag: str):
    def parse(text: str) -> int:
        from edge.plan import parse_bytes

        try:
            return parse_bytes(text)
        except (ValueError, OverflowError) as e:
            raise argparse.ArgumentTypeError(f"{flag}: {e}") from None
    return parse


def _budget(text: str) -> str:
    _size("--memory-budget")(text)  # checked now; the pipeline parses it again and quotes it in its messages
    return text


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a web page and an AUTOMATIC1111-compatible HTTP API for bundles",
                       description="One generation at a time, a bounded queue behind it; the first bundle is loaded "
                                   "at start, others when a request names them (the loaded one is unloaded first).")
    s.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle folders; requests name them by "
                   "folder name")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other address "
                   "needs the access token on every request)")
    s.add_argument("--port", type=count_arg("--port", minimum=1, maximum=65535), default=7860,
                   help="TCP port (default 7860, A1111's)")
    s.add_argument("--token", default=os.environ.get("EDGE_SERVE_TOKEN"),
                   help="access token to require (default: $EDGE_SERVE_TOKEN; else none on loopback, and on any other "
                        "address a generated one, printed at start)")
    s.add_argument("--cors", nargs="+", default=[], metavar="ORIGIN", help="browser origins allowed to call the API "
                   "(default: none)")
    s.add_argument("--outputs", type=Path, default=Path("outputs"), help="gallery folder (default ./outputs)")
    s.add_argument("--memory-budget", type=_budget, help="stay within this much memory, e.g. 2GB (see `edge plan`)")
    s.add_argument("--backend", choices=("onnx", "openvino", "coreml"), help="default: coreml on macOS for bundles "
                   "with Core ML graphs, else onnx; openvino: the ONNX graphs on OpenVINO (no --memory-budget)")
    s.add_argument("--compute-units", default="cpu_and_ne", help="Core ML: all, cpu_only, cpu_and_gpu, cpu_and_ne")
    s.add_argument("--threads", type=count_arg("--threads"), help="onnxruntime intra-op threads (default: all cores)")
    s.add_argument("--preview-every", type=count_arg("--preview-every", minimum=0), default=1, metavar="N",
                   help="a progress preview every N steps (0: none)")
    s.add_argument("--lora-dir", type=Path, help="folder where a prompt's <lora:NAME:SCALE> finds NAME.safetensors "
                   "(listed at /sdapi/v1/loras)")
    s.add_argument("--embeddings-dir", type=Path, help="textual-inversion embeddings (.safetensors) loaded into "
                   "every bundle, each used by its file name in prompts")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    limits = s.add_argument_group("limits (each refused with a 4xx that names it)")
    limits.add_argument("--queue", type=count_arg("--queue"), default=DEFAULTS.queue,
                        help=f"jobs waiting behind the running one; 429 beyond (default {DEFAULTS.queue})")
    limits.add_argument("--max-steps", type=count_arg("--max-steps"), default=DEFAULTS.max_steps)
    limits.add_argument("--max-pixels", type=count_arg("--max-pixels"), default=DEFAULTS.max_pixels,
                        help=f"width x height (default {DEFAULTS.max_pixels})")
    limits.add_argument("--max-side", type=count_arg("--max-side"), default=DEFAULTS.max_side)
    limits.add_argument("--max-batch", type=count_arg("--max-batch"), default=DEFAULTS.max_batch,
                        help="images per request")
    limits.add_argument("--max-body", type=_size("--max-body"), default=DEFAULTS.max_body_bytes,
                        help="request body size, e.g. 20MB (413 beyond)")
    limits.add_argument("--max-prompt-chars", type=count_arg("--max-prompt-chars"), default=DEFAULTS.max_prompt_chars)
    s.set_defaults(run=serve)


def serve(a: argparse.Namespace) -> int:
    try:
        import uvicorn

        from edge.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"edge serve needs the serve extra ({e.name} is missing): "
                         "pip install 'edge-diffusion[serve]'") from None
    from edge.serve.auth import is_loopback, new_token

    if a.token is not None and not a.token.strip():
        raise ValueError("--token must not be empty")
    token = a.token if a.token is not None else (None if is_loopback(a.host) else new_token())
    limits = Limits(max_steps=a.max_steps, max_pixels=a.max_pixels, max_side=a.max_side, max_batch=a.max_batch,
                    max_body_bytes=a.max_body, max_prompt_chars=a.max_prompt_chars, queue=a.queue)
    config = ServeConfig(bundles=tuple(a.bundles), host=a.host, port=a.port, token=token, cors=tuple(a.cors),
                         outputs=a.outputs, threads=a.threads, memory_budget=a.memory_budget, backend=a.backend,
                         compute_units=a.compute_units, preview_every=a.preview_every, limits=limits,
                         lora_dir=a.lora_dir, embeddings_dir=a.embeddings_dir)
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(config)
    _announce(config, shown=a.token is None)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5,
                limit_concurrency=256)
    return 0


def _announce(config: ServeConfig, shown: bool) -> None:
    """Where to point a browser or an A1111 client; with a generated token, the address that opens the page (a
    token that was given is not printed: under systemd this goes to the journal, which others may read)."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    query = "" if config.token is None else f"?token={config.token if shown else 'TOKEN'}"
    lines = [f"edge serve: page http://{host}:{config.port}/{query}  (A1111 API: /sdapi/v1/)"]
    if config.host in ("0.0.0.0", "::"):
        lines.append(f"  from another device: http://{socket.gethostname()}.local:{config.port}/{query} "
                     "(or this machine's address on your network)")
    if config.token is not None and shown:
        lines.append(f"  access token: {config.token}  (API clients: send 'Authorization: Bearer {config.token}')")
    elif config.token is not None:
        lines.append("  access token: the one given (--token or $EDGE_SERVE_TOKEN); every request needs it")
    print("\n".join(lines), file=sys.stderr, flush=True)
