"""One job on one pipeline, on the worker thread: images one at a time (image k with seed + k, so each can be
made again alone), progress and previews through the pipeline's callback, and the three ways to stop.

Stopping is the callback's: it raises `Stopped` at the next step when a stop was asked. "cancel" drops the
image; "interrupt" (A1111) decodes the step's estimate of the clean image, saves that and ends the job; "skip" does the
same and goes on with the next image. Whatever a job does, its failure is the job's, never the server's: the
pipeline's stages are freed as its plan would have freed them, and the worker takes the next job.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge.bundle import BundleError
from edge.serve.bundles import Bundles
from edge.serve.gallery import Entry, Gallery
from edge.serve.jobs import Job

log = logging.getLogger("edge.serve")
PREVIEW_SIDE = 256  # a progress preview: no need to send more pixels than a phone shows
STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder", "tiny_vae_decoder")


class Stopped(Exception):
    def __init__(self, kind: str, latents: np.ndarray):
        super().__init__(kind)
        self.kind, self.latents = kind, latents


class Runner:
    def __init__(self, bundles: Bundles, gallery: Gallery, preview_every: int = 1, lora_dir: Path | None = None):
        self.bundles, self.gallery, self.preview_every, self.lora_dir = bundles, gallery, preview_every, lora_dir

    def run(self, job: Job) -> None:
        if job.stop == "cancel":
            job.set(state="cancelled")
            return
        job.set(state="running", started=time.time())
        pipe = None
        try:
            pipe = self.bundles.pipeline(job.bundle)
            if job.request is None:  # a bundle switch (A1111's options): loading it was the work
                self.bundles.current = job.bundle
                job.set(state="done")
            else:
                self._images(job, pipe)
        except Exception as e:
            if pipe is not None:
                _tidy(pipe)
            user = isinstance(e, ValueError) and not isinstance(e, BundleError)  # a size no budget fits, ...
            (log.warning if user else log.exception)("job %s failed: %s", job.id, e)
            job.set(state="failed", error=str(e) or type(e).__name__, status=422 if user else 500)
        finally:
            if job.request is not None and job.request.image is not None:  # finished jobs are kept a while
                job.request = replace(job.request, image=None, mask=None)
            job.preview = None

    def _images(self, job: Job, pipe) -> None:
        req = job.request
        assert req is not None
        for k in range(req.num_images):
            if job.stop in ("cancel", "interrupt"):
                break
            job.set(image_no=k, step=0, steps=0)
            try:
                entry = self._one(job, pipe, k)
            except Stopped as s:
                _tidy(pipe)
                if s.kind == "cancel":
                    job.set(state="cancelled")
                    return
                entry = self._partial(job, pipe, s.latents, k)
                if s.kind == "skip":
                    job.stop = None
            job.images.append(entry)
            job.changes.bump()
        job.set(state="cancelled" if job.stop == "cancel" and not job.images else "done")

    def _one(self, job: Job, pipe, k: int) -> Entry:
        req = job.request
        with_image: dict[str, Any] = {}
        if req.image is not None:
            with_image = {"image": req.image, "strength": req.strength, "mask": req.mask, "mask_blur": req.mask_blur}
        result = pipe.generate(req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
                               guidance=req.guidance, scheduler=req.scheduler, seed=req.seed + k, height=req.height,
                               width=req.width, callback=self._callback(job, pipe), prompt_syntax=req.prompt_syntax,
                               lora_dir=self.lora_dir, **with_image)
        return self.gallery.save(result.images[0], {**result.params, "bundle": job.bundle}, f"{job.id}-{k}")

    def _callback(self, job: Job, pipe):
        previews = [self.preview_every > 0]

        def step(i: int, total: int, latents: np.ndarray) -> None:
            if job.stop is not None:
                raise Stopped(job.stop, latents)
            job.step, job.steps = i + 1, total
            if previews[0] and ((i + 1) % self.preview_every == 0 or i + 1 == total):
                try:
                    job.preview, job.preview_step = _png(pipe.preview()), i + 1  # the step's clean estimate
                except ValueError as e:  # a bundle without a preview projection: progress without pictures
                    log.info("job %s: no previews (%s)", job.id, e)
                    previews[0] = False
            job.changes.bump()

        return step

    def _partial(self, job: Job, pipe, latents: np.ndarray, k: int) -> Entry:
        """The image as far as it got, as A1111 returns it on interrupt: the latest step's estimate of the clean
        latents decoded (the latents themselves where the pipeline keeps no estimate)."""
        req, m = job.request, pipe.manifest
        image = pipe.decode((latents if pipe.denoised is None else pipe.denoised)[:1])
        _tidy(pipe)
        f = m.vae_scale_factor
        params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed + k,
                  "steps": req.steps, "scheduler": req.scheduler, "guidance": req.guidance,
                  "height": latents.shape[2] * f, "width": latents.shape[3] * f, "bundle_id": m.bundle_id,
                  "bundle": job.bundle, "stopped_at_step": job.step,
                  **({"strength": req.strength} if req.image is not None else {})}
        return self.gallery.save(image, params, f"{job.id}-{k}")


def _tidy(pipe) -> None:
    """After a run that did not end, free what its plan would have freed (a resident plan keeps everything)."""
    plan = pipe.plan
    if plan is not None and not plan.resident:
        for name in STAGES:
            pipe.graphs.free(name)


def _png(image: Image.Image) -> bytes:
    image = image.copy()
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
