"""Coupling patterns: structure (groups, sliced shapes) AND numbers (dead-channel oracle).

The oracle: the channels a test names are *dead* (their producing filters and biases
are exactly zero, so their l1 score is zero and removing them changes no consumer).
An l1 prune at a ratio that removes exactly that many channels per group must then
remove exactly them, and the pruned model must compute the original's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_LENET, SHARED_MODELS, check_full

import models as M
import onnxslim_prune as op

TOL = 1e-5


def keep(n: int, dead) -> list[int]:
    dead = set(dead)
    return [i for i in range(n) if i not in dead]


def assert_same_function(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    check_full(pruned)
    assert M.output_signature(pruned) == M.output_signature(original)
    diff = M.max_abs_diff(original, pruned, seeds=(0, 1, 2))
    assert diff <= TOL, f"pruned outputs differ from the original by {diff:.3g}"


def prune_checked(model: onnx.ModelProto, ratio: float = 0.5, method: str = "l1", **kw) -> op.PruneResult:
    before = model.SerializeToString()
    result = op.prune(model, method, ratio, **kw)
    assert model.SerializeToString() == before, "prune() modified its input ModelProto"
    return result


# ----------------------------------------------------------------------------- 0. the builders themselves

BUILDERS = [
    M.conv_chain, M.residual_identity, M.residual_projection, M.concat_branches, M.split_channels,
    M.slice_channels, M.depthwise, lambda: M.depthwise(multiplier=2, c=4), M.grouped, lambda: M.grouped(4),
    M.concat_into_grouped, M.flatten_gemm, M.reshape_gemm, M.se_block, M.conv_bn, M.concat_bn,
    M.channels_last_matmul, lambda: M.mlp(0), lambda: M.mlp(1), M.conv_transpose, M.prelu, M.scaled_residual,
    M.unknown_op, M.intermediate_output, M.single_conv, M.wide_chain,
]


@pytest.mark.parametrize("build", BUILDERS)
def test_builders_make_valid_runnable_models(build) -> None:
    model = build()
    check_full(model)
    assert model.opset_import[0].version == 17
    outputs = M.run(model)
    assert all(o.dtype == np.float32 and np.all(np.isfinite(o)) for o in outputs)
    assert build().SerializeToString() == model.SerializeToString()  # seeded


def test_custom_domain_builder_passes_the_checker() -> None:
    check_full(M.unknown_op(custom=True))


# ----------------------------------------------------------------------------- 1. dead-channel oracle


@dataclass
class Case:
    build: Callable[[], onnx.ModelProto]
    shapes: dict[str, tuple[int, ...]]  # initializer -> expected shape after pruning
    ratio: float = 0.5
    check: Callable[[onnx.ModelProto, onnx.ModelProto], None] | None = None  # (original, pruned)
    attrs: dict[tuple[str, str], object] = field(default_factory=dict)  # (node, attribute) -> value


def _chain_values(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    k1, k2 = keep(8, [1, 3, 4, 6]), keep(8, [0, 2, 5, 7])
    w2 = M.initializer(orig, "conv2.w")[k2][:, k1]
    np.testing.assert_array_equal(M.initializer(pruned, "conv2.w"), w2)
    np.testing.assert_array_equal(M.initializer(pruned, "fc.w"), M.initializer(orig, "fc.w")[:, k2])


def _concat_values(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    cols = keep(4, [0, 2]) + [4 + j for j in keep(6, [1, 3, 4])]
    np.testing.assert_array_equal(M.initializer(pruned, "c3.w"), M.initializer(orig, "c3.w")[:, cols])


def _split_sizes(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    assert M.node_input(pruned, "split", 1).tolist() == [2, 2]


def _slice_bounds(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    # c1 keeps channels 0, 2, 5, 7; the slice 2:6 read 2..5 and now reads positions 1..2 (old 2 and 5)
    assert M.node_input(pruned, "slice", 1).tolist() == [1]
    assert M.node_input(pruned, "slice", 2).tolist() == [3]
    np.testing.assert_array_equal(M.initializer(pruned, "ca.w"), M.initializer(orig, "ca.w")[:, [0, 3]])


def _flatten_columns(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    # Flatten of [1, 4, 4, 4]: channel c owns the 16 columns c*16 .. c*16+15
    cols = [c * 16 + j for c in keep(4, [1, 2]) for j in range(16)]
    np.testing.assert_array_equal(M.initializer(pruned, "fc.w"), M.initializer(orig, "fc.w")[:, cols])


def _reshape_target(expected: list[int]) -> Callable[[onnx.ModelProto, onnx.ModelProto], None]:
    def check(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
        assert M.node_input(pruned, "reshape", 1).tolist() == expected
        rows = [c * 16 + j for c in keep(4, [0, 3]) for j in range(16)]
        np.testing.assert_array_equal(M.initializer(pruned, "fc.w"), M.initializer(orig, "fc.w")[rows])

    return check


def _bn_values(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    k = keep(8, [1, 2, 4, 7])
    for p in ("gamma", "beta", "mean", "var"):
        np.testing.assert_array_equal(M.initializer(pruned, f"bn.{p}"), M.initializer(orig, f"bn.{p}")[k])


def _prelu_values(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    np.testing.assert_array_equal(M.initializer(pruned, "slope"), M.initializer(orig, "slope")[keep(8, [1, 3, 5, 7])])


CASES: dict[str, Case] = {
    "conv_chain": Case(
        lambda: M.conv_chain(dead1=[1, 3, 4, 6], dead2=[0, 2, 5, 7]),
        {"conv1.w": (4, 3, 3, 3), "conv1.b": (4,), "conv2.w": (4, 4, 3, 3), "conv2.b": (4,), "fc.w": (5, 4), "fc.b": (5,)},
        check=_chain_values,
    ),
    "residual_identity": Case(
        lambda: M.residual_identity(dead_res=[0, 3, 5, 6], dead_mid=[1, 2, 4, 7]),
        {"stem.w": (4, 3, 3, 3), "conv_a.w": (4, 4, 3, 3), "conv_b.w": (4, 4, 3, 3), "conv_b.b": (4,),
         "head.w": (4, 4, 1, 1)},
    ),
    "residual_projection": Case(
        lambda: M.residual_projection(dead_res=[0, 3, 5, 6], dead_mid=[1, 2, 4, 7], dead_stem=[1, 2]),
        {"stem.w": (2, 3, 3, 3), "conv_a.w": (4, 2, 3, 3), "conv_b.w": (4, 4, 3, 3), "proj.w": (4, 2, 1, 1),
         "proj.b": (4,), "fc.w": (5, 4)},
    ),
    "concat": Case(
        lambda: M.concat_branches(dead1=[0, 2], dead2=[1, 3, 4]),
        {"c1.w": (2, 3, 3, 3), "c2.w": (3, 3, 3, 3), "c3.w": (5, 5, 3, 3)},
        check=_concat_values,
    ),
    "split": Case(
        lambda: M.split_channels(dead=[1, 2, 5, 6]),
        {"c1.w": (4, 3, 3, 3), "ca.w": (3, 2, 3, 3), "cb.w": (3, 2, 3, 3)},
        check=_split_sizes,
    ),
    "slice": Case(
        lambda: M.slice_channels(dead=[1, 3, 4, 6]),
        {"c1.w": (4, 3, 3, 3), "ca.w": (3, 2, 3, 3), "cb.w": (3, 4, 3, 3)},
        check=_slice_bounds,
    ),
    "depthwise": Case(
        lambda: M.depthwise(dead=[0, 2, 5, 7]),
        {"pw1.w": (4, 3, 1, 1), "dw.w": (4, 1, 3, 3), "dw.b": (4,), "pw2.w": (4, 4, 1, 1)},
        attrs={("dw", "group"): 4},
    ),
    "depthwise_multiplier2": Case(
        lambda: M.depthwise(dead=[1, 2], multiplier=2, c=4),
        {"pw1.w": (2, 3, 1, 1), "dw.w": (4, 1, 3, 3), "dw.b": (4,), "pw2.w": (4, 4, 1, 1)},
        attrs={("dw", "group"): 2},
    ),
    "grouped2": Case(
        lambda: M.grouped(2, dead1=[0, 2, 5, 7], dead2=[1, 3, 4, 6]),
        {"c1.w": (4, 3, 3, 3), "gconv.w": (4, 2, 3, 3), "gconv.b": (4,), "c3.w": (3, 4, 1, 1)},
        attrs={("gconv", "group"): 2},
    ),
    "grouped4": Case(
        lambda: M.grouped(4, dead1=[0, 3, 5, 6], dead2=[1, 2, 4, 7]),
        {"c1.w": (4, 3, 3, 3), "gconv.w": (4, 1, 3, 3), "gconv.b": (4,), "c3.w": (3, 4, 1, 1)},
        attrs={("gconv", "group"): 4},
    ),
    "flatten_gemm": Case(
        lambda: M.flatten_gemm(dead=[1, 2]),
        {"conv.w": (2, 3, 3, 3), "conv.b": (2,), "fc.w": (5, 32)},
        check=_flatten_columns,
    ),
    "reshape_gemm": Case(
        lambda: M.reshape_gemm(dead=[0, 3]),
        {"conv.w": (2, 3, 3, 3), "fc.w": (32, 5)},
        check=_reshape_target([-1, 32]),
    ),
    "reshape_gemm_explicit_batch": Case(
        lambda: M.reshape_gemm(dead=[0, 3], batch_dim=1),
        {"conv.w": (2, 3, 3, 3), "fc.w": (32, 5)},
        check=_reshape_target([1, 32]),
    ),
    "se_block": Case(
        lambda: M.se_block(dead=[0, 2, 5, 7], dead_squeeze=[1]),
        {"c1.w": (4, 3, 3, 3), "sq.w": (1, 4, 1, 1), "sq.b": (1,), "ex.w": (4, 1, 1, 1), "ex.b": (4,),
         "c2.w": (4, 4, 3, 3)},
    ),
    "batchnorm": Case(
        lambda: M.conv_bn(dead=[1, 2, 4, 7]),
        {"conv.w": (4, 3, 3, 3), "bn.gamma": (4,), "bn.beta": (4,), "bn.mean": (4,), "bn.var": (4,),
         "c2.w": (4, 4, 3, 3)},
        check=_bn_values,
    ),
    "channels_last_matmul": Case(
        lambda: M.channels_last_matmul(dead=[0, 1, 4, 6], dead_hidden=[1, 3, 5]),
        {"conv.w": (4, 3, 3, 3), "mm1.w": (4, 3), "mm1.b": (3,), "mm2.w": (3, 5)},
    ),
    "mlp_transB0": Case(
        lambda: M.mlp(0, dead=[0, 2, 4, 6, 8, 10]),
        {"fc1.w": (16, 6), "fc1.b": (6,), "fc2.w": (6, 5), "fc2.b": (5,)},
    ),
    "mlp_transB1": Case(
        lambda: M.mlp(1, dead=[0, 2, 4, 6, 8, 10]),
        {"fc1.w": (6, 16), "fc1.b": (6,), "fc2.w": (5, 6), "fc2.b": (5,)},
    ),
    "conv_transpose": Case(
        lambda: M.conv_transpose(dead1=[0, 1, 2, 3], dead2=[3, 4, 5]),
        {"c1.w": (4, 3, 3, 3), "up.w": (4, 3, 2, 2), "up.b": (3,), "c3.w": (4, 3, 1, 1)},
    ),
    "prelu": Case(
        lambda: M.prelu(dead=[1, 3, 5, 7]),
        {"conv.w": (4, 3, 3, 3), "slope": (4, 1, 1), "c2.w": (4, 4, 3, 3)},
        check=_prelu_values,
    ),
    "scaled_residual": Case(
        lambda: M.scaled_residual(dead=[1, 3, 5, 7]),
        {"stem.w": (4, 3, 3, 3), "cb.w": (4, 4, 3, 3), "scale": (1, 4, 1, 1), "shift": (1, 4, 1, 1),
         "head.w": (4, 4, 1, 1)},
    ),
    "unknown_op_lrn": Case(
        lambda: M.unknown_op(dead2=[0, 1, 2]),
        {"c1.w": (8, 3, 3, 3), "c1.b": (8,), "c2.w": (3, 8, 3, 3), "c3.w": (4, 3, 1, 1)},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dead_channels_are_removed_and_outputs_kept(name: str) -> None:
    case = CASES[name]
    original = case.build()
    result = prune_checked(original, case.ratio)
    pruned = result.model
    assert_same_function(original, pruned)
    for init, shape in case.shapes.items():
        got = M.initializer(pruned, init).shape
        assert got == shape, f"{init}: {M.initializer(original, init).shape} -> {got}, expected {shape}"
    for (node, attr), value in case.attrs.items():
        assert M.attribute(pruned, node, attr) == value, (node, attr)
    if case.check is not None:
        case.check(original, pruned)
    # the report agrees with the model
    assert result.report.after.params == sum(int(np.prod(i.dims)) for i in pruned.graph.initializer
                                             if i.data_type == onnx.TensorProto.FLOAT)
    assert result.report.after.params < result.report.before.params
    assert result.report.verdict.max_abs <= TOL


def test_dead_channels_inside_a_slice_keep_the_slice_alive() -> None:
    """All of the slice's channels dead: the plan must keep one of them (no empty tensor)."""
    original = M.slice_channels(dead=[2, 3, 4, 5])
    result = prune_checked(original, 0.5)
    assert_same_function(original, result.model)
    assert M.initializer(result.model, "ca.w").shape[1] >= 1
    assert M.initializer(result.model, "c1.w").shape[0] == M.initializer(result.model, "cb.w").shape[1]


