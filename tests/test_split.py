"""The tiny UNet cut into 2 and 3 chunks: chained they are the whole graph; alone each is a whole model.

Measured on the tiny UNet (3.17 MB of weights): 2 chunks 1.580 / 1.591 MB, 3 chunks 1.035 / 1.056 /
1.081 MB; chained outputs are bit-identical to the whole graph's.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge.converters.quantize import quantize
from edge.converters.split import run_chunks, split_graph
from edge.metrics import psnr
from edge.sessions import open_session


def unet_feeds(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
            "timestep": np.array([999.0, 37.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


def session(path) -> ort.InferenceSession:
    return open_session(path)  # as the runtime opens it (int8 chunks are exact on every CPU)


@pytest.fixture(scope="module")
def unet(bundles):
    return bundles["folder-epsilon"] / "unet.onnx"


@pytest.fixture(scope="module")
def splits(unet, tmp_path_factory) -> dict[int, tuple]:
    out = {}
    for n in (2, 3):
        folder = tmp_path_factory.mktemp(f"split{n}")
        out[n] = folder, split_graph(unet, folder, n=n)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_chained_chunks_are_the_whole_graph(unet, splits, n):
    folder, chunks = splits[n]
    assert len(chunks) == n and [c["file"] for c in chunks] == [f"unet_chunk{i}.onnx" for i in range(n)]
    whole = session(unet)
    for h, w in [(4, 6), (8, 8)]:  # two latent sizes: the chunks' dynamic dims survived
        x = unet_feeds(h, w)
        got = run_chunks(chunks, x, folder)
        assert list(got) == ["noise_pred"] and got["noise_pred"].shape == (2, 4, h, w)
        assert psnr(whole.run(None, x)[0], got["noise_pred"]) >= 60


@pytest.mark.parametrize("n", [2, 3])
def test_chunks_are_balanced_by_weight(unet, splits, n):
    _, chunks = splits[n]
    total = sum(int(np.prod(t.dims)) * 4 for t in onnx.load(str(unet)).graph.initializer)
    sizes = [c["weight_bytes"] for c in chunks]
    assert max(sizes) <= 1.15 * total / n, sizes  # measured: within 2.5% of an even share
    assert total <= sum(sizes) <= 1.01 * total  # only small shared tensors are copied into two chunks


@pytest.mark.parametrize("n", [2, 3])
def test_each_chunk_runs_alone_and_reproduces_its_part(unet, splits, n):
    """Feed each chunk, in its own session, the whole graph's own values of its inputs."""
    folder, chunks = splits[n]
    x = unet_feeds(4, 6)
    crossing = {t["name"]: t["dtype"] for c in chunks for t in c["outputs"]}
    model = onnx.load(str(unet))
    del model.graph.output[:]  # the whole graph, answering with every tensor that crosses a cut
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(dtype)), None) for name, dtype in crossing.items())
    values = {**x, **dict(zip(crossing, session_from_model(model).run(list(crossing), x)))}
    for chunk in chunks:
        onnx.checker.check_model(str(folder / chunk["file"]))
        s = session(folder / chunk["file"])
        assert [i.name for i in s.get_inputs()] == [t["name"] for t in chunk["inputs"]]
        assert [o.name for o in s.get_outputs()] == [t["name"] for t in chunk["outputs"]]
        got = s.run(None, {t["name"]: values[t["name"]] for t in chunk["inputs"]})
        for t, g in zip(chunk["outputs"], got):
            assert g.dtype == np.dtype(t["dtype"])
            np.testing.assert_allclose(g, values[t["name"]], rtol=1e-4, atol=1e-5)


