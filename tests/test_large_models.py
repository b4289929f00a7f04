"""Structure that keeps large models cheap: one parse of the input, no serialization just to measure
a size, one onnxruntime session per model, scoring without float64 copies of the weights.

These tests count calls and bytes on a small model whose weights dominate its file, never time.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import models as M
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxslim_prune import api, cli, ir
from onnxslim_prune.judge import validate
from onnxslim_prune.analysis import score
from onnxslim_prune.graph import io as graph_io


def weighty(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> conv(3->16) -> Relu -> conv(16->32) -> GAP -> fc(32->256) -> Relu -> fc(256->384): ~0.5 MB of weights."""
    b = M.Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, 16, "conv1"))
    h = b.op("GlobalAveragePool", [b.conv(h, 16, 32, "conv2")])
    h = b.relu(b.gemm(b.op("Flatten", [h], axis=1), 32, 256, "fc1"))
    return M.finish(b, b.gemm(h, 256, 384, "fc2"))


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "weighty.onnx"
    onnx.save(weighty(), path)
    return path


def weight_bytes(path: Path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


class Calls:
    """Counts calls of a protobuf method on ModelProto, with the byte size each one handled."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def heavy(self, weights: int) -> int:
        """Calls that handled at least half the weights: the model with its weights."""
        return sum(1 for s in self.sizes if s >= weights // 2)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Calls]]:
    """ParseFromString, SerializeToString and ByteSize of every ModelProto, counted with their sizes."""
    calls = {"parse": Calls(), "serialize": Calls(), "bytesize": Calls()}
    parse, serialize, bytesize = onnx.ModelProto.ParseFromString, onnx.ModelProto.SerializeToString, onnx.ModelProto.ByteSize

    def counting_parse(self: onnx.ModelProto, data: bytes) -> Any:
        calls["parse"].sizes.append(len(data))
        return parse(self, data)

    def counting_serialize(self: onnx.ModelProto, *args: Any, **kwargs: Any) -> bytes:
        out = serialize(self, *args, **kwargs)
        calls["serialize"].sizes.append(len(out))
        return out

    def counting_bytesize(self: onnx.ModelProto) -> int:
        size = bytesize(self)
        calls["bytesize"].sizes.append(size)
        return size

    monkeypatch.setattr(onnx.ModelProto, "ParseFromString", counting_parse)
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", counting_serialize)
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", counting_bytesize)
    yield calls


#: ModelProto.ByteSize calls in one run, all on weight-free messages (skeletons, `serialized_size`'s header)
MAX_BYTESIZE_CALLS = 4


@pytest.mark.parametrize("latency", [False, True])
def test_prune_parses_the_input_once_and_serializes_the_pruned_model_once(
    big_file: Path, counted: dict[str, Calls], latency: bool
) -> None:
    weights = weight_bytes(big_file)
    counted["parse"].sizes.clear()
    result = api.prune(big_file, "l1", 0.5, latency=latency)
    assert counted["parse"].heavy(weights // 8) == 1  # the load; shape inference parses weight-free skeletons only
    assert counted["serialize"].heavy(weights // 4) == 1  # the pruned model, once: checker, onnxruntime and file
    assert counted["bytesize"].heavy(weights // 4) == 0
    assert len(counted["bytesize"].sizes) <= MAX_BYTESIZE_CALLS
    assert result.serialized == result.model.SerializeToString()
    assert result.report.after.file_bytes == len(result.serialized)
    assert result.report.before.file_bytes == big_file.stat().st_size


def test_the_cli_reads_the_input_once_and_writes_the_verdicts_bytes(
    big_file: Path, tmp_path: Path, counted: dict[str, Calls]
) -> None:
    weights = weight_bytes(big_file)
    counted["parse"].sizes.clear()
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(cli.main, [str(big_file), "-o", str(out), "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    assert counted["parse"].heavy(weights // 8) == 1  # the path checks read no model
    assert counted["serialize"].heavy(weights // 4) == 1  # the written file is the verdict's bytes
    assert counted["bytesize"].heavy(weights // 4) == 0
    assert out.read_bytes() == onnx.load(str(out)).SerializeToString()


def test_each_model_gets_one_onnxruntime_session(big_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's session (built from its file) serves the reference, the pruned one, built from the bytes
    to be written, the verdict; the speed gates time single-threaded sessions of their own, built the same way
    (both at once, in either order) once the verdict's are freed (never from a re-serialized proto)."""
    built: list[str] = []
    real = validate.session

    def counting(model: onnx.ModelProto, threads: int = 0, **kwargs: Any) -> Any:
        built.append("path" if kwargs.get("path") else "bytes" if kwargs.get("serialized") else "proto")
        return real(model, threads, **kwargs)

    monkeypatch.setattr(validate, "session", counting)
    api.prune(big_file, "l1", 0.5, latency=True)
    assert built[:2] == ["path", "bytes"] and sorted(built[2:]) == ["bytes", "path"]
    built.clear()
    api.prune(big_file, "l1", 0.5, latency=False)
    assert built == ["path", "bytes"]


def test_sizes_are_counted_without_serializing() -> None:
    models = [weighty(), M.conv_chain(), M.residual_projection(), M.concat_branches(), M.channels_last_matmul()]
    typed = M.mlp()
    typed.graph.initializer[0].CopyFrom(onnx.helper.make_tensor(  # values in float_data, not raw_data
        typed.graph.initializer[0].name, onnx.TensorProto.FLOAT, list(typed.graph.initializer[0].dims),
        numpy_helper.to_array(typed.graph.initializer[0]).ravel().tolist()))
    models.append(typed)
    for model in models:
        assert ir.serialized_size(model) == model.ByteSize()
        assert ir.payload_bytes(model) <= model.ByteSize()
        assert ir.payload_bytes(model) == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert not ir.exceeds_proto_limit(model)


def test_the_proto_limit_check_uses_bytesize_only_near_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = weighty()
    payload = ir.payload_bytes(model)
    calls: list[int] = []
    real = onnx.ModelProto.ByteSize
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(graph_io, "SIZE_MARGIN", 1000)
    for limit, expected, asks in ((payload * 4, False, 0), (payload // 4, True, 0), (payload + 500, True, 1),
                                  (model.ByteSize() + 1, False, 1)):
        calls.clear()
        monkeypatch.setattr(graph_io, "PROTO_LIMIT", limit)
        assert ir.exceeds_proto_limit(model) is expected
        assert len(calls) == asks


def test_external_data_is_read_from_the_file_headers(tmp_path: Path) -> None:
    model = weighty()
    onnx.save(model, tmp_path / "plain.onnx")
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    found = ir.external_data_of(tmp_path / "ext.onnx")
    assert found.files == {(tmp_path / "ext.onnx.data").resolve()}
    assert found.initializers and ir.input_had_external_data(tmp_path / "ext.onnx")
    assert ir.external_data_files(tmp_path / "ext.onnx") == {(tmp_path / "ext.onnx.data").resolve()}
    assert ir.external_data_of(tmp_path / "plain.onnx") == ir.ExternalData(frozenset(), False)
    data = (tmp_path / "ext.onnx").read_bytes()
    for name, content in (("empty.onnx", b""), ("text.onnx", b"not a model\n"), ("half.onnx", data[: len(data) // 2])):
        (tmp_path / name).write_bytes(content)
        assert ir.external_data_of(tmp_path / name) == ir.ExternalData(frozenset(), False)


def test_a_constant_node_with_external_data_is_found(tmp_path: Path) -> None:
    """Tensor attributes (Constant nodes) keep external data too; the scan walks into nodes."""
    model = weighty()
    init = model.graph.initializer[0]
    del model.graph.initializer[0]
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [init.name], value=init))
    onnx.save(model, tmp_path / "c.onnx", save_as_external_data=True, location="c.bin", size_threshold=0,
              convert_attribute=True)
    found = ir.external_data_of(tmp_path / "c.onnx")
    assert (tmp_path / "c.bin").resolve() in found.files


def _traced_gemm(rows: int, cols: int) -> tuple[Any, Any, np.ndarray]:
    b = M.Builder(0)
    x = b.input("x", [1, cols])
    model = M.finish(b, b.gemm(b.relu(b.gemm(x, cols, rows, "fc1")), rows, 4, "fc2"))
    analysis = api.analyze(model)
    weight = ir.input_const(ir.node_by_name(analysis.graph)["fc1"], 1)
    assert weight is not None
    return analysis.trace, analysis.graph, weight


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_scoring_makes_no_float64_copy_of_a_weight(criterion: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trace, graph, weight = _traced_gemm(2048, 1024)  # 8 MiB of float32: a float64 copy would be 16 MiB
    monkeypatch.setattr(score, "BLOCK_BYTES", 2**20, raising=False)  # the default (16 MiB) would take this weight in one block
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        scores = score.score_groups(trace, graph, criterion)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < weight.nbytes / 4  # temporaries of one block, never a copy of the weight
    w64 = weight.astype(np.float64)
    want = np.abs(w64).sum(axis=1) if criterion == "l1" else np.sqrt((w64 * w64).sum(axis=1))
    (got,) = (s for s in scores.values() if s.size == weight.shape[0])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.array_equal(np.argsort(got, kind="stable"), np.argsort(want, kind="stable"))


def test_scores_of_other_dtypes_and_layouts_match_float64() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 70)).astype(np.float16)
    for f in (w, w.T, np.asarray(w, dtype=np.float32).T):
        f64 = np.asarray(f, dtype=np.float64)
        np.testing.assert_allclose(score._l1_rows(f), np.abs(f64).sum(axis=1), rtol=1e-12)
        np.testing.assert_allclose(score._l2_rows(f), np.sqrt((f64 * f64).sum(axis=1)), rtol=1e-12)


def test_initializers_read_from_the_file_equal_the_protos(big_file: Path) -> None:
    """`to_graph(source=path)` reads the initializers' raw data from the file, one copy: the same arrays."""
    model = onnx.load(str(big_file))
    from_file, from_proto = ir.to_graph(model, source=big_file), ir.to_graph(onnx.load(str(big_file)))
    a = {t.name: t.values for t in from_file.tensors().values() if isinstance(t, gs.Constant)}
    b = {t.name: t.values for t in from_proto.tensors().values() if isinstance(t, gs.Constant)}
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name])
        assert a[name].flags.writeable
    spans = ir.raw_data_in_file(big_file)
    assert spans is not None and set(spans.spans) == {t.name for t in model.graph.initializer}
    assert model == onnx.load(str(big_file))  # the input model is untouched


def test_a_model_written_an_initializer_at_a_time_has_the_bytes_of_one_serialization(tmp_path: Path) -> None:
    """`io.write_serialized` streams the model field by field; every field of a model and of its graph around the
    initializers (doc strings, metadata, value_info, sparse initializers, functions, opsets) lands where
    `SerializeToString` puts it."""
    import io as stdio

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w", (64, 300)), ("b", (300,)), ("empty", (0,)))]
    sparse = onnx.helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sv"),
                                            numpy_helper.from_array(np.array([1, 5], np.int64), "si"), [8])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm", doc_string="node doc"),
         onnx.helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 300])], inits,
        doc_string="graph doc", value_info=[onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 300])],
        sparse_initializer=[sparse])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], producer_name="p",
                                   doc_string="model doc", model_version=3)
    onnx.helper.set_model_props(model, {"k": "v"})
    graph.metadata_props.add(key="gk", value="gv")
    for sample in (model, M.residual_projection(), weighty(1)):
        out = stdio.BytesIO()
        length = graph_io.write_serialized(sample, out)
        assert out.getvalue() == sample.SerializeToString() and length == len(out.getvalue())
