"""The runtime's own readers (no onnx, no safetensors package) against the libraries that wrote the files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from conftest import run_edge
from edge.weights_io import WeightsError, initializer_names, read_initializers, read_safetensors


def _same_as_onnx(graph):
    ours = read_initializers(graph)
    theirs = {i.name: numpy_helper.to_array(i, base_dir=str(graph.parent)) for i in onnx.load(str(graph)).graph.initializer}
    assert list(ours) == list(theirs) == initializer_names(graph)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype and np.array_equal(ours[name], expected), name


def test_initializers_inline_typed_and_in_external_data(models, tmp_path):
    # typed fields (float_data, int32_data for int8/uint8, int64_data) as onnx writes small tensors
    inits = [helper.make_tensor("f", TensorProto.FLOAT, [2], [1.5, -2.0]),
             helper.make_tensor("i8", TensorProto.INT8, [3], [-1, 0, 127]),
             helper.make_tensor("u8", TensorProto.UINT8, [], [128]),
             helper.make_tensor("i64", TensorProto.INT64, [2], [-5, 7]),
             numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "raw")]
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], initializer=inits)), str(tmp_path / "t.onnx"))
    _same_as_onnx(tmp_path / "t.onnx")
    # a bundle's split UNet: weights page-aligned in .data files beside each chunk
    out = tmp_path / "b"
    run_edge("convert", models["folder-epsilon"], "--split-unet", "2", "--no-memory-profile", "--no-tiled-vae",
             "-o", out)
    for chunk in sorted(out.glob("unet*.onnx")):
        assert (chunk.parent / (chunk.name + ".data")).is_file()
        _same_as_onnx(chunk)
    _same_as_onnx(out / "text_encoder.onnx")


def test_safetensors_reader(tmp_path):
    tensors = {"a": torch.randn(3, 4), "h": torch.randn(2, 2).half(), "b": torch.randn(5).bfloat16(),
               "n": torch.tensor([1, -2], dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    ours, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and set(ours) == set(tensors)
    for name, t in tensors.items():
        assert np.array_equal(ours[name], t.float().numpy() if t.is_floating_point() else t.numpy()), name
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00notjs")
    with pytest.raises(WeightsError, match="is not a .safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="are Python pickles"):
        read_safetensors(tmp_path / "x.ckpt")