def test_concat_into_grouped_conv_prunes_or_freezes_consistently() -> None:
    """Each Concat operand is one block of a group-2 conv: both operand groups are frozen (the
    equal-count-per-block rule would span two groups) and the model still prunes validly."""
    original = M.concat_into_grouped(dead1=[0, 2], dead2=[1, 3])
    result = prune_checked(original, 0.5, exclude=["c3"])  # c3 protects the gconv's own (live) outputs
    assert_same_function(original, result.model)
    w = M.initializer(result.model, "gconv.w")
    c1, c2 = (M.initializer(result.model, n).shape[0] for n in ("c1.w", "c2.w"))
    assert c1 == c2 == w.shape[1], "each block of the grouped conv must keep the same input count"
    frozen = [g for g in result.trace.groups if any(m.node in ("c1", "c2") and m.role == "out" for m in g.members)]
    assert frozen and all(g.is_frozen and any("several groups" in r for r in g.reasons) for g in frozen)


# ----------------------------------------------------------------------------- 2. grouping


def groups_with(trace, node: str, role: str | None = None) -> list:
    return [g for g in trace.groups if any(m.node == node and (role is None or m.role == role) for m in g.members)]


def one_group(trace, node: str, role: str):
    found = groups_with(trace, node, role)
    assert len(found) == 1, f"{node}:{role} in {len(found)} groups"
    return found[0]


