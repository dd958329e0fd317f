"""AUTOMATIC1111's web UI API (`/sdapi/v1/*`), mapped onto edge's GenerationRequest and back.

Field names, defaults and response shapes follow that project's sources (modules/api/models.py: the request
models are built from the StableDiffusionProcessingTxt2Img / Img2Img dataclasses of modules/processing.py,
plus sampler_index, script_name, script_args, send_images, save_images, alwayson_scripts, force_task_id,
infotext, and for img2img init_images, denoising_strength, mask, include_init_images; responses are
`{"images": [base64 PNG], "parameters": {the request}, "info": "<JSON of Processed.js()>"}`). As there
(pydantic), a field this API does not know is ignored, and a known field of the wrong type is a 422 naming it
(a number sent as a string, "20", is read as pydantic reads it; "twenty" is refused).

Where a field means nothing here:

| field | here |
|---|---|
| `sampler_name` / `sampler_index` | mapped to edge's schedulers: `SAMPLERS` below (A1111's names and aliases, or edge's own names); unknown: 404 as A1111 |
| `scheduler` (A1111 >= 1.9) | "automatic" (the sampler's own), or "karras" with DPM++ 2M (= "DPM++ 2M Karras"); others: 422 |
| `width`, `height` | absent: the bundle's trained size (A1111: 512); must be multiples of the bundle's size step |
| `steps`, `cfg_scale`, `sampler_name` | absent: the bundle's recommendation (SD-Turbo: 1 step, no guidance; LCM: the `lcm` sampler), else 20, 7.5, Euler (A1111: 50, 7, Euler) |
| `seed` | -1 draws one; image k of a batch uses seed + k, as A1111 (numpy's generator: A1111's seeds give other images) |
| `batch_size`, `n_iter` | images run one after another (batch_size x n_iter of them, within --max-batch) |
| `send_images` | honoured; `save_images` is not: every image goes to the outputs folder (the page's gallery) |
| `override_settings.sd_model_checkpoint` | runs on that bundle (it stays loaded afterwards) |
| `init_images` | one picture (more: 422); resized to width x height when given ("Just resize"), else kept at its size |
| `mask`, `inpainting_mask_invert`, `mask_blur` (`_x`/`_y`: the larger) | honoured; a mask with transparency is read by its alpha |
| `resize_mode`, `inpainting_fill`, `inpaint_full_res`, `inpaint_full_res_padding`, `mask_round`, `image_cfg_scale`, `initial_noise_multiplier`, `latent_mask` | ignored: the whole picture is redrawn at its size, masked areas start from the picture (strength < 1) or noise (strength 1) |
| `denoising_strength` | img2img strength, 0 < s <= 1 (0 is refused); ignored by txt2img (hires fix) |
| `enable_hr` and `hr_*`, `firstphase_*`, `refiner_*`, `restore_faces`, `tiling`, `styles`, `subseed*`, `seed_resize_*`, `eta`, `s_*`, `comments`, `force_task_id`, `infotext`, `disable_extra_networks`, `firstpass_image` | ignored |
| `script_name`, `alwayson_scripts` | none exist here: a named one is refused (422), as A1111 refuses a script it lacks |
| `/sdapi/v1/interrupt` | stops the running job at its next step; its response carries the latents decoded as they are |
| `/sdapi/v1/skip` | the same for the current image only; the job goes on with the next |
| `/sdapi/v1/progress` | `current_image`: the step's estimate of the finished image, by the bundle's tiny autoencoder where it has one (A1111's "TAESD" live preview), else its linear latent map (a colour sketch) |
| `/sdapi/v1/sd-models` | one entry per bundle: `hash` is the bundle id's first 10 characters, `sha256` null (a bundle is many files) |
| `/sdapi/v1/options` | a few options are reported; POST switches bundles with `sd_model_checkpoint` (waits for the load); others are kept and echoed, without effect |
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from edge.serve.bundles import Bundle, Bundles
from edge.serve.config import Limits
from edge.serve.jobs import Job
from edge.serve.params import (ApiError, GenerationRequest, as_mask, check_size, check_text, decode_picture,
                               fit_pictures, in_range, resolve_seed, take)

# (A1111 name, edge scheduler, aliases, options): the samplers whose algorithm edge runs
SAMPLERS = (
    ("DPM++ 2M", "dpmpp_2m", ["k_dpmpp_2m"], {}),
    ("DPM++ 2M Karras", "dpmpp_2m_karras", ["k_dpmpp_2m_ka"], {"scheduler": "karras"}),  # before A1111 1.9
    ("Euler a", "euler_a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": "True"}),
    ("Euler", "euler", ["k_euler"], {}),
    ("DDIM", "ddim", ["ddim"], {}),
    ("PLMS", "pndm", ["plms"], {}),
    ("LCM", "lcm", ["k_lcm"], {}),
)
SCHEDULERS = ({"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
               "need_inner_model": False},
              {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False})

_TXT2IMG: dict[str, tuple[type, Any]] = {
    "prompt": (str, ""), "negative_prompt": (str, ""), "styles": (list, None), "seed": (int, -1),
    "subseed": (int, -1), "subseed_strength": (float, 0), "seed_resize_from_h": (int, -1),
    "seed_resize_from_w": (int, -1), "seed_enable_extras": (bool, True), "sampler_name": (str, None),
    "scheduler": (str, None), "batch_size": (int, 1), "n_iter": (int, 1), "steps": (int, None),
    "cfg_scale": (float, None), "width": (int, 512), "height": (int, 512), "restore_faces": (bool, None),
    "tiling": (bool, None), "do_not_save_samples": (bool, False), "do_not_save_grid": (bool, False),
    "eta": (float, None), "denoising_strength": (float, None), "s_min_uncond": (float, None),
    "s_churn": (float, None), "s_tmax": (float, None), "s_tmin": (float, None), "s_noise": (float, None),
    "override_settings": (dict, None), "override_settings_restore_afterwards": (bool, True),
    "refiner_checkpoint": (str, None), "refiner_switch_at": (float, None), "disable_extra_networks": (bool, False),
    "firstpass_image": (str, None), "comments": (dict, None), "enable_hr": (bool, False),
    "firstphase_width": (int, 0), "firstphase_height": (int, 0), "hr_scale": (float, 2.0),
    "hr_upscaler": (str, None), "hr_second_pass_steps": (int, 0), "hr_resize_x": (int, 0), "hr_resize_y": (int, 0),
    "hr_checkpoint_name": (str, None), "hr_sampler_name": (str, None), "hr_scheduler": (str, None),
    "hr_prompt": (str, ""), "hr_negative_prompt": (str, ""), "force_task_id": (str, None),
    "sampler_index": (str, None), "script_name": (str, None), "script_args": (list, []),
    "send_images": (bool, True), "save_images": (bool, False), "alwayson_scripts": (dict, {}), "infotext": (str, None),
}
_IMG2IMG: dict[str, tuple[type, Any]] = {
    **{k: v for k, v in _TXT2IMG.items() if not k.startswith(("enable_hr", "firstphase", "hr_"))},
    "init_images": (list, None), "resize_mode": (int, 0), "denoising_strength": (float, 0.75),
    "image_cfg_scale": (float, None), "mask": (str, None), "mask_blur_x": (int, 4), "mask_blur_y": (int, 4),
    "mask_blur": (int, None), "mask_round": (bool, True), "inpainting_fill": (int, 0),
    "inpaint_full_res": (bool, True), "inpaint_full_res_padding": (int, 0), "inpainting_mask_invert": (int, 0),
    "initial_noise_multiplier": (float, None), "latent_mask": (str, None), "include_init_images": (bool, False),
}


def _fields(body: dict[str, Any], table: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """Every known field, type-checked (each may be null: A1111's models make them all Optional), defaults
    filled in: the request as A1111 echoes it in `parameters`. Unknown fields are dropped."""
    return {name: take(body, name, kind, default) for name, (kind, default) in table.items()}


def sampler(name: str | None, scheduler: str | None) -> str | None:
    """The edge scheduler for an A1111 sampler name or alias (or an edge name), with A1111 1.9's separate
    `scheduler` ("automatic", or "karras" for DPM++ 2M)."""
    if name is None and (scheduler or "automatic").lower() == "automatic":
        return None  # the bundle's recommended scheduler (Bundle.resolve)
    wanted = "Euler" if name is None else name
    edge = next((e for n, e, aliases, _ in SAMPLERS if wanted.lower() in (n.lower(), e, *aliases)), None)
    if edge is None:
        known = ", ".join(n for n, *_ in SAMPLERS)
        raise ApiError(404, f"Sampler not found: {wanted!r}; this server runs {known}", "sampler_name")
    kind = (scheduler or "automatic").lower()
    if kind == "karras" and edge in ("dpmpp_2m", "dpmpp_2m_karras"):
        return "dpmpp_2m_karras"
    if kind not in ("automatic", "karras"):
        raise ApiError(422, f"scheduler {scheduler!r} is not available here; use automatic (or karras with "
                            "DPM++ 2M)", "scheduler")
    if kind == "karras" and edge != "dpmpp_2m_karras":
        raise ApiError(422, f"scheduler 'karras' is available here only with DPM++ 2M, not {wanted!r}", "scheduler")
    return edge


def request(body: dict[str, Any], img2img: bool, limits: Limits,
            bundles: Bundles) -> tuple[GenerationRequest, Bundle, dict[str, Any]]:
    """A txt2img or img2img body as (what to run, on which bundle, the request as A1111 echoes it)."""
    f = _fields(body, _IMG2IMG if img2img else _TXT2IMG)
    if f["script_name"]:
        raise ApiError(422, f"Script '{f['script_name']}' not found: this server has no scripts", "script_name")
    if f["alwayson_scripts"]:
        raise ApiError(422, f"always on script {next(iter(f['alwayson_scripts']))} not found: this server has "
                            "no scripts", "alwayson_scripts")
    checkpoint = (f["override_settings"] or {}).get("sd_model_checkpoint")
    bundle = bundles.find(None) if checkpoint is None else find_checkpoint(bundles, checkpoint)
    for name in ("batch_size", "n_iter"):
        in_range(name, f[name], 1)
    if f["steps"] is not None:  # absent: the bundle's recommendation (Bundle.resolve), not A1111's 50
        in_range("steps", f["steps"], 1, limits.max_steps, limit="--max-steps")
    count = f["batch_size"] * f["n_iter"]
    if count > limits.max_batch:
        raise ApiError(422, f"batch_size x n_iter is {count} images, more than this server's limit of "
                            f"{limits.max_batch} (--max-batch)", "batch_size")
    if f["cfg_scale"] is not None:  # absent: as steps (A1111's is 7)
        in_range("cfg_scale", f["cfg_scale"], 0.0, 100.0)
    # absent: the bundle's trained size (or the picture's), not A1111's 512
    width, height = (f[k] if body.get(k) is not None else None for k in ("width", "height"))
    check_size(width, height, limits)
    run = dict(prompt=check_text("prompt", f["prompt"], limits),
               negative_prompt=check_text("negative_prompt", f["negative_prompt"], limits),
               steps=f["steps"], scheduler=sampler(f["sampler_name"] or f["sampler_index"], f["scheduler"]),  # None: the bundle's
               guidance=f["cfg_scale"], seed=resolve_seed(f["seed"]), width=width, height=height,
               num_images=count, bundle=bundle.name, prompt_syntax="a1111")
    if img2img:
        run.update(_pictures(f, width, height, limits))
        f = {**f, **({} if f["include_init_images"] else {"init_images": None, "mask": None})}
    return GenerationRequest(**run), bundle, f


def _pictures(f: dict[str, Any], width: int | None, height: int | None, limits: Limits) -> dict[str, Any]:
    images = f["init_images"]
    if not images:
        raise ApiError(422, "img2img needs init_images: a list with one base64 picture", "init_images")
    if len(images) > 1:
        raise ApiError(422, f"init_images has {len(images)} pictures; this server takes one per request",
                       "init_images")
    if not isinstance(images[0], str):
        raise ApiError(422, "init_images[0] must be a base64 string", "init_images")
    image = decode_picture("init_images[0]", images[0], limits, field="init_images")
    mask = None if not f["mask"] else as_mask(decode_picture("mask", f["mask"], limits),
                                                invert=bool(f["inpainting_mask_invert"]))
    image, mask = fit_pictures(image, mask, width, height)
    strength = f["denoising_strength"]
    in_range("denoising_strength", 0.75 if strength is None else strength, None, 1.0, above=0.0)
    blur = f["mask_blur"] if f["mask_blur"] is not None else max(f["mask_blur_x"], f["mask_blur_y"])
    in_range("mask_blur", blur, 0, 64)
    return {"image": image, "mask": mask, "strength": 0.75 if strength is None else strength, "mask_blur": blur,
            "width": None, "height": None}


# -------------------------------------------------------------------------------------------- responses


def response(job: Job, echo: dict[str, Any], pngs: list[bytes], texts: list[str | None], bundle: Bundle,
             img2img: bool) -> dict[str, Any]:
    """A finished job as A1111's txt2img / img2img response: base64 PNGs (with their parameters chunk)."""
    req = job.request
    first = job.images[0].params if job.images else {}
    n = len(job.images)
    seeds = [e.params.get("seed") for e in job.images]
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"), "sampler_name": _a1111_name(req.scheduler),
        "cfg_scale": req.guidance, "steps": req.steps, "batch_size": echo.get("batch_size", 1),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": bundle.name,
        "sd_model_hash": short_hash(bundle), "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.strength if img2img else None,
        "extra_generation_params": {"Scheduler": req.scheduler, **({"Stopped at step": job.images[-1].params.get(
            "stopped_at_step")} if job.images and "stopped_at_step" in job.images[-1].params else {})},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": 1, "is_using_inpainting_conditioning": bundle.inpainting and bool(first.get("mask")),
        "version": "edge-diffusion",
    }
    images = [base64.b64encode(png).decode("ascii") for png in pngs] if echo.get("send_images", True) else []
    return {"images": images, "parameters": echo, "info": json.dumps(info)}


