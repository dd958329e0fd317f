"""The memory planner: how to run a bundle inside a memory budget, decided before anything is loaded.

The bundle's manifest carries what each graph costs on a device, measured by the converter
(`edge.memprobe`): RSS while loading, resident after loading, and activations as a function of latent
size and batch. A plan is the fastest way of running that fits; the options, from free to costly:

1. resident   every component stays loaded (the unconstrained run: no reloads between images),
2. staged     each stage loads its component and frees it afterwards: text encoder freed before
              denoising, VAE decoder loaded after it,
3. guidance   one batch-2 UNet call per step, or two batch-1 calls (half the UNet activations),
4. chunks     some of a split UNet's chunks loaded one at a time for every call, the rest resident
              (as many resident as fit: every reload costs a chunk's read and session creation),
5. tiles      the VAE decodes the latents in overlapping tiles (activations of one tile).

Each stage takes the first of its options that fits; a budget no plan meets is refused with the
smallest budget that would work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from edge.bundle import Component, Manifest
from edge.cpu import CpuFeatures, features
from edge.memory import format_bytes
from edge.memory_profile import HIDDEN_SCALE
from edge.memprobe import activation_bytes

_UNITS = {"": 1, "B": 1, **{p + s: 1024 ** (i + 1) for i, p in enumerate("KMGT") for s in ("", "B", "IB")}}
VAE_TILES = (64, 48, 32, 24, 16, 12, 8, 6, 4)  # latent pixels per tile side, tried largest first
# A plan must fit in (1 - HEADROOM) of the budget: estimates were within -10%..+9% of the OS-measured
# peak on SD 1.5 (benchmarks/RESULTS.md), and the OS figure itself moves by a few percent between runs.
HEADROOM = 0.10
TINY = "tiny_vae_decoder"  # the tiny autoencoder's decoder (TAESD): previews, or the final decoder


class BudgetError(ValueError):
    """No plan fits the memory budget (or the bundle cannot be planned)."""


def parse_bytes(text: str | int | float) -> int:
    """'4GB', '3.5GiB', '2048MB', '2G' or bytes; GB and GiB both mean 1024**3, as edge prints sizes (and
    /usr/bin/time counts KiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"memory budget {text!r} is not a size; use e.g. 4GB, 1.5GiB or 2048MB")
        value, unit = float(m.group(1)), m.group(2).upper()
    if not math.isfinite(value * _UNITS[unit]):  # 1e400GB: no size, and int() of it would overflow
        raise ValueError(f"memory budget {text!r} is not a finite size; use e.g. 4GB, 1.5GiB or 2048MB")
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return n


@dataclass(frozen=True)
class Stage:
    name: str  # text_encoder, unet, vae_decoder
    peak: int  # bytes, whole process
    detail: str  # what runs, in words


