"""Small ONNX model builders, one per channel-coupling pattern, plus helpers to run them.

Every builder returns a float32, opset-17 `onnx.ModelProto` that passes
`onnx.checker.check_model(full_check=True)`. Weights are seeded numpy draws.

`dead` arguments name channels whose weights are set so that the channel is *dead*:
removing it leaves every consumer unchanged, and its l1 score is exactly zero (its
producing filters are all zero), so an l1 prune at the right ratio removes exactly
those channels and the outputs must not change. For a coupled group (residual Add,
SE Mul) every producer of the channel is zeroed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
FLOAT = TensorProto.FLOAT


class Builder:
    """Accumulates nodes and initializers; names are unique and stable."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.opsets: dict[str, int] = {"": OPSET}
        self.value_info: list[onnx.ValueInfoProto] = []  # kept: shapes inference cannot know (custom ops)
        self._count = 0

    # -- plumbing ---------------------------------------------------------------

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, FLOAT, list(shape)))
        return name

    def output(self, name: str, shape: Sequence[int | str] | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, FLOAT, None if shape is None else list(shape)))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: Sequence[int], scale: float | None = None) -> np.ndarray:
        """Seeded normal weights; the default scale 1/sqrt(fan_in) keeps activations O(1)."""
        if scale is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            scale = 1.0 / np.sqrt(max(fan_in, 1))
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}_out" if n_out == 1 else f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: Sequence[str], name: str | None = None, **attrs) -> str:
        return self.node(op, inputs, name or self.fresh(op.lower()), **attrs)[0]

    # -- layers -------------------------------------------------------------------

    def conv(
        self, x: str, cin: int, cout: int, name: str, k: int = 3, group: int = 1, bias: bool = True,
        dead: Iterable[int] = (), dead_in: Iterable[int] = (), stride: int = 1,
    ) -> str:
        """Conv with pads keeping the spatial size (stride 1). `dead` zeroes output filters (and bias)."""
        w = self.weight(f"{name}.w", (cout, cin // group, k, k))
        b = self.weight(f"{name}.b", (cout,), 0.1) if bias else None
        for c in dead:
            w[c] = 0.0
            if b is not None:
                b[c] = 0.0
        for c in dead_in:
            w[:, c] = 0.0
        ins = [x, self.const(f"{name}.w", w)]
        if b is not None:
            ins.append(self.const(f"{name}.b", b))
        pad = k // 2
        return self.node("Conv", ins, name, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride], group=group)[0]

    def gemm(self, x: str, fin: int, fout: int, name: str, trans_b: int = 1, dead: Iterable[int] = ()) -> str:
        w = self.weight(f"{name}.w", (fout, fin), 1.0 / np.sqrt(fin))
        if not trans_b:
            w = np.ascontiguousarray(w.T)
        b = self.weight(f"{name}.b", (fout,), 0.1)
        for c in dead:
            if trans_b:
                w[c] = 0.0
            else:
                w[:, c] = 0.0
            b[c] = 0.0
        ins = [x, self.const(f"{name}.w", w), self.const(f"{name}.b", b)]
        return self.node("Gemm", ins, name, transB=trans_b)[0]

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def build(self, name: str = "g") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits, value_info=self.value_info)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()], producer_name="tests"
        )
        model.ir_version = IR_VERSION
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        keep = {vi.name for vi in self.value_info}
        inferred = [vi for vi in model.graph.value_info if vi.name in keep]
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred)
        onnx.checker.check_model(model, full_check=True)
        return model


def _rename_output(b: Builder, tensor: str, name: str) -> str:
    """Point the producer of `tensor` at the graph output name `name`."""
    for node in b.nodes:
        for i, o in enumerate(node.output):
            if o == tensor:
                node.output[i] = name
        for i, o in enumerate(node.input):
            if o == tensor:
                node.input[i] = name
    return name


def finish(b: Builder, tensor: str, name: str = "y") -> onnx.ModelProto:
    b.output(_rename_output(b, tensor, name))
    return b.build()


# ----------------------------------------------------------------------------- patterns


