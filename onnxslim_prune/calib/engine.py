"""The calibration engine: passes over calibration data through a model cut into stages.

A sequential refit (``methods.reconstruct``) needs, level by level, the inputs of that level's
layers in the PRUNED network (which depend on every layer refitted before) and their targets
in the ORIGINAL network. Running both networks from the graph input at every level costs
``2 x levels`` passes over the data (ResNet-56: 117 sessions, ~88 plain passes). The engine
keeps the *frontier* instead: for every calibration batch, the tensors at the current cut
that nodes not yet run (or later requests) still need. Each `StagedPasses.advance` runs only
the nodes between the previous cut and the tensors asked for, reading the frontier and
adding to it, so every node of a network runs once over the data::

    stage k = nodes needed for wanted[k] that no earlier stage ran (constant subgraphs: always)
    frontier after k = tensors computed so far that an unrun node or a later wanted[j] needs

The caller passes the whole `schedule` of requests up front, so nothing a later request needs
is dropped. A network whose weights change between stages (the pruned one, refitted level by
level) passes its current model to `advance`: only the nodes of the new stage are taken
from it, and the layers it refits are never run before their refit (their level comes after
every level they feed). A residual operand (``minus``) can be computed from a layer refitted at a
later level: the caller names every such layer in ``changes`` (node -> the request after which it
changes), and a node whose value a later refit changes is rerun after it, never kept from before.

Memory: the frontier of N samples is held in memory while it fits ``budget`` bytes (default
`calib.memory.calibration_budget`: the run's ``--calib-memory``, `calib.memory`; the refit gives each of its two
networks what `calib.memory.frontier_budget` leaves), else each
batch's tensors are spilled to ``.npy`` files in a temporary folder that is removed when the
passes end (also on Ctrl-C); the log says which. Batches are the calibration set's batches
(``batch_size``, or the model's static batch with the remainder left out), read again only
where a stage consumes a graph input; onnxruntime runs a batch a few samples at a time when
the activations of the stage (every tensor its nodes compute, `StagedPasses.stage_bytes`: the first
stages of a CNN hold the largest) would pass ``1 / RUN_SHARE`` of the budget (`collect.run_chunked`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .. import ir
from ..errors import CalibrationError, ModelError
from .memory import calibration_budget
from .collect import _batch_plan  # noqa: PLC2701 - the same batching as every other pass
from .collect import names_read, run_chunked
from .collect import subgraph_inputs as _subgraph_inputs
from .memory import RUN_SHARE, tensor_bytes
from .sources import CalibrationSet

log = logging.getLogger(__name__)

class FrontierStore:
    """Per-batch tensors, in memory up to ``budget`` bytes, beyond it in ``.npy`` files."""

    def __init__(self, budget: int, label: str) -> None:
        self.budget = budget
        self.label = label
        self._memory: dict[tuple[str, int], np.ndarray] = {}
        self._files: dict[tuple[str, int], Path] = {}
        self._bytes = 0
        self._folder: Path | None = None
        self._written = 0  # files ever written: names are never reused, so dropping one never deletes another's
        self.peak_bytes = 0

    @property
    def spilled(self) -> bool:
        return self._folder is not None

    def put(self, batch: int, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            key = (name, batch)
            self.drop_key(key)
            if self._bytes + value.nbytes <= self.budget:
                self._memory[key] = value
                self._bytes += value.nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                continue
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="onnxslim-frontier-"))
                log.info("calibration frontier (%s): over its %d MB budget, spilling to %s",
                         self.label, self.budget >> 20, self._folder)
            path = self._folder / f"{self._written}-{batch}.npy"
            self._written += 1
            np.save(path, value, allow_pickle=False)
            self._files[key] = path

    def get(self, batch: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            key = (name, batch)
            if key in self._memory:
                out[name] = self._memory[key]
            elif key in self._files:
                out[name] = np.load(self._files[key], allow_pickle=False)
            else:
                raise ModelError(f"calibration frontier ({self.label}): tensor {name!r} of batch {batch} was not kept")
        return out

    def drop(self, names: set[str]) -> None:
        for key in [k for k in (*self._memory, *self._files) if k[0] in names]:
            self.drop_key(key)

    def drop_key(self, key: tuple[str, int]) -> None:
        value = self._memory.pop(key, None)
        if value is not None:
            self._bytes -= value.nbytes
        path = self._files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self._bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def sample_inputs(calib: CalibrationSet) -> dict[str, tuple[int, ...]]:
    """The calibration's input shapes at one sample, as `tensor_bytes` takes them."""
    return {name: (1, *shape) for name, shape in calib.sample_shapes.items()}