@dataclass(frozen=True)
class Plan:
    budget: int | None
    resident: bool  # all components loaded once and kept; else each stage loads and frees its own
    guidance_batch: int  # UNet batch per call with guidance: 2 (one call) or 1 (two calls)
    unet_per_call: bool  # load (some of) the UNet's chunks one at a time for every call
    vae_tile: int | None  # latent pixels per tile side; None decodes whole
    vae_overlap: int
    base: int  # process RSS before any graph is loaded
    stages: tuple[Stage, ...] = field(default=())
    unet_keep: int = 0  # with unet_per_call: the first chunks that stay loaded; the rest load for every call
    decoder: str = "full"  # the final decoder: "full" (the VAE decoder) or "tiny" (tiny_vae_decoder)
    tiny_previews: bool = False  # the tiny decoder fits beside the UNet: previews may decode with it
    control_per_call: bool = False  # ControlNets loaded for each UNet call (else resident while denoising)
    notes: tuple[str, ...] = ()  # what the user should know about speed on this CPU (int8_notes)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def describe(self) -> str:
        budget = "none" if self.budget is None else format_bytes(self.budget)
        lines = [f"memory budget {budget}; estimated peak {format_bytes(self.peak)} "
                 f"(process before loading: {format_bytes(self.base)})",
                 "components: " + ("all resident" if self.resident else
                                   "loaded per stage, freed after (text encoder before denoising, "
                                   "VAE decoder after it)")]
        lines += [f"  {s.name:<13} peak {format_bytes(s.peak):>9}  {s.detail}" for s in self.stages]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class _Graphs:
    """One component's measured graphs (several for a split UNet), in run order."""

    load_peak: tuple[int, ...]
    resident: tuple[int, ...]
    activation: tuple[dict, ...]
    carry: tuple[dict, ...]

    @classmethod
    def of(cls, c: Component) -> "_Graphs":
        graphs = c.memory.get("graphs") if c.memory else None
        if not graphs:
            raise BudgetError(f"{c.name}: the bundle has no memory measurements (converted by an older edge); "
                              "re-convert it to plan for a budget")
        measured = [int(g["resident"]) for g in graphs]
        resident, fits = list(measured), [dict(g["activation"]) for g in graphs]
        # Weights mapped from disk (converters/aligned.py) are measured before a run reads them, so the probe saw
        # them in the run's constant; after it they count in RSS as long as the graph is loaded (SD 2.1 int8 at
        # 768x768 peaked at 4.4 GB against an estimate of 3.3 GB). Each graph holds at least what the probe saw it
        # hold after its run (`held`); bundles measured before that was recorded: at least its weights, which
        # overcounts a token table (full-size SDXL's second text encoder: 845 MiB of weights, 685 MiB held).
        sizes = [ch.weight_bytes for ch in c.chunks]
        if all("held" in g for g in graphs):
            resident = [max(m, int(g["held"])) for m, g in zip(measured, graphs)]
        elif len(sizes) == len(measured) and all(sizes):
            resident = [max(m, b) for m, b in zip(measured, sizes)]
        elif 0 < sum(measured) < c.bytes:  # chunk sizes not recorded: the component's, shared out as measured
            resident = [int(r * c.bytes / sum(measured)) for r in measured]
        for fit, r, m in zip(fits, resident, measured):
            fit["c"] = max(0.0, fit.get("c", 0.0) - (r - m))
        return cls(tuple(int(g["load_peak"]) for g in graphs), tuple(resident), tuple(fits),
                   tuple(g.get("carry_fit", {"a": 0.0}) for g in graphs))

    def run(self, pixels: int, batch: int) -> list[int]:
        """Activation + what earlier chunks left behind, per graph."""
        out = []
        for k, fit in enumerate(self.activation):
            carried = 0 if k == 0 else int(self.carry[k - 1].get("a", 0.0) * pixels * batch)
            out.append(activation_bytes(fit, pixels, batch) + carried)
        return out


def _text_encoders(manifest: Manifest, together: bool) -> _Graphs:
    """The text stage as one graph. SDXL's two encoders `together` (all resident): they add up, the larger
    activation on top of both; else one at a time (edge.stages.text_xl frees the first before the second loads):
    the larger of the two."""
    encoders = [manifest.components[n] for n in ("text_encoder", "text_encoder_2") if n in manifest.components]
    if len(encoders) == 1:  # SD's, or the SDXL refiner's (its second only)
        return _Graphs.of(encoders[0])
    first, second = (_Graphs.of(c) for c in encoders)
    if not together:
        return _Graphs((max(first.load_peak[0], second.load_peak[0]),),
                       (max(g.resident[0] + g.run(1, 1)[0] for g in (first, second)),), ({"c": 0.0, "a": 0.0, "b": 0.0},),
                       ({"a": 0.0},))
    acts = (first.activation[0], second.activation[0])
    act = max(acts, key=lambda fit: activation_bytes(fit, 1, 1))
    return _Graphs((max(first.load_peak[0], first.resident[0] + second.load_peak[0]),),
                   (first.resident[0] + second.resident[0],), (act,), ({"a": 0.0},))


def _controlnets(manifest: Manifest, names: tuple[str, ...]) -> list[_Graphs]:
    missing = [n for n in names if not manifest.components[n].memory]
    if missing:
        raise BudgetError(f"{missing[0]}: the bundle has no memory measurements for it; re-convert it to plan "
                          "ControlNets for a budget")
    return [_Graphs.of(manifest.components[n]) for n in names]


def _control_peak(controls: list[_Graphs], pixels: int, batch: int, per_call: bool) -> tuple[int, int]:
    """(bytes the ControlNets hold through denoising, their peak above that while they run, one after another,
    their residuals kept for the UNet): resident, or each loaded for its call and freed."""
    if not controls:
        return 0, 0
    runs = [c.run(pixels, batch)[0] for c in controls]
    if per_call:
        return 0, max(max(c.load_peak[0], c.resident[0] + a) for c, a in zip(controls, runs))
    return sum(c.resident[0] for c in controls), max(runs)