def roles(group) -> set[tuple[str, str]]:
    return {(m.node, m.role) for m in group.members}


def classes_of(analysis, model: onnx.ModelProto, tensor: str) -> np.ndarray:
    got = analysis.trace.class_positions(tensor)
    assert got is not None, f"{tensor} is not traced"
    return got


@pytest.mark.parametrize("variant", ["identity", "projection"])
def test_residual_add_branches_form_one_group(variant: str) -> None:
    model = M.residual_identity() if variant == "identity" else M.residual_projection()
    trace = op.analyze(model).trace
    shortcut = "stem" if variant == "identity" else "proj"
    group = one_group(trace, "conv_b", "out")
    assert one_group(trace, shortcut, "out") is group
    assert {("conv_b", "out"), (shortcut, "out")} <= roles(group)
    assert group.size == 8 and group.prunable == 8
    assert set(group.spaces) and len(group.spaces) == 2
    assert one_group(trace, "conv_a", "out") is not group
    consumer = ("head", "in") if variant == "identity" else ("fc", "in")
    assert consumer in roles(group)


def test_concat_keeps_two_groups() -> None:
    analysis = op.analyze(M.concat_branches())
    trace = analysis.trace
    g1, g2 = one_group(trace, "c1", "out"), one_group(trace, "c2", "out")
    assert g1 is not g2
    assert (g1.size, g2.size) == (4, 6)
    assert ("concat", "concat") in roles(g1) and ("concat", "concat") in roles(g2)
    assert not g1.is_frozen and not g2.is_frozen
    # the Concat output holds c1's classes then c2's, in order
    cat = trace.class_positions("concat_out")
    assert [trace.class_group[int(c)] for c in cat] == [g1.index] * 4 + [g2.index] * 6