def _a1111_name(edge: str) -> str:
    return next(n for n, e, *_ in SAMPLERS if e == edge)


def progress(job: Job | None, skip_image: bool) -> dict[str, Any]:
    """GET /sdapi/v1/progress for the running job (or idle), with A1111's arithmetic: progress starts at 0.01."""
    if job is None or job.request is None:
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
    count = job.request.num_images
    done = job.image_no + (job.step / job.steps if job.steps else 0)
    fraction = 0.01 + done / count
    elapsed = time.time() - (job.started or time.time())
    state = {"skipped": job.stop == "skip", "interrupted": job.stop == "interrupt", "stopping_generation": False,
             "job": "img2img" if job.request.image is not None else "txt2img", "job_count": count,
             "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
             "job_no": job.image_no, "sampling_step": job.step, "sampling_steps": job.steps}
    image = None if skip_image or job.preview is None else base64.b64encode(job.preview).decode("ascii")
    return {"progress": min(fraction, 1.0), "eta_relative": max(0.0, elapsed / fraction - elapsed), "state": state,
            "current_image": image, "textinfo": None}


def samplers() -> list[dict[str, Any]]:
    return [{"name": n, "aliases": list(aliases), "options": dict(options)} for n, _, aliases, options in SAMPLERS]


def short_hash(bundle: Bundle) -> str:
    return bundle.manifest.bundle_id[:10]