class StagedPasses:
    """One network over one calibration set, advanced stage by stage (see the module docstring)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        calib: CalibrationSet,
        batch_size: int,
        schedule: Sequence[Sequence[str]],
        *,
        budget: int | None = None,
        label: str = "network",
        changes: Mapping[str, int] | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        """`changes`: node name -> the request after which its weights change (a refit); such a node and
        everything computed from it are rerun after the change, never kept from before it. `sizes`: the model's
        `tensor_bytes` at the calibration's sample shapes, when the caller has them already."""
        self.calib = calib
        self.schedule = [list(dict.fromkeys(w)) for w in schedule]
        self.label = label
        self.size, self.drop_last = _batch_plan(model, calib, batch_size)
        self.batches = calib.num_batches(self.size, drop_last=self.drop_last)
        self.store = FrontierStore(calibration_budget() if budget is None else budget, label)
        # bytes of one sample of each activation: a stage runs as many samples at once as its activations fit
        # 1 / RUN_SHARE of the budget (`_chunk`); a static batch is never split (its graph may fold it into shapes)
        self._sizes = None if ir.static_batch(model) is not None else (
            dict(sizes) if sizes is not None else tensor_bytes(model, sample_inputs(calib)))
        self._step = 0
        graph = model.graph
        self._initializers = {t.name for t in graph.initializer}
        self._graph_inputs = [i.name for i in graph.input if i.name not in self._initializers]
        self._inputs = set(self._graph_inputs)
        nodes = list(graph.node)
        self._reads = [[t for t in (*n.input, *sorted(_subgraph_inputs(n))) if t] for n in nodes]
        self._producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
        self._consumers: dict[str, list[int]] = {}
        for i, reads in enumerate(self._reads):
            for t in reads:
                self._consumers.setdefault(t, []).append(i)
        # a node is dynamic when a graph input reaches it; the others are constants, rerun wherever needed
        self._dynamic = [False] * len(nodes)
        for i, reads in enumerate(self._reads):
            self._dynamic[i] = any(t in self._inputs or (t in self._producer and self._dynamic[self._producer[t]])
                                   for t in reads)
        self._outputs_of = [[t for t in n.output if t] for n in nodes]
        # the last request after which a node's value changes: its own refit or any ancestor's
        self._last_change = [-1] * len(nodes)
        for i, (node, reads) in enumerate(zip(nodes, self._reads)):
            own = (changes or {}).get(node.name, -1)
            self._last_change[i] = max([own] + [self._last_change[self._producer[t]] for t in reads if t in self._producer])
        # stages are taken from later versions of the model by node name: a refit may reorder or add inputs
        names = [n.name for n in nodes]
        self._names = names if len(set(names)) == len(nodes) and all(names) else None
        self._done: set[int] = set()
        self._frontier: set[str] = set()
        self._stale: set[str] = set()
        self._types = _elem_types(model)
        self._model = model

    def rebatch(self, batch_size: int) -> None:
        """Run batches of `batch_size` samples instead (before the first request; a static batch stays)."""
        if self._step:
            raise ModelError(f"calibration engine ({self.label}): rebatched after its first request")
        self.size, self.drop_last = _batch_plan(self._model, self.calib, batch_size)
        self.batches = self.calib.num_batches(self.size, drop_last=self.drop_last)

    # -- the stages

    def advance(self, wanted: Sequence[str], model: onnx.ModelProto | None = None,
                weights: Mapping[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: value}`` of `wanted` for every batch, running the next stage (`model`: its current weights;
        `weights`: those of its large weights it leaves out, by name, `ir.export_weightless`)."""
        wanted = list(dict.fromkeys(wanted))
        if self._step >= len(self.schedule) or wanted != self.schedule[self._step]:
            raise ModelError(f"calibration engine ({self.label}): request {self._step} is not the scheduled one")
        stage = self._stage_nodes(wanted)
        produced = {t for i in stage for t in self._outputs_of[i]}
        # final: a node whose value no later refit changes; constants are rerun where needed, never kept
        final = [i for i in stage if self._dynamic[i] and self._last_change[i] < self._step]
        self._done.update(final)
        later = {t for w in self.schedule[self._step + 1 :] for t in w}
        varying = {t for i in final for t in self._outputs_of[i]}
        keep = {t for t in self._frontier | varying if self._still_needed(t, later)}
        fresh = sorted(t for t in keep if t in produced)
        computed = list(dict.fromkeys([t for t in wanted if t in produced] + fresh))
        reads = [t for t in dict.fromkeys(r for i in stage for r in self._reads[i]) if t not in produced and t not in self._initializers]
        from_frontier = [t for t in reads if t not in self._inputs]
        direct = [t for t in wanted if t not in produced]
        from_frontier += [t for t in direct if t not in self._inputs and t not in from_frontier]
        needs_input = any(t in self._inputs for t in (*reads, *direct))
        session = self._session(model or self._model, stage, reads, computed, weights) if computed else None
        chunk = self._chunk(stage)
        self._step += 1
        self._release()
        # the bookkeeping is done before the first batch: a consumer that zips two streams stops this
        # generator without finishing it; tensors no longer needed are released at the next request
        self._stale = self._frontier - keep
        self._frontier = keep
        for batch, feed in enumerate(self._feeds(needs_input)):
            values = self.store.get(batch, from_frontier)
            values.update({k: v for k, v in feed.items() if k in reads or k in direct})
            if session is not None:
                try:
                    samples = min(self.size, self.calib.num_samples - batch * self.size)
                    outputs = run_chunked(session, computed, {t: values[t] for t in reads}, chunk, samples)
                except Exception as exc:  # onnxruntime raises its own types
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CalibrationError(f"onnxruntime failed on a batch of {self.calib.source}: {first}") from None
                values.update(zip(computed, outputs))
            self.store.put(batch, {t: values[t] for t in fresh})
            out = {t: values[t] for t in wanted}
            del values, feed  # the consumer's dict is the only reference left: it frees the batch when done
            yield out
            del out
        self._release()

    def close(self) -> None:
        store = self.store
        log.info("calibration frontier (%s): %s, at most %d MB held of a %d MB budget", self.label,
                 "spilled to disk past the budget" if store.spilled else "held in memory", store.peak_bytes >> 20,
                 store.budget >> 20)
        store.close()

    def _release(self) -> None:
        if self._stale:
            self.store.drop(self._stale)
            self._stale = set()

    # -- helpers

    def _still_needed(self, tensor: str, later: set[str]) -> bool:
        if tensor in later:
            return True
        return any(c not in self._done and self._dynamic[c] for c in self._consumers.get(tensor, ()))

    def sample_bytes(self, names: Sequence[str]) -> int:
        """Bytes of one sample of the tensors `names` (0 for those of unknown size)."""
        return 0 if self._sizes is None else sum(self._sizes.get(t, 0) for t in dict.fromkeys(names))

    def stage_bytes(self, stage: Sequence[int]) -> int:
        """Bytes of one sample of every tensor the `stage` computes (dynamic nodes; 0 when sizes are unknown).

        An upper bound of what onnxruntime holds for it (its planner reuses buffers): the outputs
        it returns, the tensors it keeps between nodes and the last node's inputs and outputs.
        """
        if self._sizes is None:
            return 0
        return sum(self._sizes.get(t, 0) for i in stage if self._dynamic[i] for t in self._outputs_of[i])

    def _chunk(self, stage: Sequence[int]) -> int | None:
        """Samples one run of `stage` takes: its activations within 1 / RUN_SHARE of the budget (None: whole batches)."""
        per = self.stage_bytes(stage)
        return None if per == 0 else max(1, (calibration_budget() // RUN_SHARE) // per)

    def _stage_nodes(self, wanted: Sequence[str]) -> list[int]:
        stage: set[int] = set()
        stack = list(wanted)
        while stack:
            t = stack.pop()
            if t in self._inputs or t in self._initializers or t in self._frontier:
                continue
            p = self._producer.get(t)
            if p is None:
                raise ModelError(f"calibration engine ({self.label}): no node computes {t!r}")
            if p in stage:
                continue
            if p in self._done:
                raise ModelError(f"calibration engine ({self.label}): {t!r} was computed in an earlier stage and not kept")
            stage.add(p)
            stack.extend(self._reads[p])
        return sorted(stage)

    def _feeds(self, needs_input: bool) -> Iterator[dict[str, np.ndarray]]:
        if needs_input:
            yield from self.calib.iter_batches(self.size, drop_last=self.drop_last)
        else:
            for _ in range(self.batches):
                yield {}

    def _session(self, model: onnx.ModelProto, stage: Sequence[int], reads: Sequence[str],
                 outputs: Sequence[str], weights: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
        sub = onnx.ModelProto()
        sub.ir_version = model.ir_version
        sub.opset_import.extend(model.opset_import)
        if self._names is None:  # unnamed nodes: only the model the passes were built on can be cut
            if model is not self._model:
                raise ModelError(f"calibration engine ({self.label}): a new model version needs uniquely named nodes")
            nodes = [model.graph.node[i] for i in stage]
        else:
            by_name = {n.name: n for n in model.graph.node}
            try:
                nodes = [by_name[self._names[i]] for i in stage]
            except KeyError as exc:
                raise ModelError(f"calibration engine ({self.label}): node {exc} is missing from the model") from None
        used = names_read(nodes)
        graph = sub.graph
        graph.name = f"{self.label}-stage{self._step}"
        graph.node.extend(nodes)
        graph.input.extend(self._value_info(t) for t in reads)
        graph.output.extend(self._value_info(t) for t in outputs)
        options = ir.calibration_options()
        try:
            # the stage's weights are handed over, not copied into it (`ir.inference_session`)
            tensors = [t for t in model.graph.initializer if t.name in used]
            tensors += [numpy_helper.from_array(weights[t], t) for t in sorted(used & weights.keys())] if weights else []
            return ir.inference_session(sub, options, initializers=tensors)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"onnxruntime cannot load a calibration stage of the {self.label}: {first}") from None

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto(name=name)
        vi.type.tensor_type.elem_type = self._types.get(name, onnx.TensorProto.FLOAT)
        return vi


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (type inference on the weight-free skeleton)."""
    skeleton = ir.skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # inference is only needed for types; fall back to what the model states
        inferred = skeleton
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.value_info, *g.output)
             if vi.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types
