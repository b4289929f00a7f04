"""The public catalog: `list_methods` is the CLI's method list, `model_stats` counts as the report counts.

Oracle: parameters and MACs of a two-layer MLP counted by hand (MACs = batch x sum of in x out), and a
pruned model's figures against its run's report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_LENET
from onnx import TensorProto, helper, numpy_helper

import onnxslim_prune
from onnxslim_prune import ModelError, UsageError, list_methods, model_stats, prune


def mlp() -> onnx.ModelProto:
    """x[N, 6] -> Gemm 6x5 -> Relu -> Gemm 5x3 (weights and biases: 6*5 + 5 + 5*3 + 3 = 53 parameters)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (6, 5)), ("b1", (5,)), ("w2", (5, 3)), ("b2", (3,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_model_stats_counts_parameters_and_macs_at_the_given_shapes() -> None:
    model = mlp()
    at_one = model_stats(model)  # the symbolic batch counts as 1
    assert (at_one.params, at_one.macs) == (53, 6 * 5 + 5 * 3)
    assert at_one.file_bytes == model.ByteSize()
    assert model_stats(model, {"x": (4, 6)}).macs == 4 * (6 * 5 + 5 * 3)


def test_model_stats_of_a_file_matches_the_report_of_a_run() -> None:
    result = prune(str(SAMPLE_LENET), "l1", 0.5, latency=False)
    before, after = model_stats(SAMPLE_LENET), model_stats(result.model)
    assert (before.params, before.macs) == (result.report.before.params, result.report.before.macs)
    assert (after.params, after.macs) == (result.report.after.params, result.report.after.macs)
    assert after.macs < before.macs


def test_model_stats_errors_are_the_library_s(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        model_stats(junk)
    with pytest.raises(UsageError):
        model_stats(mlp(), {"x": (4, 6, 1)})  # rank 3 for a rank-2 input


def test_list_methods_is_the_cli_s_list_with_the_data_needs() -> None:
    from click.testing import CliRunner

    from onnxslim_prune.cli import main

    methods = {m.name: m for m in list_methods()}
    assert not methods["l1"].needs_data and methods["thinet"].needs_data and methods["ldrf"].needs_data
    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert all(name in help_text for name in methods)
    assert {"MethodInfo", "list_methods", "ModelStats", "model_stats"} <= set(onnxslim_prune.__all__)
