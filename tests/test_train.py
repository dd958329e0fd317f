"""The default model's training script runs end to end and is deterministic from its seed (a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge.converters.default_model.config import ModelConfig, TrainConfig
from edge.converters.default_model.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    outs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"train{k}")
        train(out, ModelConfig(), TrainConfig(seed=3, threads=1), minutes=5, vae_steps=3, unet_steps=3)
        outs.append(out)
    return outs


def test_replaying_the_step_counts_gives_identical_weights(runs):
    for part in ("unet", "text_encoder", "vae"):
        a, b = (load_file(next((r / part).glob("*.safetensors"))) for r in runs)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_the_log_records_the_recipe(runs):
    import json

    log = json.loads((runs[0] / "train_log.json").read_text())
    assert log["plan"]["unet_steps"] == 3 and log["plan"]["vae_steps"] == 3
    assert log["train_config"]["unet_object_weight"] == 4.0 and log["train_config"]["aux_position_weight"] == 0.2
    assert [e["step"] for e in log["unet_log"]] == [3]
