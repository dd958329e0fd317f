"""`edge`: convert, generate, plan, info, bench. Thin: parse, then call library functions with keywords."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from edge.bundle import read_manifest
from edge.memory import format_bytes, peak_rss_bytes
from edge.control_images import KINDS
from edge.validate import (GUIDANCE_RULE, TOKEN_MERGING_MAX, TOKEN_MERGING_RULE, check_cache_interval, check_decoder,
                           count_arg, lora_arg, number_arg, split_suffix)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # `kill`, a CI timeout: unwind like Ctrl-C, so
        signal.signal(signal.SIGTERM, _terminated)           # half-written bundles are removed
    warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # user-facing errors: one line, no traceback
        if os.environ.get("EDGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def _convert(a: argparse.Namespace) -> int:
    try:
        from edge.converters.convert import Options, convert
    except ImportError as e:
        raise ValueError(f"edge convert needs the converter extra ({e.name} is missing): "
                         "pip install 'edge-diffusion[convert]'") from None
    ops = None if a.quantize_ops is None else tuple(o.strip() for o in a.quantize_ops.split(",") if o.strip())
    options = Options(attention=a.attention or "fused", attention_chunk=a.attention_chunk, precision=a.precision,
                      quantize_ops=ops, activations=a.activations, min_psnr_db=a.min_psnr, split_unet=a.split_unet,
                      max_chunk_mb=a.max_chunk_mb, profile_memory=not a.no_memory_profile, threads=a.threads,
                      tiled_vae=not a.no_tiled_vae, targets=tuple(t.strip() for t in a.target.split(",") if t.strip()),
                      coreml=_coreml_options(a), tiny_vae=a.tiny_vae, deep_cache=a.deep_cache,
                      token_merging=a.token_merging, loras=tuple(a.lora), controlnets=tuple(a.controlnet),
                      unet_pieces_mb=a.unet_pieces_mb)
    convert(a.source, a.output, config=a.config, allow_pickle=a.allow_pickle, overwrite=a.overwrite,
            options=options, score=a.score)
    print(f"peak memory {format_bytes(peak_rss_bytes())}")
    return 0


def _coreml_options(a: argparse.Namespace):
    """The Core ML target's options, when it is asked for (they check --compile's toolchain at once)."""
    if "coreml" not in a.target:
        return None
    from edge.converters.coreml.convert import CoreMLOptions

    return CoreMLOptions(deployment_target=a.coreml_target, compression=a.coreml_compression,
                         split_unet=a.split_unet, max_chunk_mb=a.max_chunk_mb,
                         compute_precision=a.coreml_precision, compile=a.compile,
                         attention=a.attention or "split_einsum")


def _embeddings(a: argparse.Namespace) -> list[tuple[Path, str | None]]:
    """--embedding FILE[:TOKEN] and every .safetensors in --embeddings-dir (token: the file's name)."""
    found = []
    if a.embeddings_dir is not None:
        folder = Path(a.embeddings_dir)
        if not folder.is_dir():
            raise ValueError(f"--embeddings-dir {folder}: not a folder")
        found += [(p, None) for p in sorted(folder.glob("*.safetensors"))]
    for text in a.embedding:
        path, token = split_suffix(text)
        found.append((Path(path), token))
    return found


def _generate(a: argparse.Namespace) -> int:
    from edge.pipeline import Pipeline
    from edge.stages.control import parse_control

    if a.refiner is not None:
        return _generate_refined(a)
    pipe = Pipeline.load(a.bundle, threads=a.threads, memory_budget=a.memory_budget, backend=a.backend,
                         compute_units=a.compute_units, inference_precision=a.inference_precision)
    for path, token in _embeddings(a):
        pipe.load_embedding(path, token)
    for key, value in pipe.manifest.generation_defaults().items():  # few-step models: their own steps, guidance
        setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
    image = None
    if (a.mask is not None or a.expand is not None) and a.image is None:
        raise ValueError("--mask and --expand repaint part of a picture: give it with --image")
    if a.image is not None:  # img2img: read and checked before anything runs; it sets the size
        from edge.images import check_size, load_image

        image = check_size(load_image(a.image), pipe.manifest.size_multiple, a.resize)
    left, top, right, bottom = a.expand or (0, 0, 0, 0)
    size = _size(pipe, a) if image is None else (image.height + top + bottom, image.width + left + right)
    check_decoder(pipe.manifest, a.decoder)  # before any plan is made with it
    check_cache_interval(pipe.manifest, a.cache_interval)
    plan = pipe.plan_for(*size, num_images=a.num_images, guided=a.guidance > 1, image=image is not None,
                         decoder=a.decoder)
    if a.memory_budget is not None:
        print(plan.describe(), file=sys.stderr)
    else:  # no plan to show, but what it knows of this CPU's int8 speed still matters
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
    result = pipe.generate(
        a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
        scheduler=a.scheduler, seed=a.seed, height=a.height, width=a.width,
        num_images=a.num_images, callback=_progress_bar(_previews(pipe, a)), image=image, strength=a.strength,
        mask=a.mask, mask_blur=a.mask_blur, expand=a.expand, prompt_syntax=a.prompt_syntax, decoder=a.decoder,
        cache_interval=a.cache_interval, loras=a.lora, lora_dir=a.lora_dir,
        controls=[parse_control(c, pipe.manifest, a.control_start, a.control_end) for c in a.control],
    )
    return _write_result(a, result, sum(pipe.load_seconds.values()))


def _write_result(a: argparse.Namespace, result, load_seconds: float) -> int:
    from edge.png import save_image

    out = Path(a.output)
    for k, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        save_image(image, path, {**result.params, "index": k}, quality=a.quality)
        print(f"wrote {path}")
    t = result.timings
    print(f"load {load_seconds:.2f}s | text encoder {t['text_encoder']:.2f}s | "
          f"unet {t['unet']:.2f}s ({t['unet_per_step']:.3f}s/step) | vae decoder {t['vae_decoder']:.2f}s | "
          f"total {t['total']:.2f}s | peak memory {format_bytes(peak_rss_bytes())}")
    return 0


# what --refiner does not take yet: text-to-image with the base's prompts, sizes, sampler, seed and LoRAs
NOT_WITH_REFINER = ("image", "mask", "expand", "control", "embedding", "embeddings_dir", "preview_every")


def _generate_refined(a: argparse.Namespace) -> int:
    """--refiner: the base's text-to-image finished by an SDXL refiner bundle (edge.refiner). Under a budget the two
    are loaded lazily and never resident together."""
    from edge.pipeline import Pipeline
    from edge.refiner import generate_refined

    given = [f for f in NOT_WITH_REFINER if getattr(a, f)] + ([] if a.backend == "onnx" else ["backend"])
    if given or a.cache_interval != 1 or a.decoder != "full":
        flag = "--" + (given[0] if given else "cache_interval" if a.cache_interval != 1 else "decoder")
        raise ValueError(f"--refiner finishes a text-to-image generation; {flag.replace('_', '-')} is not taken with "
                         "it yet")
    pipes = [Pipeline.load(b, threads=a.threads, memory_budget=a.memory_budget, preload=a.memory_budget is None)
             for b in (a.bundle, a.refiner)]
    if a.memory_budget is not None:  # each planned on its own: they never run, nor stay, side by side
        guided = pipes[0].manifest.generation_defaults(guidance=a.guidance)["guidance"] > 1
        for role, pipe in zip(("base", "refiner"), pipes):
            plan = pipe.plan_for(*_size(pipes[0], a), num_images=a.num_images, guided=guided)
            print(f"{role}: {plan.describe()}", file=sys.stderr)
    result = generate_refined(*pipes, a.prompt, a.negative_prompt, high_noise_frac=a.high_noise_frac, steps=a.steps,
                              guidance=a.guidance, scheduler=a.scheduler, seed=a.seed, height=a.height,
                              width=a.width, num_images=a.num_images, prompt_syntax=a.prompt_syntax,
                              loras=a.lora, lora_dir=a.lora_dir, callback=_progress_bar())
    return _write_result(a, result, sum(sum(p.load_seconds.values()) for p in pipes))


def _size(pipe, a: argparse.Namespace) -> tuple[int, int]:
    h, w = pipe.manifest.default_size
    return (a.height or h), (a.width or w)


def _size_arg(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 512x512")
    return int(w), int(h)


def _control_image(a: argparse.Namespace) -> int:
    from PIL import Image

    from edge.control_images import make
    from edge.images import load_image
    from edge.png import check_output_path, image_format

    out = check_output_path(a.output)
    photo = load_image(a.image)
    photo = photo.resize(a.size, Image.Resampling.LANCZOS) if a.size else photo
    options = {"canny": {"low": a.low, "high": a.high}, "mask": {"threshold": a.threshold}}.get(a.kind, {})
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:  # atomically: a reader never sees half an image
        make(a.kind, photo, **options).save(tmp, format=image_format(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


def _plan(a: argparse.Namespace) -> int:
    from edge.pipeline import Pipeline
    from edge.stages.guidance_embedding import guided_by_cfg

    # Opened as `edge generate` opens it, graphs not loaded: the process it plans for is the same.
    pipe = Pipeline.load(a.bundle, memory_budget=a.memory_budget, preload=False, verify=False)
    h, w = _size(pipe, a)
    guidance = pipe.manifest.generation_defaults(guidance=a.guidance)["guidance"]  # few-step models: their own
    guided = guided_by_cfg(pipe.manifest, guidance)  # an LCM UNet's guidance is an input, not a second pass
    print(f"{a.bundle}: {w}x{h}, {a.num_images} image(s), guidance {guidance:g}", flush=True)
    plan = pipe.plan_for(h, w, num_images=a.num_images, guided=guided)
    print(plan.describe())
    from edge.plan import smallest_budget

    try:
        least, frugal = smallest_budget(pipe.manifest, h, w, num_images=a.num_images, guided=guided,
                                        base=plan.base)
    except ValueError:  # a bundle without memory measurements: its plan above already says so
        return 0
    print(f"smallest budget at this size: {format_bytes(least)} (estimated peak {format_bytes(frugal.peak)}: "
          f"{'all resident' if frugal.resident else 'staged'}, UNet batch {frugal.guidance_batch}"
          f"{', chunks reloaded per call' if frugal.unet_per_call else ''}"
          f"{f', VAE tiles of {frugal.vae_tile}' if frugal.vae_tile else ''})")
    return 0


def _profile(a: argparse.Namespace) -> int:
    from edge.memory_profile import reprofile

    names = [n for n in a.components.split(",") if n] if a.components else None
    reprofile(a.bundle, threads=a.threads, components=names)
    print(f"measured {', '.join(names) if names else a.bundle} on this machine; `edge plan` now uses these numbers")
    return 0


def _info(a: argparse.Namespace) -> int:
    m = read_manifest(a.bundle)
    print(f"bundle {a.bundle}  id {m.bundle_id}  format v{m.format_version}")
    print(f"family {m.family}  prediction {m.prediction_type}  default size {m.default_size[1]}x{m.default_size[0]}"
          f"  (multiples of {m.size_multiple})  source {m.source.get('name')} ({m.source.get('kind')})")
    if m.recommended:
        r = m.recommended
        print(f"recommended: {r['steps']} steps, guidance {r['guidance']:g}, {r['scheduler']} ({r.get('why', '')})")
    print(f"{'component':<13}{'precision':>10}{'params':>11}{'size':>11}{'PSNR dB':>9}{'vs fp32':>9}"
          f"{'chunks':>7}  attention")
    for c in m.components.values():
        vs32 = c.quantization.get("psnr_vs_fp32_db")
        kernel = c.attention.get("kernel", "-") + (f" ({c.attention['chunk']})" if c.attention.get("chunk") else "")
        merging = c.attention.get("token_merging")
        kernel += (f", token merging {merging['ratio']:g} in {len(merging['blocks'])} blocks "
                   f"({merging['psnr_vs_unmerged_db']:.1f} dB vs unmerged)" if merging else "")
        print(f"{c.name:<13}{c.precision:>10}{c.parameters / 1e6:>10.2f}M{format_bytes(c.bytes):>11}"
              f"{c.parity.get('psnr_db', float('nan')):>9.1f}{'-' if vs32 is None else f'{vs32:.1f}':>9}"
              f"{len(c.chunks) or 1:>7}  {kernel}")
    total = sum(c.bytes for c in m.components.values())
    print(f"total {format_bytes(total)}")
    from edge.cpu import features  # which int8 kernels this machine runs the bundle's int8 graphs with

    print(f"this cpu: {features().arch} [{' '.join(features().flags)}]  int8: {features().int8_path}")
    from edge.coreml_backend import describe  # the manifest's Core ML section, if any (reads JSON only)

    for line in describe(a.bundle):
        print(line)
    return 0


def _check(a: argparse.Namespace) -> int:
    from edge.selfcheck import check_bundle, report

    rows = check_bundle(a.bundle, threads=a.threads)
    print("\n".join(report(rows)))
    return 0 if all(r["ok"] for r in rows) else 1


def _previews(pipe, a: argparse.Namespace):
    """--preview-every N --preview-dir DIR: every N steps, a preview of the step's estimate of the clean image,
    as DIR/step-NNN.png (--preview-decoder: the tiny autoencoder where the bundle has one, or the linear map)."""
    if a.preview_every is None:
        return None
    folder = Path(a.preview_dir)
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int, latents) -> None:
        if (i + 1) % a.preview_every == 0:
            path = folder / f"step-{i + 1:03d}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            pipe.preview(decoder=a.preview_decoder).save(tmp, format="PNG")
            os.replace(tmp, path)

    return write


def _progress_bar(preview=None, width: int = 30):
    """A one-line bar on a terminal; in a log (not a TTY) just the closing line. `preview(i, latents)` too."""
    start = time.perf_counter()
    live = sys.stderr.isatty()

    def show(i: int, total: int, latents) -> None:
        if preview is not None:
            preview(i, latents)
        done, last = int(width * (i + 1) / total), i + 1 == total
        rate = (time.perf_counter() - start) / (i + 1)
        if live or last:
            print(f"\r[{'#' * done}{'.' * (width - done)}] {i + 1}/{total} {rate:.2f}s/step",
                  end="\n" if last else "", file=sys.stderr, flush=True)

    return show


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other refusal here: `error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        checked = re.sub(r"^argument [^:]+: (?=-)", "", message)  # our `type=` functions name their flag already
        hint = "" if checked != message else f" (`{self.prog} --help` lists the arguments)"
        self.exit(2, f"error: {checked}{hint}\n")


def _budget(flag: str) -> Callable[[str], str]:
    """argparse type: a memory size edge can parse (kept as text: the library parses it again and quotes it)."""
    def parse(text: str) -> str:
        from edge.plan import parse_bytes

        try:
            parse_bytes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{flag}: {e}") from None
        except OverflowError:  # '1e400GB': a float infinity
            raise argparse.ArgumentTypeError(f"{flag}: memory budget {text!r} is not a finite size; use e.g. 4GB, "
                                             "1.5GiB or 2048MB") from None
        return text
    return parse


def _image_path(text: str) -> Path:
    """argparse type: an output path whose extension names a format edge writes (checked before any work)."""
    from edge.png import check_output_path

    try:
        return check_output_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"-o/--output: {e}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge", description="Stable Diffusion on the devices people own.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_generate(sub)

    pl = sub.add_parser("plan", help="print how a bundle would run within a memory budget, before loading it")
    pl.add_argument("bundle", type=Path)
    pl.add_argument("--memory-budget", required=True, type=_budget("--memory-budget"), help="e.g. 4GB, 1.5GiB, 2048MB")
    _add_size_arguments(pl)
    pl.add_argument("--guidance", type=number_arg("--guidance", minimum=0.0, rule=GUIDANCE_RULE), default=None,
                    help=f"guidance scale, {GUIDANCE_RULE} (default: the bundle's recommended)")
    pl.set_defaults(run=_plan)

    pr = sub.add_parser("profile", help="measure a bundle's memory on this machine, for `edge plan`")
    pr.add_argument("bundle", type=Path)
    pr.add_argument("--threads", type=count_arg("--threads"), help="onnxruntime intra-op threads (>= 1)")
    pr.add_argument("--components", help="only these, comma-separated (e.g. text_encoder,text_encoder_2); the "
                    "others keep their figures")
    pr.set_defaults(run=_profile)

    ci = sub.add_parser("control-image", help="make a ControlNet's control image from a photo (canny edges, mask, "
                        "invert, tile), in numpy")
    ci.add_argument("kind", choices=KINDS)
    ci.add_argument("image", type=Path)
    ci.add_argument("-o", "--output", type=Path, required=True)
    ci.add_argument("--size", type=_size_arg, metavar="WxH", help="resize the photo to the generation's size first")
    ci.add_argument("--low", type=number_arg("--low", minimum=0.0), default=100.0, help="canny: low threshold")
    ci.add_argument("--high", type=number_arg("--high", minimum=0.0), default=200.0, help="canny: high threshold")
    ci.add_argument("--threshold", type=number_arg("--threshold", minimum=0.0, maximum=255.0), default=128.0,
                    help="mask: brightness (0-255) from which a pixel is white")
    ci.set_defaults(run=_control_image)

    i = sub.add_parser("info", help="summarise a bundle's manifest")
    i.add_argument("bundle", type=Path)
    i.set_defaults(run=_info)

    ck = sub.add_parser("check", help="re-measure a bundle's int8/fp16 accuracy on this CPU against its manifest")
    ck.add_argument("bundle", type=Path)
    ck.add_argument("--threads", type=count_arg("--threads"), help="onnxruntime intra-op threads (>= 1)")
    ck.set_defaults(run=_check)

    from edge.bench import add_bench_parser  # torch-free; peers run in child processes

    add_bench_parser(sub)
    from edge.serve.cli import add_serve_parser  # imports the serve extra only when `edge serve` runs

    add_serve_parser(sub)
    return p


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--height, --width, --num-images: positive here; the bundle's size step is checked once it is read."""
    parser.add_argument("--height", type=count_arg("--height"), help="pixels (default: the bundle's trained size; "
                        "a multiple of the step `edge info` prints)")
    parser.add_argument("--width", type=count_arg("--width"), help="pixels (as --height)")
    parser.add_argument("--num-images", type=count_arg("--num-images"), default=1, help="images per prompt (>= 1)")


def _expand_arg(text: str) -> tuple[int, int, int, int]:
    """--expand L,T,R,B: four whole numbers of pixels >= 0."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--expand must be four whole numbers >= 0 as L,T,R,B (pixels added on each "
                                         f"side), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _add_generate(sub) -> None:
    from edge.png import DEFAULT_QUALITY, FORMATS

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("bundle", type=Path)
    g.add_argument("prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--prompt-syntax", default="auto", choices=("auto", "a1111", "compel", "none"),
                   help="prompt weighting: a1111 '(word:1.3)', compel 'word++', none; auto tells them apart")
    g.add_argument("--steps", type=count_arg("--steps"), default=None,
                   help="denoising steps (>= 1; default: the bundle's recommendation, else 20)")
    g.add_argument("--guidance", type=number_arg("--guidance", minimum=0.0, rule=GUIDANCE_RULE), default=None,
                   help=f"classifier-free guidance scale, {GUIDANCE_RULE} (default: the bundle's, else 7.5)")
    g.add_argument("--scheduler", default=None, help="sampler (default: the bundle's recommendation, else euler)")
    g.add_argument("--seed", type=count_arg("--seed", minimum=0), default=0, help="initial noise seed (>= 0)")
    _add_size_arguments(g)
    g.add_argument("--refiner", type=Path, metavar="BUNDLE", help="SDXL: finish with this refiner bundle (the base "
                   "denoises to --high-noise-frac, the refiner the rest)")
    g.add_argument("--high-noise-frac", type=float, default=0.8, metavar="F",
                   help="with --refiner: the fraction of the noise the base removes (0 < F < 1; default 0.8)")
    g.add_argument("--image", type=Path, help="img2img: start from this picture (its size is the output's)")
    g.add_argument("--strength", type=number_arg("--strength", above=0.0, maximum=1.0), default=0.75,
                   help="img2img: how much of the picture is redrawn, 0 < s <= 1 (the last s of the steps run)")
    g.add_argument("--resize", action="store_true", help="img2img: resize a picture whose size the bundle does "
                   "not accept to the nearest one it does (else it is refused)")
    g.add_argument("--mask", type=Path, help="inpainting, with --image: white = repaint, black = keep")
    g.add_argument("--mask-blur", type=count_arg("--mask-blur", minimum=0), default=0,
                   help="soften the mask's edge by this many pixels (Gaussian radius) before pasting back")
    g.add_argument("--expand", type=_expand_arg, metavar="L,T,R,B",
                   help="outpainting, with --image: grow the canvas by these pixels and paint the new area")
    g.add_argument("--preview-every", type=count_arg("--preview-every"), metavar="N",
                   help="write a preview every N steps: the step's estimate of the finished image")
    g.add_argument("--preview-dir", default="previews", help="where --preview-every writes step-NNN.png")
    g.add_argument("--preview-decoder", default="auto", choices=("auto", "linear", "tiny"),
                   help="previews by the tiny autoencoder (auto: where the bundle has one and the budget allows) "
                        "or the linear latent-to-RGB map (no decoder run)")
    g.add_argument("--cache-interval", type=count_arg("--cache-interval"), default=1, metavar="N",
                   help="DeepCache: the whole UNet every N steps, its outer level alone between (bundles converted "
                        "with --deep-cache; 1 = off)")
    g.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, diffusers/PEFT or kohya layout) at this scale (default 1) "
                        "without re-converting; repeat for several. `<lora:NAME:SCALE>` in the prompt also works, "
                        "with --lora-dir")
    g.add_argument("--lora-dir", metavar="DIR", help="folder where <lora:NAME:SCALE> finds NAME.safetensors")
    g.add_argument("--control", action="append", default=[], metavar="IMAGE[:NAME][:SCALE]",
                   help="a ControlNet of the bundle guided by IMAGE (the generation's size; see `edge control-image` "
                        "to make one from a photo) at SCALE (default 1); repeat for several")
    g.add_argument("--control-start", type=number_arg("--control-start", minimum=0.0, maximum=1.0), default=0.0,
                   help="fraction of the steps before which the ControlNets do not run (default 0)")
    g.add_argument("--control-end", type=number_arg("--control-end", minimum=0.0, maximum=1.0), default=1.0,
                   help="fraction of the steps after which they do not run (default 1)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors, diffusers or A1111 layout): write its token "
                        "(default: the file's key or name) in the prompt or negative prompt; repeat for several")
    g.add_argument("--embeddings-dir", metavar="DIR", help="load every .safetensors embedding in DIR, each used by "
                   "its file name (A1111's embeddings folder)")
    g.add_argument("--decoder", default="full", choices=("full", "tiny"),
                   help="final decoder: the full VAE decoder, or the bundle's tiny autoencoder (faster, less detail)")
    g.add_argument("--threads", type=count_arg("--threads"), help="onnxruntime intra-op threads (>= 1; default: all "
                   "cores)")
    g.add_argument("--backend", default="onnx", help="onnx (onnxruntime), openvino (the same ONNX graphs on "
                   "OpenVINO: pip install openvino), or coreml (macOS: the bundle's Core ML graphs)")
    g.add_argument("--inference-precision", choices=("f32", "bf16", "f16"),
                   help="OpenVINO: the precision it computes in (default: its choice for this CPU, bf16 with AMX)")
    g.add_argument("--compute-units", default="cpu_and_ne", help="Core ML: all, cpu_only, cpu_and_gpu, cpu_and_ne")
    g.add_argument("-o", "--output", default="out.png", type=_image_path,
                   help=f"image to write, in the format its extension names ({', '.join(FORMATS)}), with the "
                        "generation parameters in its metadata; an index is added for several images")
    g.add_argument("--quality", type=count_arg("--quality", maximum=100), default=DEFAULT_QUALITY,
                   help=f".jpg/.webp quality, 1-100 (default {DEFAULT_QUALITY}; 100 makes WebP lossless)")
    g.add_argument("--memory-budget", type=_budget("--memory-budget"),
                   help="stay within this much memory, e.g. 4GB (see `edge plan`)")
    g.set_defaults(run=_generate)


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a Stable Diffusion model to an edge bundle")
    c.add_argument("source", help="diffusers folder, .safetensors checkpoint, Hub id (from the local cache), "
                                  "or 'default' (the shipped model)")
    c.add_argument("-o", "--output", required=True, type=Path, help="bundle folder to write")
    c.add_argument("--config", help="diffusers folder or cached Hub id with the configs of a single-file checkpoint")
    c.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt pickles (they can run code)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    c.add_argument("--attention",
                   help="attention kernel (kernels/attention.py). ONNX: fused (onnxruntime's flash attention node; "
                        "default), original, sliced (--attention-chunk query rows at a time), split_einsum. "
                        "Core ML: split_einsum (Neural Engine; default) or original (GPU)")
    c.add_argument("--attention-chunk", type=count_arg("--attention-chunk"), metavar="ROWS",
                   help="query rows per slice for --attention sliced (>= 1; default 1024: SD 1.5's largest "
                        "self-attention, 4096 rows at 512 px, then holds 128 MiB of scores per image instead of "
                        "512 MiB)")
    c.add_argument("--precision", default="fp32", help="fp32, fp16, int8 or int4 weights")
    c.add_argument("--quantize-ops", help="op types whose weights int8/int4 convert (default MatMul,Gemm; "
                   "int8 may add Conv,Gather)")
    c.add_argument("--activations", default="dynamic",
                   help="int8 activations: dynamic (quantized per call) or static (UNet Conv activations "
                        "calibrated on the model's own trajectories; runs as QLinearConv, 3.2-3.8x faster convs "
                        "on VNNI)")
    c.add_argument("--min-psnr", type=number_arg("--min-psnr", above=0.0), metavar="DB",
                   help="PSNR vs fp32 (a finite number > 0) below which the most sensitive layers stay fp32 "
                        "(default: fp16 40, int8 30, int4 25 dB)")
    c.add_argument("--split-unet", type=count_arg("--split-unet"), metavar="N",
                   help="cut the UNet into N chunks (>= 1)")
    c.add_argument("--max-chunk-mb", type=number_arg("--max-chunk-mb", above=0.0), metavar="M",
                   help="or: the fewest chunks of at most M MB (a finite number > 0)")
    c.add_argument("--unet-pieces-mb", type=number_arg("--unet-pieces-mb", above=0.0), metavar="M",
                   help="export the UNet in pieces of at most M MB of fp32 weights, each its own chunk (default: "
                        "pieces of 1500 MB for a UNet over 6 GB, SDXL's, else whole)")
    c.add_argument("--no-memory-profile", action="store_true", help="skip measuring the graphs' memory "
                   "(the bundle then cannot be planned for a budget)")
    c.add_argument("--threads", type=count_arg("--threads"), help="onnxruntime threads for the memory measurements "
                   "(>= 1)")
    c.add_argument("--no-tiled-vae", action="store_true", help="skip the VAE decoder graph that tiled decoding "
                   "under a tight budget uses (tiles then normalise on their own and colours drift)")
    c.add_argument("--deep-cache", action="store_true", help="cut the UNet for DeepCache (generate --cache-interval "
                   "N runs its deep part every N steps only)")
    c.add_argument("--token-merging", type=number_arg("--token-merging", above=0.0, maximum=TOKEN_MERGING_MAX,
                                                      rule=TOKEN_MERGING_RULE), metavar="RATIO",
                   help="ToMe: merge this fraction of tokens before each self-attention at the UNet's highest "
                        f"resolution, copied back after it ({TOKEN_MERGING_RULE}; e.g. 0.5)")
    c.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the weights before export (recorded in the manifest); repeat for several")
    c.add_argument("--controlnet", action="append", default=[], metavar="SOURCE[:NAME]",
                   help="add a ControlNet (diffusers ControlNetModel folder or single-file .safetensors) as its own "
                        "graph, the UNet taking its residuals; repeat for several")
    c.add_argument("--tiny-vae", metavar="DIR", help="add a tiny autoencoder (a local diffusers AutoencoderTiny "
                   "folder, e.g. TAESD) for previews and --decoder tiny; the default model ships its own")
    c.add_argument("--score", action="store_true", help="score the result with the default model's "
                   "evaluation set (edge.eval) and record it in the manifest")
    c.add_argument("--target", default="onnx", help="graphs to write: onnx, coreml, or onnx,coreml")
    c.add_argument("--coreml-target", default="iOS17", help="Core ML minimum OS: iOS16, iOS17, iOS18, macOS13, "
                   "macOS14, macOS15 (iOS18/macOS15: per-block and grouped-palette compression)")
    c.add_argument("--coreml-compression", help="Core ML weights: int8, palettize6 or palettize4 (default fp16)")
    c.add_argument("--coreml-precision", default="auto", help="Core ML compute: auto (fp16, fp32 where fp16 "
                   "measures below 35 dB), fp16, fp32")
    c.add_argument("--compile", action="store_true", help="also compile the Core ML models to .mlmodelc "
                   "(macOS, Xcode's coremlcompiler)")
    c.set_defaults(run=_convert)


if __name__ == "__main__":
    sys.exit(main())
