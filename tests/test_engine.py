"""The calibration engine: staged passes give the values of a full run, run every node once, and spill exactly.

Oracle: the same tensors exposed on the whole model and streamed with `stream_tensors`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import models as M
from onnxslim_prune.calib import load_calibration, stream_tensors
from onnxslim_prune.calib.engine import StagedPasses
from onnxslim_prune.calib.specs import input_specs
from onnxslim_prune.errors import ModelError


def _calibration(model: onnx.ModelProto, tmp_path: Path, count: int = 10):  # type: ignore[no-untyped-def]
    spec = input_specs(model)[0]
    data = np.random.default_rng(0).standard_normal((count, *spec.sample_shape)).astype(np.float32)
    np.savez(tmp_path / "c.npz", **{spec.name: data})
    return load_calibration(tmp_path / "c.npz", input_specs(model))


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def _schedule(model: onnx.ModelProto) -> list[list[str]]:
    """Requests along the graph: a residual branch, the other operand, the output."""
    outs = [n.output[0] for n in model.graph.node]
    return [[outs[1]], [outs[3], outs[0]], [outs[-2], model.graph.output[0].name]]


@pytest.mark.parametrize("budget", [None, 0])  # 0: every frontier tensor is spilled to disk
def test_staged_passes_match_a_full_run(tmp_path: Path, budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _dynamic_batch(M.residual_projection())
    calib = _calibration(model, tmp_path)
    schedule = _schedule(model)
    runs: list[int] = []
    real_session = StagedPasses._session

    def counting(self, model, stage, reads, outputs, weights=None):  # type: ignore[no-untyped-def]
        runs.extend(stage)
        return real_session(self, model, stage, reads, outputs, weights)

    monkeypatch.setattr(StagedPasses, "_session", counting)
    passes = StagedPasses(model, calib, 4, schedule, budget=budget)
    names = [t for w in schedule for t in w]
    full = list(stream_tensors(model, calib, names, batch_size=4))
    for wanted in schedule:
        got = list(passes.advance(wanted))
        assert len(got) == 3  # 10 samples in batches of 4
        for batch, values in enumerate(got):
            for name in wanted:
                np.testing.assert_allclose(values[name], full[batch][name], rtol=1e-6, atol=1e-6)
    assert passes.store.spilled is (budget == 0)
    assert sorted(runs) == sorted(set(runs))  # no node ran in two stages
    folder = passes.store._folder
    passes.close()
    assert folder is None or not folder.exists()


def test_a_request_out_of_schedule_is_refused(tmp_path: Path) -> None:
    model = _dynamic_batch(M.residual_projection())
    passes = StagedPasses(model, _calibration(model, tmp_path), 4, _schedule(model))
    with pytest.raises(ModelError, match="not the scheduled one"):
        next(passes.advance(["nonsense"]))


def test_the_frontier_keeps_only_what_later_stages_need(tmp_path: Path) -> None:
    model = _dynamic_batch(M.conv_chain())
    outs = [n.output[0] for n in model.graph.node]
    passes = StagedPasses(model, _calibration(model, tmp_path), 5, [[outs[0]], [outs[-1]]])
    list(passes.advance([outs[0]]))
    assert passes._frontier == {outs[0]}  # the chain continues from the first conv's output
    list(passes.advance([outs[-1]]))
    assert passes._frontier == set() and passes.store._bytes == 0


@pytest.mark.parametrize("method", ["thinet", "ldrf"])
@pytest.mark.parametrize("build", [M.residual_projection, M.concat_branches, M.conv_bn])
def test_the_frontier_schedule_refits_exactly_as_the_prefix_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, build  # type: ignore[no-untyped-def]
) -> None:
    """Same samples, same rows, same maths: the refitted weights agree to 1e-5 whichever schedule ran."""
    from onnx import numpy_helper

    from onnxslim_prune import prune
    from onnxslim_prune.methods import reconstruct

    model = build()
    spec = input_specs(model)[0]
    data = np.random.default_rng(1).standard_normal((40, *spec.sample_shape)).astype(np.float32)
    np.savez(tmp_path / "c.npz", **{spec.name: data})
    results = {}
    for schedule in reconstruct.Schedule:
        monkeypatch.setattr(reconstruct, "DEFAULT_SCHEDULE", schedule)
        monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path / f"cache-{schedule.value}"))
        result = prune(model, method, 0.5, calib=tmp_path / "c.npz", batch_size=8, latency=False)
        results[schedule] = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    frontier, prefix = results[reconstruct.Schedule.FRONTIER], results[reconstruct.Schedule.PREFIX]
    assert frontier.keys() == prefix.keys()
    for name in frontier:
        np.testing.assert_allclose(frontier[name], prefix[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_calib_memory_spills_the_frontier_and_leaves_the_model_byte_identical(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--calib-memory 1K`` (every frontier batch goes to disk) writes the same bytes as the default; bad sizes are one-line errors."""
    import logging

    from click.testing import CliRunner

    from onnxslim_prune.calib.memory import parse_size, physical_memory
    from onnxslim_prune.cli import main

    model = M.residual_projection()
    onnx.save(model, tmp_path / "m.onnx")
    spec = input_specs(model)[0]
    np.savez(tmp_path / "c.npz", **{spec.name: np.random.default_rng(1).standard_normal((40, *spec.sample_shape)).astype(np.float32)})
    written = {}
    for name, extra in (("default", []), ("spilled", ["--calib-memory", "1K"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onnxslim_prune.calib.engine"):
            res = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"{name}.onnx"), "--method", "ldrf",
                                            "--calib", str(tmp_path / "c.npz"), "--batch-size", "8", "--no-latency", "--round-to", "1",
                                            *extra],
                                     env={"ONNXSLIM_PRUNE_CACHE": "off"})
        assert res.exit_code == 0, res.output
        written[name] = (tmp_path / f"{name}.onnx").read_bytes()
        spilled = "spilled to disk past the budget" in caplog.text
        assert spilled == (name == "spilled"), caplog.text
    assert written["default"] == written["spilled"]
    assert parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
    assert parse_size("50%") == physical_memory() // 2
    bad = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--calib-memory", "lots"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "--calib-memory 'lots'" in bad.output, bad.output