def test_concat_consumer_is_a_member_of_both_groups() -> None:
    trace = op.analyze(M.concat_branches()).trace
    g1, g2 = one_group(trace, "c1", "out"), one_group(trace, "c2", "out")
    assert ("c3", "in") in roles(g1)
    assert ("c3", "in") in roles(g2)
    assert {g.index for g in trace.group_of_node("c3")} >= {g1.index, g2.index}


def test_bn_criterion_removes_zero_gamma_channels() -> None:
    """Network Slimming oracle: gamma 0 and beta -1 before a Relu make a channel dead with bn score 0."""
    original = M.conv_bn(dead_gamma=[0, 3, 5, 6])
    result = prune_checked(original, 0.5, method="bn")
    assert_same_function(original, result.model)
    k = keep(8, [0, 3, 5, 6])
    np.testing.assert_array_equal(M.initializer(result.model, "conv.w"), M.initializer(original, "conv.w")[k])
    np.testing.assert_array_equal(M.initializer(result.model, "bn.gamma"), M.initializer(original, "bn.gamma")[k])


def test_bn_criterion_after_concat() -> None:
    original = M.concat_bn(dead_gamma=[1, 2, 4, 6, 9])
    result = prune_checked(original, 0.5, method="bn")
    assert_same_function(original, result.model)
    assert M.initializer(result.model, "bn.gamma").shape == (5,)
    assert M.initializer(result.model, "c3.w").shape == (5, 5, 3, 3)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_makes_no_new_group(multiplier: int) -> None:
    c = 8 if multiplier == 1 else 4
    model = M.depthwise(multiplier=multiplier, c=c)
    analysis = op.analyze(model)
    trace = analysis.trace
    dw = M.node(model, "dw")
    x, y = classes_of(analysis, model, dw.input[0]), classes_of(analysis, model, dw.output[0])
    np.testing.assert_array_equal(y, np.repeat(x, multiplier))
    assert not groups_with(trace, "dw", "out")
    group = one_group(trace, "pw1", "out")
    assert ("dw", "depthwise") in roles(group) and ("pw2", "in") in roles(group)
    assert group.size == c
    assert len(trace.groups) == 2  # pw1's and pw2's (the graph output)


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_reports_its_blocks(group: int) -> None:
    trace = op.analyze(M.grouped(group)).trace
    out = one_group(trace, "gconv", "out")
    inp = one_group(trace, "c1", "out")
    assert out.block == group and inp.block == group
    assert ("gconv", "in") in roles(inp)
    assert not out.is_frozen and not inp.is_frozen


