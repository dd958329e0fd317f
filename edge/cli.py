"""`edge`: convert, generate, info. Thin: parse, then call library functions with keywords."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from edge.bundle import read_manifest
from edge.memory import format_bytes, peak_rss_bytes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


def _convert(a: argparse.Namespace) -> int:
    try:
        from edge.converters.convert import convert
    except ImportError as e:
        raise ValueError(f"edge convert needs the converter extra ({e.name} is missing): "
                         "pip install 'edge-diffusion[convert]'") from None
    convert(a.source, a.output, config=a.config, allow_pickle=a.allow_pickle, overwrite=a.overwrite)
    print(f"peak memory {format_bytes(peak_rss_bytes())}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from edge.pipeline import Pipeline
    from edge.png import save_png

    pipe = Pipeline.load(a.bundle, threads=a.threads)
    result = pipe.generate(
        a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
        scheduler=a.scheduler, seed=a.seed, height=a.height, width=a.width,
        num_images=a.num_images, callback=_progress_bar(),
    )
    out = Path(a.output)
    for k, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        save_png(image, path, {**result.params, "index": k})
        print(f"wrote {path}")
    t = result.timings
    print(f"load {sum(pipe.load_seconds.values()):.2f}s | text encoder {t['text_encoder']:.2f}s | "
          f"unet {t['unet']:.2f}s ({t['unet_per_step']:.3f}s/step) | vae decoder {t['vae_decoder']:.2f}s | "
          f"total {t['total']:.2f}s | peak memory {format_bytes(peak_rss_bytes())}")
    return 0


def _info(a: argparse.Namespace) -> int:
    m = read_manifest(a.bundle)
    print(f"bundle {a.bundle}  id {m.bundle_id}  format v{m.format_version}")
    print(f"family {m.family}  prediction {m.prediction_type}  default size {m.default_size[1]}x{m.default_size[0]}"
          f"  (multiples of {m.size_multiple})  source {m.source.get('name')} ({m.source.get('kind')})")
    print(f"{'component':<13}{'precision':>10}{'params':>11}{'size':>11}{'PSNR dB':>9}{'max|diff|':>11}")
    for c in m.components.values():
        print(f"{c.name:<13}{c.precision:>10}{c.parameters / 1e6:>10.2f}M{format_bytes(c.bytes):>11}"
              f"{c.parity.get('psnr_db', float('nan')):>9.1f}{c.parity.get('max_abs_diff', float('nan')):>11.2e}")
    total = sum(c.bytes for c in m.components.values())
    print(f"total {format_bytes(total)}")
    return 0


def _progress_bar(width: int = 30):
    """A one-line bar on a terminal; in a log (not a TTY) just the closing line."""
    start = time.perf_counter()
    live = sys.stderr.isatty()

    def show(i: int, total: int, _latents) -> None:
        done, last = int(width * (i + 1) / total), i + 1 == total
        rate = (time.perf_counter() - start) / (i + 1)
        if live or last:
            print(f"\r[{'#' * done}{'.' * (width - done)}] {i + 1}/{total} {rate:.2f}s/step",
                  end="\n" if last else "", file=sys.stderr, flush=True)

    return show


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Stable Diffusion on the devices people own.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Stable Diffusion model to an edge bundle")
    c.add_argument("source", help="diffusers folder, .safetensors checkpoint, Hub id (from the local cache), "
                                  "or 'default' (the shipped model)")
    c.add_argument("-o", "--output", required=True, type=Path, help="bundle folder to write")
    c.add_argument("--config", help="diffusers folder or cached Hub id with the configs of a single-file checkpoint")
    c.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt pickles (they can run code)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    c.set_defaults(run=_convert)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("bundle", type=Path)
    g.add_argument("prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--scheduler", default="euler")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    g.add_argument("-o", "--output", default="out.png", help="PNG path (an index is added for several images)")
    g.set_defaults(run=_generate)

    i = sub.add_parser("info", help="summarise a bundle's manifest")
    i.add_argument("bundle", type=Path)
    i.set_defaults(run=_info)

    from edge.bench import add_bench_parser  # torch-free; peers run in child processes

    add_bench_parser(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