def test_a_spilled_frontier_never_reuses_a_file_name() -> None:
    """Dropping a spilled tensor and spilling another must leave every other spilled tensor intact (names never reused)."""
    from onnxslim_prune.calib.engine import FrontierStore

    store = FrontierStore(0, "test")
    a, b, c = (np.full((2, 3), v, dtype=np.float32) for v in (1.0, 2.0, 3.0))
    store.put(0, {"a": a, "b": b})
    store.drop({"a"})
    store.put(0, {"c": c})  # with names from the count of live files this overwrote b's file
    got = store.get(0, ["b", "c"])
    np.testing.assert_array_equal(got["b"], b)
    np.testing.assert_array_equal(got["c"], c)
    store.drop({"b"})
    np.testing.assert_array_equal(store.get(0, ["c"])["c"], c)
    store.close()


def test_a_weightless_export_with_its_weights_gives_the_values_of_the_full_model(tmp_path: Path) -> None:
    """What the staged refit hands the engine for a large model (`ir.export_weightless`): the same values."""
    from onnxslim_prune import ir

    model = _dynamic_batch(M.residual_projection())
    calib = _calibration(model, tmp_path)
    schedule = _schedule(model)
    graph = ir.to_graph(model)
    bare, weights = ir.export_weightless(graph, model, min_bytes=64)
    assert weights and all(w in {t.name for t in model.graph.initializer} for w in weights)
    assert not {t.name for t in bare.graph.initializer} & weights.keys()  # left out, not copied
    assert all(np.shares_memory(weights[t.name], t.values) for t in graph.tensors().values() if t.name in weights)
    full = StagedPasses(model, calib, 4, schedule)
    light = StagedPasses(model, calib, 4, schedule)
    for wanted in schedule:
        for a, b in zip(full.advance(wanted, model), light.advance(wanted, bare, weights), strict=True):
            for name in wanted:
                np.testing.assert_array_equal(a[name], b[name])
    full.close()
    light.close()
