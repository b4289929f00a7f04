"""Sessions of in-memory models through a scratch external-data file (`ir.inference_session`)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune.pipeline import judging
from onnxslim_prune import ir
from onnxslim_prune.graph import runtime


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 96] -> MatMul 96x160 -> Add -> Relu -> MatMul 160x8 (weights of odd sizes, so offsets need padding)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (96, 160)), ("b1", (160,)), ("w2", (160, 8)), ("tiny", (3,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "tiny2"], ["y"])]
    inits.append(numpy_helper.from_array(np.arange(8, dtype=np.float32), "tiny2"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the scratch file is used where mapped files outlive names")
def test_a_scratch_file_session_gives_the_same_outputs_and_leaves_no_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    before = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(runtime, "SCRATCH_SESSION_BYTES", 1)  # every model of a few KB takes the scratch path
    written: list[Path] = []
    real_write = runtime._write_scratch

    def spy(bare: onnx.ModelProto, tensors: list[onnx.TensorProto], folder: Path) -> Path:
        path = real_write(bare, tensors, folder)
        written.append(folder)
        skeleton = onnx.load(str(path), load_external_data=False)
        external = {t.name for t in skeleton.graph.initializer if t.data_location == TensorProto.EXTERNAL}
        assert external == {"w1", "w2"}  # b1 (640 bytes) and the tiny ones stay in the model
        offsets = [int(dict((e.key, e.value) for e in t.external_data)["offset"]) for t in skeleton.graph.initializer
                   if t.name in external]
        assert all(o % 4096 == 0 for o in offsets)  # aligned: mapped where they lie
        return path

    monkeypatch.setattr(runtime, "_write_scratch", spy)
    sess = ir.inference_session(model, _options())
    assert written and not any(tmp_path.iterdir())  # the folder is gone once the session exists
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], expected)
    assert model.SerializeToString() == before
    # a weightless model with its initializers handed over (a cut or exposed model): the same values
    bare = ir.without_initializers(model)
    handed = ir.inference_session(bare, _options(), initializers=model.graph.initializer)
    np.testing.assert_array_equal(handed.run(None, {"x": x})[0], expected)
    assert len(bare.graph.initializer) == 0 and not any(tmp_path.iterdir())


def test_a_small_model_is_serialized_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp(2)
    monkeypatch.setattr(runtime, "_write_scratch", lambda *a: pytest.fail("a small model took the scratch path"))
    x = np.ones((2, 96), np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    bare = ir.without_initializers(model)
    got = ir.inference_session(bare, _options(), initializers=model.graph.initializer).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], expected[0])
    assert runtime.weights_out_of_line(model.graph.initializer) == (96 * 160 + 160 * 8) * 4


def test_a_file_view_holds_no_weights_and_runs_reads_and_sizes_as_the_loaded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune.graph import io

    model = _mlp(3)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    loaded = onnx.load(str(path))
    monkeypatch.setattr(io, "FILE_VIEW_BYTES", 64 << 20)
    assert io.file_view(loaded, path) is loaded  # under the threshold: the loaded model itself
    monkeypatch.setattr(io, "FILE_VIEW_BYTES", 0)
    view = io.file_view(loaded, path)
    viewed = {t.name for t in view.graph.initializer if io.viewed_span(t) is not None}
    assert viewed == {"w1", "w2"}  # float and at least 4 KB: b1 (640 bytes) and the tiny ones stay in the model
    assert not any(t.HasField("raw_data") for t in view.graph.initializer if t.name in viewed)
    assert ir.is_file_view(view) and not ir.uses_external_data(view)  # the user's file has no external data
    assert ir.payload_bytes(view) == ir.payload_bytes(loaded)
    assert ir.serialized_size(view) == ir.serialized_size(loaded) == path.stat().st_size
    for t, u in zip(view.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(ir.to_array(t), numpy_helper.to_array(u))
    assert ir.materialized(view).SerializeToString() == loaded.SerializeToString()
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)
    expected = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(ir.inference_session(view, _options()).run(None, {"x": x})[0], expected[0])
    graph = ir.to_graph(view)  # the graph reads the viewed weights from the file, and exports them inline
    out = ir.to_model(graph, like=view)
    assert not ir.is_file_view(out) and not ir.uses_external_data(out)
    np.testing.assert_array_equal(
        ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0],
        expected[0])


def _deep_mlp(seed: int) -> onnx.ModelProto:
    """x[N, 96] -> (MatMul, Relu) x 3 -> MatMul 96x8: a refit of several levels, whose stages read weights
    the refit rewrote (kept in its scratch file) beside weights it has not reached (in the input file)."""
    rng = np.random.default_rng(seed)
    shapes = [(96, 160), (160, 96), (96, 64), (64, 8)]
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), f"w{i}")
             for i, s in enumerate(shapes)]
    nodes, x = [], "x"
    for i in range(len(shapes)):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        x = f"m{i}"
        if i + 1 < len(shapes):
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make", [_mlp, _deep_mlp], ids=["mlp", "deep"])
def test_a_run_on_a_file_view_writes_the_bytes_of_a_run_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                make: Callable[[int], onnx.ModelProto]) -> None:
    from onnxslim_prune import api
    from onnxslim_prune.graph import io
    from onnxslim_prune.pipeline import prepare as prepare_mod

    path = tmp_path / "mlp.onnx"
    onnx.save(make(5), str(path))
    x = np.random.default_rng(6).standard_normal((40, 96)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    runs, views = [], []
    for threshold in (1 << 40, 0):  # never a view, always one
        monkeypatch.setattr(io, "FILE_VIEW_BYTES", threshold)
        result = api.prune(str(path), "thinet", 0.5, calib=str(tmp_path / "calib.npz"), latency=False)
        runs.append(ir.serialize(result.model))
        views.append(ir.is_file_view(prepare_mod.load_checked(str(path), str(path))))  # what the run held
    assert views == [False, True]  # the second run held the input as a view
    assert runs[0] == runs[1]
    assert onnx.load(str(path)).SerializeToString() == make(5).SerializeToString()  # the input is untouched


def test_a_scratch_file_holds_a_model_as_a_view_until_the_block_ends(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_prune.graph import io

    monkeypatch.setattr(io, "FILE_VIEW_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _mlp(7)
    with ir.ScratchFile() as scratch:
        held = scratch.hold(model)
        assert ir.is_file_view(held) and not any(t.HasField("raw_data") for t in held.graph.initializer
                                                 if t.name in {"w1", "w2"})
        assert ir.materialized(held).SerializeToString() == model.SerializeToString()  # written tensor by tensor
        (folder,) = list(tmp_path.iterdir())
        assert onnx.load(str(next(folder.iterdir()))).SerializeToString() == model.SerializeToString()
    assert not any(tmp_path.iterdir())  # removed with the block
    with pytest.raises(KeyboardInterrupt), ir.ScratchFile() as scratch:
        scratch.hold(model)
        raise KeyboardInterrupt
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sample", ["lenet", "residual"])
def test_the_lean_export_writes_graph_surgeons_bytes(sample: str) -> None:
    import models as M
    from onnxslim_prune.graph.shapes import export_onnx
    from tests.conftest import SAMPLE_LENET

    graph = ir.to_graph(onnx.load(str(SAMPLE_LENET)) if sample == "lenet" else M.residual_projection())
    for check in (True, False):
        assert export_onnx(graph, do_type_check=check).SerializeToString() == \
            gs.export_onnx(graph, do_type_check=check).SerializeToString()


def test_a_file_backed_graph_reads_weights_on_demand_and_keeps_new_ones_in_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`to_graph(lazy_views=True)` of a view: constants load when read and drop their arrays again when only read
    (`settle`); new values go to the scratch file; the export refers to both files and runs as the edited model."""
    from onnxslim_prune.graph import edit, filebacked, io

    monkeypatch.setattr(io, "FILE_VIEW_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, path = _mlp(8), tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    view = io.file_view(onnx.load(str(path)), path)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    graph = ir.to_graph(view, lazy_views=True)
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert {n for n, c in constants.items() if filebacked.is_lazy(c)} == {"w1", "w2"}  # b1 (640 bytes) is inline
    with ir.ScratchFile() as scratch:
        np.testing.assert_array_equal(constants["w1"].values, weights["w1"])  # read from the input file
        assert not filebacked.is_lazy(constants["w1"])
        assert ir.settle(graph, scratch) == 0 and filebacked.is_lazy(constants["w1"])  # only read: dropped again
        matmul = next(n for n in graph.nodes if constants["w2"] in n.inputs)
        edit.set_input_const(matmul, 1, weights["w2"] * 2)
        assert ir.settle(graph, scratch) == weights["w2"].nbytes  # the new values went to the scratch file
        assert filebacked.is_lazy(matmul.inputs[1])
        np.testing.assert_array_equal(matmul.inputs[1].values, weights["w2"] * 2)
        ir.settle(graph, scratch)
        exported = ir.to_model(graph, like=view)
        assert {io.viewed_span(t)[0] for t in exported.graph.initializer if io.viewed_span(t)} == {  # type: ignore[index]
            str(path), str(next((tmp_path / "tmp").iterdir()) / "kept.bin")}
        edited = onnx.ModelProto()
        edited.CopyFrom(model)
        next(t for t in edited.graph.initializer if t.name == "w2").CopyFrom(numpy_helper.from_array(weights["w2"] * 2, "w2"))
        x = np.random.default_rng(9).standard_normal((4, 96)).astype(np.float32)
        expected = ort.InferenceSession(edited.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        # views of two files in two folders: the session takes copies through its own scratch file
        got = ir.inference_session(exported, _options()).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, expected)
        materialized = ir.materialized(exported)
        assert not ir.is_file_view(materialized)
        np.testing.assert_array_equal(
            numpy_helper.to_array(next(t for t in materialized.graph.initializer if t.name == "w2")), weights["w2"] * 2)
    assert not any((tmp_path / "tmp").iterdir())  # the scratch folder went with the block
    assert onnx.load(str(path)).SerializeToString() == model.SerializeToString()  # the input is untouched


def test_a_large_pruned_model_is_checked_judged_and_timed_as_a_view_with_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `judging.KEEP_BYTES_UP_TO` the pruned model waits in a scratch file through validation, the verdict and the
    timing (its proto holds no weights): the model and the verdict are those of a run that held it in memory."""
    from onnxslim_prune import api
    from onnxslim_prune.graph import io

    path = tmp_path / "deep.onnx"
    onnx.save(_deep_mlp(3), str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(4).standard_normal((60, 96)).astype(np.float32))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    held: list[bool] = []
    real_verdict = judging.verdict_of

    def spy(original: onnx.ModelProto, pruned: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        held.append(ir.is_file_view(pruned))
        return real_verdict(original, pruned, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(judging, "verdict_of", spy)
    results = []
    for keep in (1 << 40, 0):  # bytes kept as always; every pruned model "large"
        monkeypatch.setattr(judging, "KEEP_BYTES_UP_TO", keep)
        monkeypatch.setattr(io, "FILE_VIEW_BYTES", 0 if keep == 0 else 1 << 40)
        results.append(api.prune(str(path), "thinet", 0.5, calib=str(tmp_path / "calib.npz"), latency=True))
    assert held == [False, True]
    first, second = results
    assert not ir.is_file_view(second.model)  # the caller gets the model whole
    assert ir.serialize(first.model) == ir.serialize(second.model)
    assert first.report.verdict.outputs == second.report.verdict.outputs
    assert first.report.after == second.report.after  # sizes (the file's bytes) as measured from the bytes
    assert second.report.latency is not None and second.serialized is None
    assert not any((tmp_path / "tmp").iterdir())  # the scratch copy went with the run
