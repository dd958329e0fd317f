"""Our diffusers -> LDM mapping, checked by diffusers' own single-file loader, offline.

Also pins the loader's behaviours that `edge convert` must guard against or translate: the
errors for corrupt and non-SD files, and the failures it does not report at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    SingleFileComponentError,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from edge.converters.ldm_layout import save_single_file, to_ldm_state_dict  # noqa: E402
from edge.converters.tiny import save_tiny_single_file, tiny_pipeline  # noqa: E402

torch.set_num_threads(1)
MODELS = ("unet", "vae", "text_encoder")
PROMPT = "a photo of an astronaut riding a horse"


def load_single_file(path: Path, config_dir: Path) -> StableDiffusionPipeline:
    """The call `edge convert` makes. `config` must be a str: a Path is refused by the model loaders."""
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp(request.param)
    path, config_dir = out / "tiny.safetensors", out / "config"
    pipe = save_tiny_single_file(path, config_dir, prediction_type=request.param, seed=1)
    return {"pipe": pipe, "path": path, "config_dir": config_dir, "loaded": load_single_file(path, config_dir)}


def test_config_folder_holds_no_weights(written: dict) -> None:
    names = {p.relative_to(written["config_dir"]).as_posix() for p in written["config_dir"].rglob("*") if p.is_file()}
    assert "model_index.json" in names and "unet/config.json" in names and "tokenizer/tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))]


def test_single_file_loads_back_exactly(written: dict) -> None:
    for name in MODELS:
        want = getattr(written["pipe"], name).state_dict()
        got = getattr(written["loaded"], name).state_dict()
        assert set(got) == set(want), f"{name}: key sets differ: {sorted(set(got) ^ set(want))[:5]}"
        for key, tensor in want.items():
            assert not got[key].is_meta, f"{name}.{key} was never loaded"
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}.{key} differs"


def test_every_weight_in_the_file_is_read(written: dict) -> None:
    """diffusers' own LDM -> diffusers converters give back exactly each model's keys, and no file key is left over."""
    ckpt = load_file(written["path"])
    pipe = written["pipe"]
    converted = {
        "unet": convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()},
    }
    for name in MODELS:
        assert set(converted[name]) == set(getattr(pipe, name).state_dict()), name
    assert len(ckpt) == sum(len(c) for c in converted.values())


def test_scheduler_and_tokenizer_come_from_the_config_folder(written: dict) -> None:
    want, got = written["pipe"].scheduler.config, written["loaded"].scheduler.config
    assert type(written["loaded"].scheduler).__name__ == "PNDMScheduler"
    for key in ("prediction_type", "beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing"):
        assert got[key] == want[key], key
    assert len(written["loaded"].tokenizer) == 49408
    assert written["loaded"].tokenizer(PROMPT).input_ids == written["pipe"].tokenizer(PROMPT).input_ids


def test_tiny_pipeline_is_deterministic_and_not_degenerate() -> None:
    a, b, c = tiny_pipeline(seed=3), tiny_pipeline(seed=3), tiny_pipeline(seed=4)
    key = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[key], b.unet.state_dict()[key])
    assert not torch.equal(a.unet.state_dict()[key], c.unet.state_dict()[key])
    assert a.vae_scale_factor == 8
    with torch.no_grad():
        ids = a.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = a.text_encoder(ids)[0]  # (1, 77, 32)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (1, 4, 8, 8)
        noise = a.unet(latents, 10, encoder_hidden_states=text).sample  # (1, 4, 8, 8)
        image = a.vae.decode(latents).sample  # (1, 3, 64, 64)
    assert image.shape == (1, 3, 64, 64)
    for out in (text, noise, image):
        assert torch.isfinite(out).all() and out.std() > 1e-3


def test_sd15_sized_models_get_the_original_names_and_shapes() -> None:
    """Full SD 1.5 architecture on the meta device (no memory): v1-5-pruned's key counts and names."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    state = to_ldm_state_dict(unet, vae, clip)
    counts = {p: sum(k.startswith(p) for k in state) for p in ("model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_unmappable_models_and_paths_are_refused(tmp_path: Path) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(class_embed_type="timestep")  # an SD upscaler-style extra
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="class_embedding"):
        to_ldm_state_dict(unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(ValueError, match=r"tiny\.ckpt"):
        save_single_file(pipe, tmp_path / "tiny.ckpt")
    assert not list(tmp_path.iterdir())


# What diffusers 0.42.1 does with bad input: the errors `edge convert` will have to translate.


def test_truncated_file_raises_oserror(written: dict, tmp_path: Path) -> None:
    raw = written["path"].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OSError, match="Unable to load weights from checkpoint file"):
        load_single_file(bad, written["config_dir"])


def test_non_sd_file_raises_single_file_component_error(written: dict, tmp_path: Path) -> None:
    bad = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "head.bias": torch.zeros(4)}, bad)
    with pytest.raises(SingleFileComponentError, match="Failed to load CLIPTextModel"):
        load_single_file(bad, written["config_dir"])


def test_missing_weight_goes_unnoticed(written: dict, tmp_path: Path) -> None:
    """diffusers never names a missing weight: without accelerate it leaves it at its random init, without a word;
    with accelerate installed (peft, which the LoRA tests need, pulls it in) the model is made on the meta device
    and loading fails deep in torch. Either way: check the key set yourself (edge.converters.sources does)."""
    ckpt = load_file(written["path"])
    del ckpt["model.diffusion_model.out.2.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(ckpt, partial)
    try:
        loaded = load_single_file(partial, written["config_dir"])
    except NotImplementedError as e:  # accelerate: the weight stayed on the meta device
        assert "meta tensor" in str(e) and "out.2" not in str(e)
    else:
        assert not torch.equal(loaded.unet.conv_out.weight, written["pipe"].unet.conv_out.weight)


def test_config_folder_without_tokenizer_gives_an_empty_tokenizer(written: dict, tmp_path: Path) -> None:
    """transformers builds a 2-token CLIPTokenizer instead of failing: check the vocabulary size yourself."""
    config_dir = tmp_path / "config"
    shutil.copytree(written["config_dir"], config_dir)
    shutil.rmtree(config_dir / "tokenizer")
    assert len(load_single_file(written["path"], config_dir).tokenizer) < 49408


def test_prediction_type_argument_replaces_the_whole_scheduler(written: dict) -> None:
    """The deprecated `prediction_type=` kwarg rebuilds the scheduler from defaults, betas included."""
    with pytest.warns(FutureWarning, match="prediction_type"):
        pipe = StableDiffusionPipeline.from_single_file(
            str(written["path"]), config=str(written["config_dir"]), local_files_only=True, prediction_type="epsilon"
        )
    assert pipe.scheduler.config.beta_start != written["pipe"].scheduler.config.beta_start
