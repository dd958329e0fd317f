"""`edge bench --peers openvino,openvino-int8`: optimum-intel's pipeline on OpenVINO, in its own environment."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_bench import peer_cache, run_bench


def test_auto_skips_openvino_with_the_install_commands(models, tmp_path, monkeypatch):
    from edge.bench import _prepare_peers

    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))  # no peer environments here
    skipped: dict[str, str] = {}
    ready = _prepare_peers({"openvino"}, False, models["folder-epsilon"], {}, skipped, log=lambda s: None)
    assert ready == {} and list(skipped) == ["openvino"]
    why = skipped["openvino"]
    assert str(tmp_path / "peers" / "openvino") in why and "--peers openvino" in why
    assert "pip install torch==2.13.0" in why and "optimum-intel==2.2.0" in why and "openvino==" in why
    assert "\n" not in why


def _element_types(xml: Path) -> set[str]:
    return set(re.findall(r'element_type="(\w+)"', xml.read_text(encoding="utf-8")))


def test_openvino_peers_when_their_environment_exists(bundles, tmp_path):
    cache = tmp_path / "cache"
    env = peer_cache("openvino", cache)
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--peers", "openvino,openvino-int8", "-o",
                     tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [run["name"] for run in r["runs"]] == ["edge", "openvino", "openvino-int8"]
    for run in r["runs"][1:]:
        assert run["ok"] and run["execution_provider"] == "OpenVINO CPU" and run["versions"]["openvino"]
        assert run["unet_call_s"]["n"] == 2 and run["text_encoder_s"]["n"] == 1 and run["vae_decode_s"]["n"] == 1
        assert run["peak_rss_bytes"] > 100 * 2**20 and run["load_s"] > 0
        assert r["ratios"][run["name"]]["unet_call"] > 0
        # the precision OpenVINO compiled to on this CPU, read back from it and named in the report
        p = run["precision"]
        assert set(p["inference"]) == {"text_encoder", "unet", "vae_decoder"} and p["device_capabilities"]
        assert p["inference"]["unet"] in ("bf16", "fp16", "fp32") and f"{p['inference']['unet']} inference" in \
            run["runtime"]
    assert r["runs"][1]["precision"]["weights"] == "fp32" and "int8 weights" in r["runs"][2]["runtime"]
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| optimum-intel" in md and "| openvino-int8 |" in md
    # Same latents and scheduler: identical pixels at fp32, 40.9 dB at bf16 (AMX), 41.3 dB with int8 weights
    fidelity = r["fidelity"]["image_vs_peers"]
    assert fidelity["openvino"]["psnr_db"] > 30 and fidelity["openvino-int8"]["psnr_db"] > 25
    # optimum-intel's export at fp32 weights, and nncf's 8-bit weight compression of it
    fp, int8 = sorted((cache / "openvino").iterdir())
    assert int8.name == fp.name + "-int8"
    assert "f32" in _element_types(fp / "unet" / "openvino_model.xml")
    assert _element_types(fp / "unet" / "openvino_model.xml").isdisjoint({"u8", "i8"})
    assert _element_types(int8 / "unet" / "openvino_model.xml") & {"u8", "i8"}
    assert (int8 / "unet" / "openvino_model.bin").stat().st_size < 0.5 * (fp / "unet" / "openvino_model.bin").stat().st_size
