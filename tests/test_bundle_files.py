"""Every file a bundle ships is hashed in its manifest and checked before use; a damaged one is named.

The tokenizer files are the case in point: before the bundle-wide file map, a corrupt vocab.json failed in
the JSON parser ("Expecting value: line 1 column 1 (char 0)") without naming any file, and a vocab.json with
two ids swapped tokenized silently wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_edge
from edge.bundle import BundleError, read_manifest, sha256_file, verify_bundle, verify_tokenizer
from edge.tokenizer import ClipTokenizer


def _copy(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "b")
    return tmp_path / "b"


def _swap_two_ids(vocab: Path) -> None:
    """Still a valid vocabulary, and wrong: only the checksum can tell."""
    d = json.loads(vocab.read_text(encoding="utf-8"))
    a, b = "a</w>", "b</w>"
    d[a], d[b] = d[b], d[a]
    vocab.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")


def _drop_a_merge(merges: Path) -> None:
    lines = merges.read_text(encoding="utf-8").splitlines()
    merges.write_text("\n".join(lines[:5] + lines[6:]) + "\n", encoding="utf-8")


def test_manifest_hashes_every_file(bundles):
    bundle = bundles["folder-epsilon"]
    m = read_manifest(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert m.hashes_every_file and set(m.files) == on_disk
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "unet.onnx"} <= set(m.files)
    for rel, digest in m.files.items():
        assert sha256_file(bundle / rel) == digest, rel
    verify_bundle(bundle, m)


@pytest.mark.parametrize("damage", ["empty vocab", "swapped ids", "dropped merge", "binary merges"])
def test_damaged_tokenizer_file_is_named_by_edge_generate(bundles, tmp_path, damage):
    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    vocab, merges = bundle / "tokenizer" / "vocab.json", bundle / "tokenizer" / "merges.txt"
    damaged = vocab if "vocab" in damage or "ids" in damage else merges
    if damage == "empty vocab":
        vocab.write_text("")
    elif damage == "swapped ids":
        _swap_two_ids(vocab)
    elif damage == "dropped merge":
        _drop_a_merge(merges)
    else:
        merges.write_bytes(b"\xff\xfe\x00garbage")
    proc = run_edge("generate", bundle, "a red circle", "--steps", "1", "-o", tmp_path / "x.png", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{damaged} is corrupt or was replaced" in lines[0] and lines[0].startswith("error: tokenizer: ")
    assert not (tmp_path / "x.png").exists()


def test_files_left_out_of_the_map_are_refused(bundles, tmp_path):
    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"]["tokenizer/merges.txt"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"merges.txt has no sha256 in the manifest's file list"):
        verify_tokenizer(bundle, read_manifest(bundle))


def test_missing_file_is_named(bundles, tmp_path):
    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    (bundle / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BundleError, match=r"tokenizer: file .*merges.txt named in the manifest is missing"):
        verify_tokenizer(bundle, read_manifest(bundle))
    with pytest.raises(BundleError, match=r"merges.txt named in the manifest is missing"):
        verify_bundle(bundle, read_manifest(bundle))


def test_new_bundles_record_the_scheduler_as_stated(bundles, tmp_path):
    """Only older manifests get the clip_sample upgrade; a new one without it leaves it to each sampler."""
    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    del data["scheduler"]["clip_sample"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert "clip_sample" not in read_manifest(bundle).scheduler


def test_malformed_file_map_is_refused(bundles, tmp_path):
    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"] = {"unet.onnx": "not-a-hash"}
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed field 'files': expected an object of relative path -> sha256"):
        read_manifest(bundle)


def test_bundle_from_before_the_file_map_still_loads(bundles, tmp_path):
    """Older manifests hashed the graphs and vocab.json (tokenizer.sha256): those are still checked, merges.txt
    cannot be, and the bundle generates as before."""
    from edge import Pipeline

    bundle = _copy(bundles["folder-epsilon"], tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"]
    # as those converters recorded it: the source class's (PNDM's) whole config, which has no clip_sample
    recorded = {k: v for k, v in data["scheduler"].items() if k != "clip_sample"}
    data["scheduler"] = {**recorded, "_class_name": "PNDMScheduler", "_use_default_values": ["timestep_spacing"]}
    (bundle / "manifest.json").write_text(json.dumps(data))
    m = read_manifest(bundle)
    assert not m.hashes_every_file
    assert m.scheduler["clip_sample"] is False  # DDIM kept unclipped, as edge sampled these bundles before
    assert set(m.files) == {rel for c in m.components.values() for rel in c.files} | {"tokenizer/vocab.json"}
    verify_bundle(bundle, m)
    assert Pipeline.load(bundle).generate("x", steps=1).images[0].size == (64, 64)
    _drop_a_merge(bundle / "tokenizer" / "merges.txt")
    verify_tokenizer(bundle, m)  # no hash recorded for it
    _swap_two_ids(bundle / "tokenizer" / "vocab.json")
    with pytest.raises(BundleError, match="vocab.json is corrupt or was replaced"):
        verify_tokenizer(bundle, m)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("vocab.json", "", r"vocab.json: not valid UTF-8 JSON \(Expecting value.*\); expected CLIP's vocabulary, a JSON "
                       r"object mapping each token to an integer id"),
    ("vocab.json", "[1, 2]", r"vocab.json: holds a JSON list; expected CLIP's vocabulary"),
    ("vocab.json", "{}", r"vocab.json: holds an empty object; expected CLIP's vocabulary"),
    ("vocab.json", '{"a": "b"}', r"vocab.json: token 'a' maps to 'b'; expected CLIP's vocabulary"),
    ("merges.txt", "#version: 0.2\na b c\n", r"merges.txt: line 2 is 'a b c'; expected a BPE merge, two tokens "
                                             r"separated by a space"),
    ("merges.txt", "#version: 0.2\nzzq zzr\n", r"merges.txt does not match .*vocab.json \(.*zzq.*\); expected the "
                                               r"BPE merges of that vocabulary"),
    ("merges.txt", "", r"merges.txt: holds no merges; expected BPE merges"),
])
def test_tokenizer_parse_errors_name_the_file(bundles, tmp_path, name, content, message):
    """Read without the manifest (ClipTokenizer on its own, or a bundle with no hash for the file)."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(bundles["folder-epsilon"] / "tokenizer", folder)
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        ClipTokenizer(folder / "vocab.json", folder / "merges.txt")