def conv_chain(dead1: Iterable[int] = (), dead2: Iterable[int] = (), c1: int = 8, c2: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> conv1(3->c1) -> Relu -> conv2(c1->c2) -> GAP -> Flatten -> fc(c2->5)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, c1, "conv1", dead=dead1))
    h = b.conv(h, c1, c2, "conv2", dead=dead2)
    h = b.op("GlobalAveragePool", [h])
    h = b.op("Flatten", [h], axis=1)
    return finish(b, b.gemm(h, c2, 5, "fc"))


def residual_identity(dead_res: Iterable[int] = (), dead_mid: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """stem(3->8) -> Relu = t; t -> a(8->8) -> Relu -> b(8->8); Add(t, b) -> Relu -> head(8->4)."""
    dead_res, dead_mid = list(dead_res), list(dead_mid)
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    t = b.relu(b.conv(x, 3, 8, "stem", dead=dead_res))
    h = b.relu(b.conv(t, 8, 8, "conv_a", dead=dead_mid))
    h = b.conv(h, 8, 8, "conv_b", dead=dead_res)
    s = b.relu(b.op("Add", [t, h], name="add"))
    return finish(b, b.conv(s, 8, 4, "head", k=1))


def residual_projection(dead_res: Iterable[int] = (), dead_mid: Iterable[int] = (), dead_stem: Iterable[int] = (),
                        seed: int = 0) -> onnx.ModelProto:
    """stem(3->4)=t; t -> a(4->8) -> Relu -> b(8->8); t -> proj 1x1(4->8); Add -> Relu -> GAP -> Flatten -> fc."""
    dead_res = list(dead_res)
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    t = b.relu(b.conv(x, 3, 4, "stem", dead=dead_stem))
    h = b.relu(b.conv(t, 4, 8, "conv_a", dead=dead_mid))
    h = b.conv(h, 8, 8, "conv_b", dead=dead_res)
    p = b.conv(t, 4, 8, "proj", k=1, dead=dead_res)
    s = b.relu(b.op("Add", [h, p], name="add"))
    s = b.op("Flatten", [b.op("GlobalAveragePool", [s])], axis=1)
    return finish(b, b.gemm(s, 8, 5, "fc"))


def concat_branches(dead1: Iterable[int] = (), dead2: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """x -> c1(3->4) -> Relu; x -> c2(3->6) -> Relu; Concat(axis 1) -> c3(10->5)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 3, 4, "c1", dead=dead1))
    c = b.relu(b.conv(x, 3, 6, "c2", dead=dead2))
    h = b.op("Concat", [a, c], name="concat", axis=1)
    return finish(b, b.conv(h, 10, 5, "c3"))


def split_channels(dead: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu -> Split(axis 1, split=[4, 4] as an input) -> ca(4->3), cb(4->3) -> Add."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8, "c1", dead=dead))
    sizes = b.const("split_sizes", np.array([4, 4], dtype=np.int64))
    lo, hi = b.node("Split", [h, sizes], "split", n_out=2, axis=1)
    y = b.op("Add", [b.conv(lo, 4, 3, "ca"), b.conv(hi, 4, 3, "cb")], name="add")
    return finish(b, y)


def slice_channels(dead: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu = r; Slice(r, channels 2:6) -> ca(4->3); r -> cb(8->3); Add."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    r = b.relu(b.conv(x, 3, 8, "c1", dead=dead))
    starts = b.const("starts", np.array([2], dtype=np.int64))
    ends = b.const("ends", np.array([6], dtype=np.int64))
    axes = b.const("axes", np.array([1], dtype=np.int64))
    s = b.op("Slice", [r, starts, ends, axes], name="slice")
    y = b.op("Add", [b.conv(s, 4, 3, "ca"), b.conv(r, 8, 3, "cb")], name="add")
    return finish(b, y)


def depthwise(dead: Iterable[int] = (), multiplier: int = 1, c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """pw1(3->c, 1x1) -> Relu -> dw(group=c, c*multiplier out) -> Relu -> pw2(c*m->4, 1x1).

    A dead pw1 channel j also gets the depthwise biases of its outputs j*m .. j*m+m-1 zeroed.
    """
    dead = list(dead)
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, c, "pw1", k=1, dead=dead))
    dw_dead = [j * multiplier + i for j in dead for i in range(multiplier)]
    w = b.weight("dw.w", (c * multiplier, 1, 3, 3), 1 / 3)
    bias = b.weight("dw.b", (c * multiplier,), 0.1)
    bias[dw_dead] = 0.0
    h = b.node("Conv", [h, b.const("dw.w", w), b.const("dw.b", bias)], "dw", kernel_shape=[3, 3], pads=[1] * 4,
               group=c)[0]
    h = b.relu(h)
    return finish(b, b.conv(h, c * multiplier, 4, "pw2", k=1))


def grouped(group: int = 2, dead1: Iterable[int] = (), dead2: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu -> gconv(8->8, group) -> Relu -> c3(8->3)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8, "c1", dead=dead1))
    h = b.relu(b.conv(h, 8, 8, "gconv", group=group, dead=dead2))
    return finish(b, b.conv(h, 8, 3, "c3", k=1))


def concat_into_grouped(dead1: Iterable[int] = (), dead2: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->4) -> Relu; c2(3->4) -> Relu; Concat (8) -> gconv(8->8, group 2) -> Relu -> c3(8->3, 1x1).

    Each Concat operand is exactly one block of the grouped conv's input.
    """
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 3, 4, "c1", dead=dead1))
    c = b.relu(b.conv(x, 3, 4, "c2", dead=dead2))
    h = b.op("Concat", [a, c], name="concat", axis=1)
    h = b.relu(b.conv(h, 8, 8, "gconv", group=2))
    return finish(b, b.conv(h, 8, 3, "c3", k=1))