def test_se_expand_conv_is_in_the_trunk_group() -> None:
    trace = op.analyze(M.se_block()).trace
    trunk = one_group(trace, "c1", "out")
    assert one_group(trace, "ex", "out") is trunk
    assert {("sq", "in"), ("c2", "in"), ("scale", "elementwise")} <= roles(trunk)
    squeeze = one_group(trace, "sq", "out")
    assert squeeze is not trunk and squeeze.size == 2
    assert ("ex", "in") in roles(squeeze)


def test_flatten_gemm_each_channel_owns_hw_columns() -> None:
    model = M.flatten_gemm(c=4, hw=4)
    analysis = op.analyze(model)
    flat = classes_of(analysis, model, M.node(model, "flatten").output[0])
    conv = classes_of(analysis, model, M.node(model, "conv").output[0])
    assert flat.shape == (64,)
    np.testing.assert_array_equal(flat, np.repeat(conv, 16))
    result = prune_checked(model, 0.5)
    assert M.initializer(result.model, "fc.w").shape == (5, 64 - 2 * 16)


def test_unknown_op_freezes_its_input_group() -> None:
    trace = op.analyze(M.unknown_op()).trace
    frozen = one_group(trace, "c1", "out")
    assert frozen.is_frozen
    assert any("LRN" in r for r in frozen.reasons), frozen.reasons
    assert not one_group(trace, "c2", "out").is_frozen


