"""edge's pipeline with torch modules as its graphs: the reference the Core ML graphs are checked against.

Same tokenizer, scheduler, denoising loop and guidance as the device runtime, so the only difference
between a Core ML (or ONNX) run and this one is the graphs. `pipelines(bundle)` gives two: diffusers' own
modules ("original") and the Core ML target's Neural-Engine rewrite ("ane").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge.converters.coreml.unet import UNetANE
from edge.converters.coreml.vae import DecoderANE
from edge.converters.sources import open_source
from edge.pipeline import Pipeline
from edge.tokenizer import ClipTokenizer


class _TorchGraph:
    """A torch callable behind the `run(outputs, feeds)` interface the pipeline drives graphs by."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.fn(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()]


class TorchPipeline(Pipeline):
    """edge's pipeline with torch modules for graphs: `unet(sample, t, context (B, 77, D))`, `decode(z)`."""

    def __init__(self, bundle: Path, manifest, tokenizer: ClipTokenizer, text_encoder, unet, decoder):
        super().__init__(bundle, manifest, None, [], tokenizer, None, verify=False)
        self._graphs = {
            "text_encoder": _TorchGraph(lambda input_ids: text_encoder(input_ids, return_dict=False)[0]),
            "vae_decoder": _TorchGraph(lambda latent_sample: decoder(latent_sample)),
        }
        self._unet = unet

    def _load_graph(self, component, k):
        return self._graphs[component.name]

    def unet(self, sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            timestep = torch.full((sample.shape[0],), float(t))
            return self._unet(torch.from_numpy(sample), timestep, torch.from_numpy(context)).numpy()


def pipelines(bundle: Path, source: str = "default") -> dict[str, TorchPipeline]:
    """Both torch pipelines for `source`; `bundle` (any edge bundle of it) gives the manifest and tokenizer."""
    from edge.bundle import read_manifest

    pipe = open_source(source).pipe
    manifest = read_manifest(bundle)
    tok = ClipTokenizer(bundle / manifest.tokenizer["vocab"], bundle / manifest.tokenizer["merges"],
                        max_length=manifest.text_max_length, pad_token=manifest.pad_token)
    ane_unet, ane_decoder = UNetANE.from_diffusers(pipe.unet), DecoderANE(pipe.vae).eval()
    return {
        "original": TorchPipeline(bundle, manifest, tok, pipe.text_encoder,
                                  lambda x, t, c: pipe.unet(x, t, c, return_dict=False)[0],
                                  lambda z: pipe.vae.decode(z, return_dict=False)[0]),
        "ane": TorchPipeline(bundle, manifest, tok, pipe.text_encoder,
                             lambda x, t, c: ane_unet(x, t, c.transpose(1, 2).unsqueeze(2)), ane_decoder),
    }