def session_from_model(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_interfaces_keep_dynamic_dims_and_pass_graph_inputs_through(splits):
    _, chunks = splits[3]
    first = {t["name"]: t for t in chunks[0]["inputs"]}
    assert first["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert first["timestep"]["dtype"] == "float32"
    assert any(t["name"] == "encoder_hidden_states" for t in chunks[-1]["inputs"])  # read again by the last
    for chunk in chunks:
        for t in chunk["inputs"] + chunk["outputs"]:
            if t["dtype"] == "float32" and len(t["shape"]) == 4:
                assert all(isinstance(d, str) for d in t["shape"][2:]), t  # spatial dims stay dynamic
    assert chunks[-1]["outputs"] == [{"name": "noise_pred", "dtype": "float32",
                                      "shape": ["batch", 4, "height", "width"]}]
    assert [c["graph_outputs"] for c in chunks] == [[], [], ["noise_pred"]]


def test_max_chunk_bytes_picks_the_fewest_chunks_that_fit(unet, tmp_path):
    total = sum(int(np.prod(t.dims)) * 4 for t in onnx.load(str(unet)).graph.initializer)
    chunks = split_graph(unet, tmp_path / "a", max_chunk_bytes=int(0.6 * total))
    assert len(chunks) == 2 and all(c["weight_bytes"] <= 0.6 * total for c in chunks)
    with pytest.raises(ValueError, match="max_chunk_bytes=1000 is below the .* largest single node"):
        split_graph(unet, tmp_path / "b", max_chunk_bytes=1000)


def test_quantized_and_external_data_graphs_split_too(unet, tmp_path):
    """The lead may quantize and then split, and a large graph's weights sit in .data files."""
    src = tmp_path / "unet.int8.onnx"
    quantize(unet, src, "int8", external_data_over=0)
    chunks = split_graph(src, tmp_path / "chunks", n=2, external_data_over=0)
    assert all(c["files"] == [c["file"], c["file"] + ".data"] for c in chunks)
    x = unet_feeds(8, 6)
    got = run_chunks(chunks, x, tmp_path / "chunks")["noise_pred"]
    assert psnr(session(src).run(None, x)[0], got) >= 60


def test_bad_arguments_are_named(unet, tmp_path):
    with pytest.raises(ValueError, match="give n or max_chunk_bytes, at, or at with one of them"):
        split_graph(unet, tmp_path, n=2, max_chunk_bytes=10**6)
    with pytest.raises(ValueError, match="give n or max_chunk_bytes, at, or at with one of them"):
        split_graph(unet, tmp_path)
    with pytest.raises(ValueError, match=r"n=2; unet.onnx can be cut into 3\.\.\d+ chunks"):  # 3 parts at least
        split_graph(unet, tmp_path, n=2, at=["/unet/down_blocks.1/", "/unet/up_blocks.1/"])
    with pytest.raises(ValueError, match="no computing node in scope '/unet/up_blocks.9/'"):
        split_graph(unet, tmp_path, at=["/unet/down_blocks.1/", "/unet/up_blocks.9/"])
    with pytest.raises(ValueError, match="after the previous cut"):  # scopes out of graph order
        split_graph(unet, tmp_path, at=["/unet/up_blocks.1/", "/unet/down_blocks.1/"])
    with pytest.raises(ValueError, match=r"n=0; unet.onnx can be cut into 1\.\.\d+ chunks"):
        split_graph(unet, tmp_path, n=0)


@pytest.mark.parametrize("how", [{"n": 6}, {"max_chunk_bytes": "third"}])
def test_scopes_with_more_chunks_cut_each_part(unet, tmp_path, how):
    """`at` with n or max_chunk_bytes: the scope cuts stay, the parts between them are cut further, each chunk
    says which part it belongs to, and the chain is the whole graph."""
    at = ["/unet/down_blocks.1/", "/unet/up_blocks.1/"]
    plain = split_graph(unet, tmp_path / "plain", at=at)
    if how.get("max_chunk_bytes") == "third":
        how = {"max_chunk_bytes": max(c["weight_bytes"] for c in plain) // 3 + 1}
    chunks = split_graph(unet, tmp_path / "more", at=at, **how)
    parts = [c["part"] for c in chunks]
    assert parts == sorted(parts) and set(parts) == {0, 1, 2} and len(chunks) > 3
    assert [c["part"] for c in plain] == [0, 1, 2]
    if "n" in how:
        assert len(chunks) == how["n"]
        heaviest = max(range(3), key=lambda p: plain[p]["weight_bytes"])
        assert parts.count(heaviest) >= 2  # the extra chunks go where the weights are
    else:
        assert all(c["weight_bytes"] <= how["max_chunk_bytes"] for c in chunks)
    # each part's chunks hold exactly the part's nodes, as the scope cut alone made it
    assert [sum(c["nodes"] for c in chunks if c["part"] == p) for p in range(3)] == [c["nodes"] for c in plain]
    x = unet_feeds(8, 6)
    whole = run_chunks(plain, x, tmp_path / "plain")["noise_pred"]
    assert psnr(whole, run_chunks(chunks, x, tmp_path / "more")["noise_pred"]) >= 100
