"""Weights page-aligned in a .data file (converters/aligned.py): onnxruntime maps them instead of copying.

A UNet chunk loaded for every call is only cheap if its weights are not copied while its session is created:
these tests check the offsets, that the graph computes what the inline graph computes, that onnxruntime really
maps the file (Linux's /proc/self/maps) and lets go of it with the session, and that split chunks are
written this way.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.converters.aligned import ALIGN, save_aligned
from edge.converters.split import split_graph
from edge.sessions import open_session


def conv_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Conv(w1, b1) -> Conv(w2) -> y: two weights above ALIGN bytes, a bias below it."""
    w = {"w1": rng.standard_normal((64, 32, 3, 3), dtype=np.float32),   # 73,728 bytes
         "b1": rng.standard_normal((64,), dtype=np.float32),            # 256 bytes: stays inline
         "w2": rng.standard_normal((96, 64, 3, 3), dtype=np.float32)}   # 221,184 bytes
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_large_weights_are_aligned_small_ones_inline_and_the_graph_computes_the_same(tmp_path):
    rng = np.random.default_rng(0)
    model, weights = conv_model(rng)
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    path = tmp_path / "g.onnx"
    assert save_aligned(model, path) == ["g.onnx", "g.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data", "inline.onnx"]  # no .partial
    saved = onnx.load(str(path), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in saved.graph.initializer}
    assert where["b1"] == {} and saved.graph.initializer[[t.name for t in saved.graph.initializer].index("b1")].raw_data
    for name in ("w1", "w2"):
        assert int(where[name]["offset"]) % ALIGN == 0 and int(where[name]["length"]) == weights[name].nbytes
        assert where[name]["location"] == "g.onnx.data"
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert all(np.array_equal(loaded[k], v) for k, v in weights.items())
    x = {"x": rng.standard_normal((1, 32, 8, 8), dtype=np.float32)}
    assert np.array_equal(open_session(path).run(None, x)[0], open_session(inline).run(None, x)[0])


def test_a_model_without_large_weights_writes_no_data_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "small",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "c")])
    (tmp_path / "s.onnx.data").write_bytes(b"stale")  # an older file of the same name does not survive
    assert save_aligned(helper.make_model(graph), tmp_path / "s.onnx") == ["s.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]


def test_a_tensor_still_pointing_at_an_external_file_is_refused(tmp_path):
    model, _ = conv_model(np.random.default_rng(0))
    save_aligned(model, tmp_path / "g.onnx")  # leaves model's large tensors pointing at g.onnx.data
    with pytest.raises(ValueError, match="initializer 'w1' still refers to an external file; load its data first"):
        save_aligned(model, tmp_path / "again.onnx")
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc/self/maps")
def test_onnxruntime_maps_the_aligned_weights_and_unmaps_them_with_the_session(tmp_path):
    model, _ = conv_model(np.random.default_rng(0))
    path = tmp_path / "g.onnx"
    save_aligned(model, path)

    def mapped() -> int:
        return sum(str(path) + ".data" in line for line in open("/proc/self/maps"))

    session = open_session(path)
    session.run(None, {"x": np.zeros((1, 32, 8, 8), np.float32)})
    assert mapped() >= 1  # the weights are read from the file's pages, not copied into the heap
    del session
    assert mapped() == 0


def test_split_chunks_carry_their_weights_aligned(bundles, tmp_path):
    chunks = split_graph(bundles["folder-epsilon"] / "unet.onnx", tmp_path, n=2)
    for c in chunks:
        assert c["files"] == [c["file"], c["file"] + ".data"]
        offsets = [int({e.key: e.value for e in t.external_data}["offset"])
                   for t in onnx.load(str(tmp_path / c["file"]), load_external_data=False).graph.initializer
                   if t.data_location == TensorProto.EXTERNAL]
        assert offsets and all(o % ALIGN == 0 for o in offsets)
