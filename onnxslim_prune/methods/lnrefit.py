"""LayerNorm statistics after hidden-size pruning: refit each pruned LayerNormalization's gamma and beta.

A LayerNormalization over the hidden size ``C`` computes ``y_c = gamma_c (x_c - mu_C(x)) / sigma_C(x) +
beta_c``. With the hidden size pruned to the kept channels ``K`` the pruned model computes
``y'_c = gamma_c (x'_c - mu_K(x')) / sigma_K(x') + beta_c`` (`ops.norm.LayerNormRule`): statistics over
``K`` only, on its own (already pruned) residual stream ``x'``. This pass measures, on calibration
samples, per kept channel ``c`` the least-squares line from the pruned normalised value
``z'_c = (x'_c - mu_K) / sigma_K`` to the original model's LayerNorm output ``y_c``,

    y_c ~ a_c z'_c + b_c          gamma'_c = a_c,   beta'_c = b_c

and writes it as the node's new scale and bias (no new nodes). The LayerNorms are refitted one by one in
graph order, each on the pruned model with the earlier ones already refitted.

Exact: the line is the best per-channel affine map on the calibration samples (it recovers ``gamma``
and ``beta`` when nothing upstream changed and ``sigma_K / sigma_C`` and ``(mu_K - mu_C) / sigma_C`` are
the same for every token: e.g. removed channels that are zero and a constant variance share).
Approximate: in general that share varies from token to token, which no per-channel constant can
follow; the residual error of the line is what remains. A per-channel affine change after a LayerNorm
is also what the least-squares refit of its consumers absorbs (a linear layer reads it), so this
matters where the consumers are not refitted (a data-free selection); with the refit it changes only
the starting point.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError

log = logging.getLogger(__name__)


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str], batch: int) -> list[np.ndarray]:
    """The named tensors of `model` on `feeds`, `batch` samples at a time (a session with them exposed)."""
    from ..calib.collect import exposed_session

    session = exposed_session(model, names)
    count = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, count, batch):
        values = session.run(names, {k: v[start:start + batch] for k, v in feeds.items()})
        for store, value in zip(parts, values):
            store.append(np.asarray(value, dtype=np.float64))
    return [np.concatenate(p) for p in parts]


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    found = next((t for t in model.graph.initializer if t.name == name), None)
    if found is None:
        raise ModelError(f"LayerNorm refit: {name} is not an initializer")
    return found


def refit_layernorms(original: onnx.ModelProto, pruned: onnx.ModelProto, keep: Mapping[str, np.ndarray],
                     feeds: Mapping[str, np.ndarray], batch: int = 250) -> onnx.ModelProto:
    """`pruned` with the gamma and beta of each LayerNormalization named in `keep` refitted (module docstring).

    `keep` maps a LayerNormalization's node name (the same in both models) to the kept positions of
    its input's last axis; `feeds` are calibration inputs. Returns a new model; `pruned` is not changed.
    """
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    by_name = {n.name: n for n in original.graph.node}
    nodes = [n for n in out.graph.node if n.op_type == "LayerNormalization" and n.name in keep and n.name in by_name]
    if not nodes:
        return out
    names = [by_name[n.name].output[0] for n in nodes]
    targets = dict(zip([n.name for n in nodes], _run(original, feeds, names, batch)))
    for node in nodes:
        (x,) = _run(out, feeds, [node.input[0]], batch)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        x = x.reshape(-1, x.shape[-1])
        z = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + eps)
        y = targets[node.name].reshape(-1, targets[node.name].shape[-1])[:, keep[node.name]]
        zc, yc = z - z.mean(axis=0), y - y.mean(axis=0)
        a = (zc * yc).sum(axis=0) / np.maximum((zc * zc).sum(axis=0), 1e-12)
        b = y.mean(axis=0) - a * z.mean(axis=0)
        before = float(np.mean((y - (z * _values(out, node.input[1]) + _bias(out, node))) ** 2))
        after = float(np.mean((y - (z * a + b)) ** 2))
        log.info("LayerNorm refit %s: output mse %.4g -> %.4g", node.name, before, after)
        _set(out, node, 1, a)
        if len(node.input) > 2 and node.input[2]:
            _set(out, node, 2, b)
        else:
            name = f"{node.input[1]}__beta"
            out.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), name))
            node.input.append(name)
    return out


def _values(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_init(model, name)).astype(np.float64)


def _bias(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | float:
    return _values(model, node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0


def _set(model: onnx.ModelProto, node: onnx.NodeProto, index: int, values: np.ndarray) -> None:
    """Input `index` of `node` becomes `values`: in place, or a fresh copy when another input reads it too."""
    name = node.input[index]
    tensor = _init(model, name)
    array = values.astype(numpy_helper.to_array(tensor).dtype)
    uses = sum(1 for n in model.graph.node for i in n.input if i == name)
    if uses == 1 and name not in {o.name for o in model.graph.output}:
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        return
    fresh = f"{name}__{node.name or index}_refit"
    model.graph.initializer.append(numpy_helper.from_array(array, fresh))
    node.input[index] = fresh