def make_plan(manifest: Manifest, budget: int | None, height: int, width: int, *, num_images: int = 1,
              guided: bool = True, base: int = 0, image: bool = False, decoder: str = "full",
              controlnets: tuple[str, ...] = ()) -> Plan:
    """The fastest plan whose estimated peak fits `budget` (None: everything resident, unconstrained).
    `image`: img2img or inpainting, whose VAE encoder stage runs first (where the bundle measured it).
    `decoder`: "tiny" decodes with the tiny autoencoder (never tiled: it holds a tile's worth at most).
    `controlnets`: the ControlNet components this generation runs (a stage of the denoiser: resident while it
    runs, or loaded for every UNet call when that is what fits)."""
    controls = _controlnets(manifest, controlnets)
    f = manifest.vae_scale_factor
    h, w = height // f, width // f
    tiny = manifest.components.get(TINY)
    tiny = _Graphs.of(tiny) if tiny is not None and tiny.memory else None
    if decoder == "tiny" and tiny is None:
        raise BudgetError(f"this bundle has no measured {TINY}: re-convert it with --tiny-vae to plan with it")
    te, unet = _text_encoders(manifest, together=True), _Graphs.of(manifest.components["unet"])
    vae = tiny if decoder == "tiny" else _Graphs.of(manifest.components["vae_decoder"])
    tiny_cost = 0 if tiny is None else tiny.resident[0] + tiny.run(h * w, 1)[0] + 3 * height * width * 4
    te_act = te.run(1, 1)[0]  # one prompt per call, any latent size
    batches = (2, 1) if guided else (1,)

    def unet_peak(batch: int, keep: int, per_call: bool = False) -> int:
        """Peak with the first `keep` chunks resident and the others loaded one at a time per call, and the
        ControlNets (resident, or `per_call`) running before each call."""
        act = unet.run(h * w, batch * num_images)
        kept = sum(unet.resident[:keep])
        held, running = _control_peak(controls, h * w, batch * num_images, per_call)
        peaks = [_loading_peak(0, unet, keep)] + [kept + a for a in act[:keep]]
        peaks += [kept + max(lp, r + a) for lp, r, a in zip(unet.load_peak[keep:], unet.resident[keep:], act[keep:])]
        return max(peaks) + held + (0 if not controls else max(0, kept + running - max(peaks)))

    head = manifest.components.get("vae_decoder_head")
    head = _Graphs.of(head) if head is not None and head.memory else None  # tiles decode after a whole-latent head
    head = None if decoder == "tiny" else head
    tail = manifest.components.get("vae_decoder_tiled")  # the tiles' graph, measured per latent tile (newer bundles)
    tail = _Graphs.of(tail) if tail is not None and tail.memory and head is not None else None

    def vae_peak(tile: int | None) -> int:
        th, tw = (h, w) if tile is None else (min(tile, h), min(tile, w))
        image = 3 * height * width * 4 * (1 if tile is None else 3)  # output (+ weighted sum and weights)
        if tile is not None and tail is not None:  # the head on the whole latent, freed; its output kept for the tail
            act = max(tail.resident[0] + tail.run(th * tw, 1)[0], head.resident[0] + head.run(h * w, 1)[0])
            hidden = manifest.components["vae_decoder_head"].outputs[0].shape[1] * 4 * h * w * HIDDEN_SCALE ** 2
            return max(tail.load_peak[0], head.load_peak[0], int(act) + hidden + image)
        act = vae.run(th * tw, 1)[0]  # older bundles: the plain decoder on a tile stands in for the tail
        if tile is not None and head is not None:  # + the head on the whole latent, and its output kept
            act = max(act, head.run(h * w, 1)[0]) + head.carry[0].get("a", 0.0) * h * w
        return max(vae.load_peak[0], vae.resident[0] + int(act) + image)

    tiles = [None] + ([] if decoder == "tiny" else [t for t in VAE_TILES if t < max(h, w)])

    encoder = manifest.components.get("vae_encoder")
    enc = _Graphs.of(encoder) if image and encoder is not None and encoder.memory else None
    enc_act = 0 if enc is None else enc.run(h * w, 1)[0]  # one input picture

    # 1. Everything resident, one batch-2 call per step, whole VAE decode.
    resident_all = sum(te.resident) + sum(unet.resident) + sum(vae.resident) + (0 if enc is None else enc.resident[0])
    resident_all += 0 if tiny is None or decoder == "tiny" else tiny.resident[0]  # for previews, at first use
    resident_all += sum(c.resident[0] for c in controls)
    loading = max(te.load_peak[0], _loading_peak(sum(te.resident), unet),
                  sum(te.resident) + sum(unet.resident) + vae.load_peak[0])
    unet_act = max(max(unet.run(h * w, batches[0] * num_images)),
                   _control_peak(controls, h * w, batches[0] * num_images, False)[1])
    vae_act = vae_peak(None) - vae.resident[0]
    encoding = () if enc is None else (Stage("vae_encoder", base + resident_all + enc_act,
                                             "encodes the input picture, kept with the others"),)
    resident = Plan(budget, True, batches[0], False, None, 0, base, encoding + (
        Stage("text_encoder", base + max(loading, resident_all + te_act), "loaded with the others, kept"),
        Stage("unet", base + resident_all + unet_act, _unet_words(manifest, batches[0], len(unet.resident), guided)
              + ("; ControlNets resident" if controls else "")),
        Stage("vae_decoder", base + resident_all + vae_act, _vae_words(None, h, w, decoder)),
    ), notes=int8_notes(manifest), decoder=decoder, tiny_previews=tiny is not None)
    if budget is None or resident.peak <= budget * (1 - HEADROOM):
        return resident
    limit = budget * (1 - HEADROOM)

    # 2-5. Stage by stage: each takes its first option that fits.
    te = _text_encoders(manifest, together=False)
    two = "text_encoder_2" in manifest.components and "text_encoder" in manifest.components
    text_stage = Stage("text_encoder", base + max(te.load_peak[0], te.resident[0] + te.run(1, 1)[0]),
                       "loaded, run once per prompt, freed; the two encoders one after the other" if two else
                       "loaded, run once per prompt, freed")
    first = () if enc is None else (Stage("vae_encoder", base + max(enc.load_peak[0], enc.resident[0] + enc_act),
                                          "loaded alone, encodes the input picture, freed"),)
    n = len(unet.resident)
    chunked = n > 1
    # All chunks resident (batch 2, then two batch-1 calls); then chunks reloaded for every call, the
    # fewest bytes reloaded per step first (two batch-1 calls reload twice).
    reload = [(b, keep) for b in batches for keep in range(n - 1, -1, -1)] if chunked else []
    reload.sort(key=lambda o: (sum(unet.resident[o[1]:]) * (2 if guided and o[0] == 1 else 1), -o[0]))
    unet_options = [(b, n, False) for b in batches] + [(b, keep, False) for b, keep in reload]
    unet_options += [(b, keep, True) for b, keep, _ in unet_options] if controls else []  # ControlNets per call
    unet_stages = [(b, keep, Stage("unet", base + unet_peak(b, keep, per_call), _unet_words(manifest, b, keep, guided)
                                   + ("; ControlNets loaded for every call" if per_call else
                                      "; ControlNets resident" if controls else "")), per_call)
                   for b, keep, per_call in unet_options]
    vae_stages = [(t, Stage("vae_decoder", base + vae_peak(t), _vae_words(t, h, w, decoder))) for t in tiles]
    fits = [s for s in unet_stages if s[2].peak <= limit], [s for s in vae_stages if s[1].peak <= limit]
    single = [("the VAE encoder", s.peak) for s in first] + [("the text encoder", text_stage.peak)]
    if max(p for _, p in single) > limit or not fits[0] or not fits[1]:
        worst = max(*single, ("the UNet", min(s[2].peak for s in unet_stages)),
                    ("the VAE decoder", min(s[1].peak for s in vae_stages)), key=lambda x: x[1])
        smallest = worst[1]
        raise BudgetError(
            f"memory budget {format_bytes(budget)} cannot be met for {height}x{width}"
            f"{f' x{num_images}' if num_images > 1 else ''}: the smallest plan needs "
            f"{format_bytes(_round_up(smallest / (1 - HEADROOM)))} ({worst[0]} stage"
            f"{f' on top of the {format_bytes(base)} this process already holds' if base else ''}, with "
            f"{HEADROOM:.0%} headroom for the estimate; "
            f"{'a split UNet (--split-unet) or ' if not chunked else ''}a lower precision bundle needs less)")
    (batch, keep, unet_stage, control_per_call), (tile, vae_stage) = fits[0][0], fits[1][0]
    previews = tiny is not None and unet_stage.peak + tiny_cost <= limit  # the tiny decoder beside the UNet
    if previews:
        unet_stage = Stage("unet", unet_stage.peak + tiny_cost, unet_stage.detail + "; the tiny decoder for previews")
    return Plan(budget, False, batch, keep < n, tile, _overlap(tile), base,
                first + (text_stage, unet_stage, vae_stage), unet_keep=keep if keep < n else 0,
                notes=int8_notes(manifest), decoder=decoder, tiny_previews=previews, control_per_call=control_per_call)


