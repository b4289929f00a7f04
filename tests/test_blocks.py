"""Block (layer) pruning: identity-shortcut residual blocks only, lowest contribution first."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_prune import ir
from onnxslim_prune.judge import validate
from onnxslim_prune.api import prune
from onnxslim_prune.errors import UsageError
from onnxslim_prune.methods.blocks import find_blocks, prune_blocks
from onnxslim_prune.methods.base import Options

C = 8


def residual_model(zero_block: int | None = None, constant_block: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """Stem conv, 3 identity residual blocks, 1 projection block (stride 2), GAP, Gemm.

    `zero_block`: that identity block's last conv has zero weights and bias (f(x) == 0).
    `constant_block`: zero weights but a non-zero bias (f(x) is a per-channel constant).
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, name: str, k: int = 3, stride: int = 1, zero: bool = False, bias_only: bool = False) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * (1.0 / np.sqrt(cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        if zero or bias_only:
            w[:] = 0.0
        if zero:
            b[:] = 0.0
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}_out"], name=name, kernel_shape=[k, k],
            pads=[k // 2] * 4, strides=[stride, stride],
        ))
        return f"{name}_out"

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    def add(a: str, b: str, name: str) -> str:
        nodes.append(helper.make_node("Add", [a, b], [f"{name}_out"], name=name))
        return f"{name}_out"

    x = relu(conv("input", 3, C, "stem"), "stem_relu")
    for i in range(3):
        h = relu(conv(x, C, C, f"b{i}_c1"), f"b{i}_r1")
        h = conv(h, C, C, f"b{i}_c2", zero=zero_block == i, bias_only=constant_block == i)
        x = relu(add(x, h, f"b{i}_add"), f"b{i}_r2")
    h = relu(conv(x, C, 2 * C, "p_c1", stride=2), "p_r1")
    h = conv(h, 2 * C, 2 * C, "p_c2")
    short = conv(x, C, 2 * C, "p_short", k=1, stride=2)
    x = relu(add(short, h, "p_add"), "p_r2")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w = (rng.standard_normal((10, 2 * C)) * 0.3).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def ops(model: onnx.ModelProto, op: str) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == op]


def feeds(n: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def test_find_blocks_identity_shortcuts_only() -> None:
    model = residual_model()
    graph = ir.to_graph(model)
    blocks = find_blocks(graph, ir.static_shapes(model, {"input": (1, 3, 8, 8)}))
    assert [b.add for b in blocks] == ["b0_add", "b1_add", "b2_add"]
    assert blocks[1].shortcut == "b0_r2_out"
    assert set(blocks[1].nodes) == {"b1_c1", "b1_r1", "b1_c2"}
    assert all(b.macs > 0 for b in blocks)


def test_layer_removes_exactly_one_identity_block() -> None:
    model = residual_model()
    result = prune(model, "layer", 0.34)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert len(ops(model, "Add")) == 4
    assert len(ops(out, "Add")) + len(ops(out, "Identity")) == 4  # one Add rewired (to Identity or Add(x, mean))
    assert len(ops(model, "Conv")) == 10 and len(ops(out, "Conv")) == 8
    assert {"p_c1", "p_c2", "p_short", "p_add"} <= set(n.name for n in out.graph.node)
    removed = {f"b{i}" for i in range(3)} - {n.name.split("_")[0] for n in out.graph.node if n.op_type == "Conv"}
    assert len(removed) == 1
    assert any("removed 1 of 3" in note for note in result.report.notes)
    assert any("data-free" in note for note in result.report.notes)


@pytest.mark.parametrize("criterion", ["output", "norm"])
def test_zero_block_is_removed_first_and_outputs_stay(criterion: str) -> None:
    model = residual_model(zero_block=1)
    result = prune(model, "layer", 0.34, params={"block_criterion": criterion})
    names = {n.name for n in result.model.graph.node}
    assert "b1_c2" not in names and "b1_c1" not in names
    assert {"b0_c2", "b2_c2"} <= names
    node = next(n for n in result.model.graph.node if n.output[0] == "b1_add_out")
    assert node.op_type == "Identity"
    x = feeds()
    np.testing.assert_allclose(validate.run(result.model, x)[0], validate.run(model, x)[0], atol=1e-5)


def test_constant_branch_becomes_add_of_its_mean() -> None:
    model = residual_model(constant_block=2)
    result = prune(model, "layer", 0.34, calib="random")
    node = next(n for n in result.model.graph.node if n.output[0] == "b2_add_out")
    assert node.op_type == "Add"
    x = feeds()
    np.testing.assert_allclose(validate.run(result.model, x)[0], validate.run(model, x)[0], atol=1e-5)


def test_fraction_rounds_down_and_never_touches_projection() -> None:
    model = residual_model()
    kept, notes = prune_blocks(model, 0.3, None, {"input": (1, 3, 8, 8)}, Options())
    assert kept is model and "removes none" in notes[0]
    out, _ = prune_blocks(model, 1.0, None, {"input": (1, 3, 8, 8)}, Options())
    onnx.checker.check_model(out, full_check=True)
    assert sorted(ops(out, "Conv")) == ["p_c1", "p_c2", "p_short", "stem"]
    assert ops(out, "Add")[-1:] == ["p_add"]


def test_blocks_combine_with_a_channel_method() -> None:
    model = residual_model(zero_block=0)
    result = prune(model, "l1", 0.25, params={"blocks": 0.34})
    assert "b0_c1" not in {n.name for n in result.model.graph.node}
    assert result.report.after.params < result.report.before.params * 0.9


def test_deterministic_and_bad_fraction() -> None:
    model = residual_model()
    a = prune(model, "layer", 0.67, seed=3).model
    b = prune(model, "layer", 0.67, seed=3).model
    assert a.SerializeToString() == b.SerializeToString()
    with pytest.raises(UsageError):
        prune_blocks(model, 1.5, None, {"input": (1, 3, 8, 8)}, Options())
    with pytest.raises(UsageError):
        prune(model, "layer", 0.5, params={"block_criterion": "nope"})