def flatten_gemm(dead: Iterable[int] = (), c: int = 4, hw: int = 4, seed: int = 0) -> onnx.ModelProto:
    """conv(3->c) on hw x hw -> Relu -> Flatten (C*H*W) -> fc(C*H*W -> 5)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, hw, hw])
    h = b.relu(b.conv(x, 3, c, "conv", dead=dead))
    h = b.op("Flatten", [h], name="flatten", axis=1)
    return finish(b, b.gemm(h, c * hw * hw, 5, "fc"))


def reshape_gemm(dead: Iterable[int] = (), c: int = 4, hw: int = 4, batch_dim: int = -1, seed: int = 0) -> onnx.ModelProto:
    """conv(3->c) -> Relu -> Reshape(constant [batch_dim, C*H*W]) -> fc(C*H*W -> 5, transB=0)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, hw, hw])
    h = b.relu(b.conv(x, 3, c, "conv", dead=dead))
    shape = b.const("target", np.array([batch_dim, c * hw * hw], dtype=np.int64))
    h = b.op("Reshape", [h, shape], name="reshape")
    return finish(b, b.gemm(h, c * hw * hw, 5, "fc", trans_b=0))


def se_block(dead: Iterable[int] = (), dead_squeeze: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu = t; GAP(t) -> sq(8->2) -> Relu -> ex(2->8) -> Sigmoid; Mul(t, s) -> c2(8->4)."""
    dead = list(dead)
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    t = b.relu(b.conv(x, 3, 8, "c1", dead=dead))
    s = b.op("GlobalAveragePool", [t], name="gap")
    s = b.relu(b.conv(s, 8, 2, "sq", k=1, dead=dead_squeeze))
    s = b.op("Sigmoid", [b.conv(s, 2, 8, "ex", k=1, dead=dead)], name="sigmoid")
    h = b.op("Mul", [t, s], name="scale")
    return finish(b, b.conv(h, 8, 4, "c2"))


def _bn(b: Builder, x: str, c: int, dead: Iterable[int] = (), dead_gamma: Iterable[int] = ()) -> str:
    """BatchNormalization(c) -> Relu. `dead`: mean 0, beta -1 (the Relu zeroes a zero input);
    `dead_gamma`: gamma 0 and beta -1 (the channel is dead whatever its input, and its `bn` score is 0)."""
    dead, dead_gamma = list(dead), list(dead_gamma)
    gamma = b.rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = b.weight("bn.beta", (c,), 0.1)
    mean = b.weight("bn.mean", (c,), 0.1)
    var = b.rng.uniform(0.5, 2.0, c).astype(np.float32)
    mean[dead] = 0.0
    beta[dead + dead_gamma] = -1.0
    gamma[dead_gamma] = 0.0
    ins = [x] + [b.const(f"bn.{n}", v) for n, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
    return b.relu(b.node("BatchNormalization", ins, "bn", epsilon=1e-5)[0])


def conv_bn(dead: Iterable[int] = (), dead_gamma: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """conv(3->8, no bias) -> BatchNormalization -> Relu -> c2(8->4).

    `dead`: zero filter, BN mean 0 and beta -1 (l1 score 0); `dead_gamma`: gamma 0, beta -1 (bn score 0).
    """
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.conv(x, 3, 8, "conv", bias=False, dead=dead)
    h = _bn(b, h, 8, dead, dead_gamma)
    return finish(b, b.conv(h, 8, 4, "c2"))


def concat_bn(dead_gamma: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """DenseNet-style: c1(3->4), c2(3->6) -> Concat(10) -> BatchNormalization -> Relu -> c3(10->5).

    `dead_gamma` are Concat positions (0-3: c1, 4-9: c2) whose gamma is 0 and beta -1.
    """
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 3, 4, "c1"))
    c = b.relu(b.conv(x, 3, 6, "c2"))
    h = b.op("Concat", [a, c], name="concat", axis=1)
    h = _bn(b, h, 10, dead_gamma=dead_gamma)
    return finish(b, b.conv(h, 10, 5, "c3"))


def channels_last_matmul(dead: Iterable[int] = (), dead_hidden: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """conv(3->8) -> Relu -> Transpose NHWC -> MatMul W1[8,6] -> Add bias[6] -> Relu -> MatMul W2[6,5]."""
    dead_hidden = list(dead_hidden)
    b = Builder(seed)
    x = b.input("x", [1, 3, 4, 4])
    h = b.relu(b.conv(x, 3, 8, "conv", dead=dead))
    h = b.op("Transpose", [h], name="to_nhwc", perm=[0, 2, 3, 1])
    w1 = b.weight("mm1.w", (8, 6), 1 / np.sqrt(8))
    w1[:, dead_hidden] = 0.0
    bias = b.weight("mm1.b", (6,), 0.1)
    bias[dead_hidden] = 0.0
    h = b.op("MatMul", [h, b.const("mm1.w", w1)], name="mm1")
    h = b.relu(b.op("Add", [h, b.const("mm1.b", bias)], name="mm1_bias"))
    return finish(b, b.op("MatMul", [h, b.const("mm2.w", b.weight("mm2.w", (6, 5), 1 / np.sqrt(6)))], name="mm2"))


def mlp(trans_b: int = 1, dead: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """x[1,16] -> fc1(16->12) -> Relu -> fc2(12->5), both with `trans_b`."""
    b = Builder(seed)
    x = b.input("x", [1, 16])
    h = b.relu(b.gemm(x, 16, 12, "fc1", trans_b=trans_b, dead=dead))
    return finish(b, b.gemm(h, 12, 5, "fc2", trans_b=trans_b))


def conv_transpose(dead1: Iterable[int] = (), dead2: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu -> ConvTranspose(8->6, k2 s2) -> Relu -> c3(6->4, 1x1)."""
    dead2 = list(dead2)
    b = Builder(seed)
    x = b.input("x", [1, 3, 4, 4])
    h = b.relu(b.conv(x, 3, 8, "c1", dead=dead1))
    w = b.weight("up.w", (8, 6, 2, 2), 1 / np.sqrt(8 * 4))
    bias = b.weight("up.b", (6,), 0.1)
    w[:, dead2] = 0.0
    bias[dead2] = 0.0
    h = b.node("ConvTranspose", [h, b.const("up.w", w), b.const("up.b", bias)], "up", kernel_shape=[2, 2],
               strides=[2, 2])[0]
    h = b.relu(h)
    return finish(b, b.conv(h, 6, 4, "c3", k=1))


def prelu(dead: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """conv(3->8) -> PRelu(slope [8,1,1]) -> c2(8->4)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.conv(x, 3, 8, "conv", dead=dead)
    slope = b.rng.uniform(0.05, 0.3, (8, 1, 1)).astype(np.float32)
    h = b.op("PRelu", [h, b.const("slope", slope)], name="prelu")
    return finish(b, b.conv(h, 8, 4, "c2"))


def scaled_residual(dead: Iterable[int] = (), seed: int = 0) -> onnx.ModelProto:
    """stem(3->8) -> Relu = t; t -> cb(8->8) -> Mul(scale [1,8,1,1]) -> Add(t) -> Add(shift [1,8,1,1]) -> Relu -> head."""
    dead = list(dead)
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    t = b.relu(b.conv(x, 3, 8, "stem", dead=dead))
    h = b.conv(t, 8, 8, "cb", dead=dead)
    scale = b.rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32)
    shift = b.weight("shift", (1, 8, 1, 1), 0.1)
    shift[0, dead] = 0.0
    h = b.op("Mul", [h, b.const("scale", scale)], name="layer_scale")
    h = b.op("Add", [t, h], name="add")
    h = b.relu(b.op("Add", [h, b.const("shift", shift)], name="shift_add"))
    return finish(b, b.conv(h, 8, 4, "head", k=1))


def unknown_op(dead2: Iterable[int] = (), custom: bool = False, seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> LRN (or a custom-domain op) -> c2(8->6) -> Relu -> c3(6->4)."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    h = b.conv(x, 3, 8, "c1")
    if custom:
        b.opsets["com.example"] = 1
        h = b.node("Mystery", [h], "mystery", domain="com.example")[0]
        b.value_info.append(helper.make_tensor_value_info(h, FLOAT, [1, 8, 8, 8]))
    else:
        h = b.node("LRN", [h], "lrn", size=3)[0]
    h = b.relu(b.conv(h, 8, 6, "c2", dead=dead2))
    model = finish(b, b.conv(h, 6, 4, "c3", k=1))
    return model


def intermediate_output(seed: int = 0) -> onnx.ModelProto:
    """c1(3->8) -> Relu -> c2(8->4); c1's output is also a graph output ("feat")."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    f = _rename_output(b, b.conv(x, 3, 8, "c1"), "feat")
    b.output(f)
    return finish(b, b.conv(b.relu(f), 8, 4, "c2"))


def single_conv(seed: int = 0) -> onnx.ModelProto:
    """Nothing prunable: one Conv whose output is the graph output."""
    b = Builder(seed)
    x = b.input("x", [1, 3, 8, 8])
    return finish(b, b.conv(x, 3, 4, "conv"))


def wide_chain(c: int = 12, seed: int = 0) -> onnx.ModelProto:
    """conv_chain with `c` channels in both hidden layers (for --round-to)."""
    return conv_chain(c1=c, c2=c, seed=seed)


# ----------------------------------------------------------------------------- running and inspecting


def inputs_for(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input (dynamic dims become `batch`)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds if feeds is not None else inputs_for(model, seed)))


def max_abs_diff(a: onnx.ModelProto, b: onnx.ModelProto, seeds: Iterable[int] = (0, 1)) -> float:
    """Largest |y_a - y_b| over all outputs on a few seeded inputs (shapes must match)."""
    worst = 0.0
    for seed in seeds:
        feeds = inputs_for(a, seed)
        for ya, yb in zip(run(a, feeds), run(b, feeds)):
            assert ya.shape == yb.shape, (ya.shape, yb.shape)
            worst = max(worst, float(np.max(np.abs(ya.astype(np.float64) - yb.astype(np.float64)))))
    return worst


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer by exact name, or the one a renamed copy of it got (`name__node`)."""
    found = {i.name: i for i in model.graph.initializer}
    if name in found:
        return numpy_helper.to_array(found[name])
    matches = [n for n in found if n.startswith(name + "__")]
    if len(matches) == 1:
        return numpy_helper.to_array(found[matches[0]])
    raise KeyError(f"no initializer {name!r}; have {sorted(found)}")


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def node_input(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray:
    """The constant value of `node_name`'s input `index` (an initializer or Constant node)."""
    n = node(model, node_name)
    tensor_name = n.input[index]
    for init in model.graph.initializer:
        if init.name == tensor_name:
            return numpy_helper.to_array(init)
    for c in model.graph.node:
        if c.op_type == "Constant" and c.output[0] == tensor_name:
            return numpy_helper.to_array(c.attribute[0].t)
    raise KeyError(f"{node_name} input {index} ({tensor_name}) is not a constant")


def attribute(model: onnx.ModelProto, node_name: str, attr: str):
    for a in node(model, node_name).attribute:
        if a.name == attr:
            return helper.get_attribute_value(a)
    return None


def output_signature(model: onnx.ModelProto) -> list[tuple[str, int, tuple]]:
    out = []
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        out.append((vi.name, tt.elem_type, dims))
    return out