def smallest_budget(manifest: Manifest, height: int, width: int, *, num_images: int = 1, guided: bool = True,
                    base: int = 0, image: bool = False, decoder: str = "full",
                    controlnets: tuple[str, ...] = ()) -> tuple[int, Plan]:
    """The smallest budget (to 1 MiB) any plan of this bundle fits at this size, and that plan: what `edge plan`
    states, so a user sees how far down a budget can go before trying one."""
    def fits(budget: int) -> Plan | None:
        try:
            return make_plan(manifest, budget, height, width, num_images=num_images, guided=guided, base=base,
                             image=image, decoder=decoder, controlnets=controlnets)
        except BudgetError:
            return None

    hi = _round_up(make_plan(manifest, None, height, width, num_images=num_images, guided=guided, base=base,
                             image=image, decoder=decoder, controlnets=controlnets).peak / (1 - HEADROOM)) + 2**20
    lo = 2**20  # MiB steps: no plan is that exact
    while hi - lo > 2**20:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) is not None else (mid, hi)
    plan = fits(hi)
    assert plan is not None  # the resident plan fits hi
    return hi, plan


def int8_notes(manifest: Manifest, cpu: CpuFeatures | None = None) -> tuple[str, ...]:
    """Where the bundle's int8 graphs gain no speed on this CPU, say so: on x86 without VNNI and ARM without
    dot product, onnxruntime's exact int8 kernels are no faster than fp32 (AMD EPYC Zen 1, SD 1.5 UNet call:
    static int8 30.6 s against fp32 26.7 s; benchmarks/RESULTS.md "int8 on every CPU")."""
    cpu = features() if cpu is None else cpu
    int8 = sorted(n for n, c in manifest.components.items() if c.precision.startswith("int8"))
    if not int8 or cpu.int8_dot:
        return ()
    return (f"{', '.join(int8)} int8 on this CPU ({cpu.int8_path.split(':')[0]}): int8 saves memory here but "
            "is no faster than fp32; where an fp32 bundle fits the budget it is as fast or faster",)