def test_custom_domain_op_freezes_its_input_group() -> None:
    model = M.unknown_op(custom=True)
    trace = op.analyze(model).trace
    frozen = one_group(trace, "c1", "out")
    assert frozen.is_frozen
    assert any("Mystery" in r for r in frozen.reasons), frozen.reasons


def test_graph_output_channels_are_frozen() -> None:
    trace = op.analyze(M.intermediate_output()).trace
    feat = one_group(trace, "c1", "out")
    assert feat.is_frozen and any("graph output feat" in r for r in feat.reasons)
    last = one_group(trace, "c2", "out")
    assert last.is_frozen and any("graph output y" in r for r in last.reasons)
    result = prune_checked(M.intermediate_output(), 0.5)
    assert M.output_signature(result.model) == M.output_signature(M.intermediate_output())
    assert any("nothing was pruned" in n for n in result.report.notes)


@pytest.mark.parametrize("name", ["conv_chain", "mlp_transB1", "concat", "residual_identity"])
def test_final_layer_feeding_the_output_is_frozen(name: str) -> None:
    model = CASES[name].build()
    trace = op.analyze(model).trace
    frozen = [g for g in trace.groups if any(r == "graph output y" for r in g.reasons)]
    assert len(frozen) == 1 and frozen[0].is_frozen


# ----------------------------------------------------------------------------- 3. determinism


@pytest.mark.parametrize("name", ["residual_projection", "split", "se_block", "grouped2", "slice", "concat"])
def test_same_prune_twice_is_byte_identical(name: str) -> None:
    model = CASES[name].build()
    first = op.prune(model, "l1", 0.5).model.SerializeToString()
    second = op.prune(model, "l1", 0.5).model.SerializeToString()
    assert first == second


def test_random_with_the_same_seed_is_byte_identical() -> None:
    model = M.wide_chain(12)
    a = op.prune(model, "random", 0.5, seed=3).model.SerializeToString()
    b = op.prune(model, "random", 0.5, seed=3).model.SerializeToString()
    assert a == b


# ----------------------------------------------------------------------------- 4. options


def _selection(result: op.PruneResult) -> tuple:
    return tuple(sorted((g.group, tuple(sorted(g.pruned))) for g in result.plan.groups))


def test_random_seeds_select_different_channels() -> None:
    model = M.wide_chain(12)
    sel = [_selection(op.prune(model, "random", 0.5, seed=s)) for s in range(3)]
    assert sel[0] != sel[1] and sel[1] != sel[2]
    for result_sel in sel:  # same counts, whatever the seed
        assert [len(p) for _, p in result_sel] == [6, 6]


