"""The server's settings: what the CLI parsed, as frozen values the rest of the package reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is refused with a 4xx naming the limit, never attempted."""

    max_steps: int = 150  # denoising steps per image (A1111's slider stops at 150 too)
    max_pixels: int = 1024 * 1024  # width x height of an output or input picture
    max_side: int = 2048  # pixels on either side
    max_batch: int = 4  # images per request (A1111: batch_size x n_iter)
    max_body_bytes: int = 20 * MIB  # request body (base64 pictures make up most of it); 413 beyond
    max_prompt_chars: int = 4000  # prompt and negative prompt, each
    queue: int = 8  # jobs waiting behind the running one; 429 + Retry-After beyond

    def as_dict(self) -> dict[str, int]:
        return {"max_steps": self.max_steps, "max_pixels": self.max_pixels, "max_side": self.max_side,
                "max_batch": self.max_batch, "max_body_bytes": self.max_body_bytes,
                "max_prompt_chars": self.max_prompt_chars, "queue": self.queue}


@dataclass(frozen=True)
class ServeConfig:
    bundles: tuple[Path, ...]  # the first is loaded at start
    host: str = "127.0.0.1"
    port: int = 7860  # A1111's port, so its clients find it unchanged
    token: str | None = None  # required on every request when set (always set on a non-loopback bind)
    cors: tuple[str, ...] = ()  # origins allowed to call from a browser; none by default
    outputs: Path = Path("outputs")  # the gallery
    threads: int | None = None  # onnxruntime intra-op threads; None: all cores
    memory_budget: str | None = None  # the pipeline's, e.g. "2GB" (edge.plan)
    backend: str | None = None  # "onnx", "openvino" or "coreml"; None: Core ML on macOS where a bundle has its graphs
    compute_units: str = "cpu_and_ne"  # Core ML only
    preview_every: int = 1  # a preview every N denoising steps
    lora_dir: Path | None = None  # where a prompt's <lora:NAME:SCALE> finds NAME.safetensors
    embeddings_dir: Path | None = None  # textual-inversion embeddings loaded into every bundle (A1111's folder)
    limits: Limits = field(default_factory=Limits)
