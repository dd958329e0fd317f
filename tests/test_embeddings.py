"""Textual inversion: embeddings in the diffusers and A1111 layouts, one or several vectors, loaded at run time
(the text encoder graph given a grown token table) against diffusers' load_textual_inversion, same latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import euler_pipeline, run_edge
from edge import Pipeline
from edge.embeddings import EmbeddingError
from edge.metrics import psnr

LATENTS = np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(models):
    return euler_pipeline(models["folder-epsilon"])  # its own: the tests load adapters into it


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    width = reference.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    save_file({"<sparkle>": torch.randn(2, width, generator=g)}, str(root / "learned_embeds.safetensors"))
    save_file({"emb_params": torch.randn(3, width, generator=g)}, str(root / "grainy.safetensors"))  # A1111
    save_file({"<one>": torch.randn(width, generator=g)}, str(root / "one.safetensors"))
    save_file({"emb_params": torch.randn(2, width + 8, generator=g)}, str(root / "wide.safetensors"))
    return root


def _diffusers(pipe, prompt, negative):
    with torch.no_grad():
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=64,
                   width=64, latents=torch.from_numpy(LATENTS), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def test_embeddings_match_diffusers(bundles, reference, files):
    """A two-vector diffusers embedding in the prompt, a one-vector one beside it, and a three-vector A1111 one as
    the negative prompt (the "negative embedding" use)."""
    prompt, negative = "a red circle, <sparkle> and <one>", "grainy, blurry"
    plain = _diffusers(reference, prompt, negative)
    reference.load_textual_inversion(str(files / "learned_embeds.safetensors"))
    reference.load_textual_inversion(str(files / "one.safetensors"))
    reference.load_textual_inversion(str(files / "grainy.safetensors"), token="grainy")
    expected = _diffusers(reference, prompt, negative)
    pipe = Pipeline.load(bundles["folder-epsilon"])
    before = np.asarray(pipe.generate(prompt, negative_prompt=negative, steps=4, latents=LATENTS,
                                      scheduler="euler").images[0])
    for name in ("learned_embeds", "one", "grainy"):
        pipe.load_embedding(files / f"{name}.safetensors")
    ours = np.asarray(pipe.generate(prompt, negative_prompt=negative, steps=4, latents=LATENTS,
                                    scheduler="euler").images[0])
    assert psnr(before, plain) >= 40 and psnr(expected, plain) < 35  # the embeddings change the picture
    assert psnr(expected, ours) >= 40
    # the words, typed in another case, are the same tokens
    again = pipe.generate(prompt.replace("<sparkle>", "<SPARKLE>"), negative_prompt="Grainy, blurry", steps=4,
                          latents=LATENTS, scheduler="euler")
    assert np.array_equal(np.asarray(again.images[0]), ours)


def test_cli_embeddings_dir_and_errors(bundles, files, tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "grainy.safetensors").write_bytes((files / "grainy.safetensors").read_bytes())
    bundle = bundles["folder-epsilon"]
    run_edge("generate", bundle, "a red circle", "--negative-prompt", "grainy", "--embeddings-dir", folder,
             "--steps", "2", "-o", tmp_path / "a.png")
    run_edge("generate", bundle, "a red circle", "--negative-prompt", "grainy", "--embedding",
             f"{files / 'grainy.safetensors'}:grainy", "--steps", "2", "-o", tmp_path / "b.png")
    run_edge("generate", bundle, "a red circle", "--negative-prompt", "grainy", "--steps", "2", "-o", tmp_path / "c.png")
    from PIL import Image

    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    proc = run_edge("generate", bundle, "x", "--embedding", files / "wide.safetensors", "-o", tmp_path / "d.png",
                    check=False)
    assert proc.returncode != 0 and "vectors of width 40, but this text encoder's tokens are 32 wide" in proc.stderr
    pipe = Pipeline.load(bundle)
    with pytest.raises(EmbeddingError, match="an SDXL embedding \\(clip_l, clip_g\\), but this sd1 bundle has one "
                                             "text encoder"):
        save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)}, str(tmp_path / "xl.safetensors"))
        pipe.load_embedding(tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="are Python pickles"):
        (tmp_path / "neg.pt").write_bytes(b"\x80\x04")
        pipe.load_embedding(tmp_path / "neg.pt")
    with pytest.raises(ValueError, match="already in the vocabulary"):
        pipe.load_embedding(files / "grainy.safetensors", token="red")