@pytest.mark.parametrize("ratio, kept", [(0.5, 8), (0.7, 4), (0.9, 4)])
def test_round_to_keeps_multiples(ratio: float, kept: int) -> None:
    model = M.wide_chain(12)
    result = prune_checked(model, ratio, round_to=4)
    for row in result.report.groups:
        if row.prunable:
            assert row.kept % 4 == 0 and row.kept == kept, row
    assert M.initializer(result.model, "conv1.w").shape[0] == kept
    assert M.initializer(result.model, "conv2.w").shape[:2] == (kept, kept)
    check_full(result.model)


def test_round_to_survives_keeping_a_slice_alive() -> None:
    original = M.slice_channels(dead=[2, 3, 4, 5])
    result = prune_checked(original, 0.5, round_to=4)
    check_full(result.model)
    kept = M.initializer(result.model, "c1.w").shape[0]
    assert kept % 4 == 0, f"kept {kept} channels with --round-to 4"


def test_round_to_with_grouped_conv_blocks() -> None:
    result = prune_checked(M.grouped(2), 0.75, round_to=3)
    for row, group in zip(result.report.groups, result.trace.groups):
        if not group.is_frozen:
            assert row.kept % 3 == 0 and row.kept % group.block == 0, (row.size, row.kept, group.block)


def test_round_to_one_at_half_keeps_half() -> None:
    result = prune_checked(M.wide_chain(12), 0.5)
    assert M.initializer(result.model, "conv1.w").shape[0] == 6


@pytest.mark.parametrize("pattern", ["conv1", "conv[1]", "conv1*"])
def test_exclude_protects_a_node(pattern: str) -> None:
    model = M.conv_chain(dead1=[1, 3, 4, 6], dead2=[0, 2, 5, 7])
    analysis = op.analyze(model, exclude=[pattern])
    g = one_group(analysis.trace, "conv1", "out")
    assert g.is_frozen and any("excluded" in r for r in g.reasons), g.reasons
    result = prune_checked(model, 0.5, exclude=[pattern])
    assert M.initializer(result.model, "conv1.w").shape == (8, 3, 3, 3)
    assert M.initializer(result.model, "conv2.w").shape == (4, 8, 3, 3)
    assert_same_function(model, result.model)
    row = next(r for r in result.report.groups if "conv1:out" in r.members)
    assert row.kept == row.size == 8 and any("excluded" in r for r in row.frozen_reasons)


# ----------------------------------------------------------------------------- 5. real models


def test_lenet300_sample() -> None:
    original = onnx.load(str(SAMPLE_LENET))
    result = prune_checked(original, 0.5)
    pruned = result.model
    check_full(pruned)
    assert M.initializer(pruned, "f1.weight").shape == (150, 784)
    assert M.initializer(pruned, "f2.weight").shape == (50, 150)
    assert M.initializer(pruned, "f3.weight").shape == (10, 50)
    assert M.initializer(pruned, "f3.bias").shape == (10,)
    assert M.output_signature(pruned) == M.output_signature(original)
    assert [i.SerializeToString() for i in pruned.graph.input] == [i.SerializeToString() for i in original.graph.input]
    feeds = M.inputs_for(original, seed=0, batch=4)
    assert M.run(pruned, feeds)[0].shape == (4, 10)
    kept = sorted(row.kept for row in result.report.groups)
    assert kept == [10, 50, 150]


def test_resnet56_if_available() -> None:
    path = SHARED_MODELS / "fmnist_resnet56.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    original = onnx.load(str(path))
    result = op.prune(path, "l1", 0.3)
    check_full(result.model)
    assert M.output_signature(result.model) == M.output_signature(original)
    before, after = result.report.before.params, result.report.after.params
    weights = sum(int(np.prod(i.dims)) for i in original.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert abs(before - weights) <= 16  # plus a few scalar Constant nodes (input normalisation)
    assert after <= 0.7 * before, f"params {before} -> {after}"
    assert result.report.after.macs <= 0.7 * result.report.before.macs
    out = M.run(result.model, M.inputs_for(original, seed=0, batch=2))[0]
    assert np.all(np.isfinite(out)) and out.shape[0] == 2