def title(bundle: Bundle) -> str:
    return f"{bundle.name} [{short_hash(bundle)}]"


def sd_models(bundles: Bundles) -> list[dict[str, Any]]:
    return [{"title": title(b), "model_name": b.name, "hash": short_hash(b), "sha256": None,
             "filename": str(b.path.resolve()), "config": None} for b in bundles.all.values()]


def find_checkpoint(bundles: Bundles, name: Any) -> Bundle:
    """A bundle by any name A1111 accepts for a checkpoint: title, model name, hash, file name."""
    if not isinstance(name, str):
        raise ApiError(422, f"sd_model_checkpoint must be a string, got {name!r}", "sd_model_checkpoint")
    for b in bundles.all.values():
        names = {b.name, title(b), short_hash(b), b.manifest.bundle_id, str(b.path), str(b.path.resolve()),
                 f"{b.name}.safetensors", f"{b.name}.ckpt"}
        if name.strip() in names:
            return b
    raise ApiError(404, f"model {name!r} not found; this server has: {', '.join(title(b) for b in bundles.all.values())}",
                   "sd_model_checkpoint")


def options(bundles: Bundles, stored: dict[str, Any], outputs: str, preview_every: int) -> dict[str, Any]:
    current = bundles.find(None)
    return {**stored, "sd_model_checkpoint": title(current), "sd_checkpoint_hash": None, "samples_format": "png",
            "outdir_samples": outputs, "show_progress_every_n_steps": preview_every, "live_previews_enable": True,
            "live_previews_image_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
            "eta_noise_seed_delta": 0}


def error_body(e: ApiError) -> dict[str, Any]:
    """A refusal in the shapes A1111's clients parse: FastAPI's validation list for a field, else A1111's own."""
    if e.status == 422 and e.field is not None:
        return {"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}],
                "error": "ValidationError", "errors": e.message}
    return {"error": "HTTPException", "detail": e.message, "body": "", "errors": e.message}