def _loading_peak(before: int, graphs: _Graphs, count: int | None = None) -> int:
    """Peak while loading the first `count` (default: all) of `graphs` one after another on top of `before`."""
    return max([before] + [before + sum(graphs.resident[:k]) + lp
                           for k, lp in enumerate(graphs.load_peak[:count])])


def _overlap(tile: int | None) -> int:
    return 0 if tile is None else max(2, tile // 4)


def _round_up(n: int) -> int:
    return int(math.ceil(n / 2**30 * 10) * 2**30 / 10)  # to 0.1 GB


def _unet_words(manifest: Manifest, batch: int, keep: int, guided: bool) -> str:
    chunks = len(manifest.components["unet"].chunks) or 1
    how = "one batch-2 call per step" if guided and batch == 2 else (
        "two batch-1 calls per step" if guided else "one call per step")
    where = ("whole graph resident" if chunks == 1 else f"{chunks} chunks resident" if keep >= chunks else
             f"{chunks} chunks loaded one at a time for every call" if keep == 0 else
             f"{'chunk 1' if keep == 1 else f'chunks 1-{keep}'} of {chunks} resident, the others loaded one at "
             "a time for every call")
    return f"{how}, {where}"


def _vae_words(tile: int | None, h: int, w: int, decoder: str = "full") -> str:
    if decoder == "tiny":
        return f"the tiny decoder, whole {h}x{w} latent at once"
    if tile is None:
        return f"whole {h}x{w} latent at once"
    return f"{min(tile, h)}x{min(tile, w)} latent tiles, overlap {_overlap(tile)}, blended seams"
