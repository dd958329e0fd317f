"""LoRA at run time on a full-size bundle: how long applying, switching and dropping a LoRA takes, what it holds in
memory, and what a generation costs with it (the LoRA'd graphs open at onnxruntime's "extended" level).

    python benchmarks/lora_switch.py BUNDLE [--rank 16] [--steps 2] [--size 512]

Two random LoRAs in kohya's layout (rank R on every attention projection of the UNet and the text encoder, alpha
R), written beside the bundle's cache; each figure is one run on this machine (name the CPU with it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


ATTENTION = tuple(f".{m}.weight" for m in ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj",
                                             "out_proj"))


def write_lora(bundle: Path, out: Path, rank: int, seed: int) -> Path:
    from safetensors.numpy import save_file

    from edge.bundle import read_manifest
    from edge.weights_io import read_initializers

    where, manifest = json.loads((bundle / "weights.json").read_text()), read_manifest(bundle)
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        targets = {w: e for w, e in where[component].items() if w.endswith(ATTENTION)}
        graphs: dict[int, set] = {}
        for w, e in targets.items():
            graphs.setdefault(e["graph"], set()).add(e["initializer"])
        shapes = {}
        for k, names in graphs.items():
            graph = bundle / manifest.components[component].graphs[k]
            shapes.update({n: a.shape for n, a in read_initializers(graph, names).items()})
        for w, e in targets.items():
            cols, rows = shapes[e["initializer"]] if e["transposed"] else shapes[e["initializer"]][::-1]
            key = prefix + w.removesuffix(".weight").removeprefix("text_model.").replace(".", "_")
            tensors[key + ".lora_down.weight"] = (rng.standard_normal((rank, cols)) * 0.01).astype(np.float16)
            tensors[key + ".lora_up.weight"] = (rng.standard_normal((rows, rank)) * 0.01).astype(np.float16)
            tensors[key + ".alpha"] = np.array(float(rank), np.float16)
    save_file(tensors, str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args()
    from edge.memprobe import rss_bytes
    from edge.pipeline import Pipeline

    files = [write_lora(a.bundle, Path(f"/tmp/lora-{k}-r{a.rank}.safetensors"), a.rank, k) for k in (1, 2)]
    t = time.perf_counter()
    pipe = Pipeline.load(a.bundle)
    rows = {"load_s": time.perf_counter() - t, "lora_file_mb": [f.stat().st_size / 2**20 for f in files]}

    def run(label: str, loras) -> None:
        before = rss_bytes()
        t = time.perf_counter()
        changed = pipe.use_loras([(pipe.adapters.read(f), s) for f, s in loras])
        switch = time.perf_counter() - t
        t = time.perf_counter()
        r = pipe.generate("a photo of a cat", steps=a.steps, height=a.size, width=a.size, loras=loras)
        rows[label] = {"switch_s": switch, "graphs_reloaded": len(changed), "rss_before_gb": before / 2**30,
                       "rss_after_switch_gb": rss_bytes() / 2**30, "held_mb": pipe.adapters.extra_bytes() / 2**20,
                       "unet_per_step_s": r.timings["unet_per_step"], "generate_s": time.perf_counter() - t}
        print(label, json.dumps(rows[label]), flush=True)

    run("no LoRA (warm)", [])
    run("LoRA A x0.8", [(files[0], 0.8)])
    run("A x0.8 again", [(files[0], 0.8)])
    run("switch to B x0.6", [(files[1], 0.6)])
    run("A + B", [(files[0], 0.8), (files[1], 0.6)])
    run("back to none", [])
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
