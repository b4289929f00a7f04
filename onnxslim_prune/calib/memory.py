"""How much memory a run may hold beyond the model's own floor (``--calib-memory``).

One budget per run, in bytes, shared out so that the peak stays near the floor (the loaded
model and one onnxruntime session of it) plus the budget, at any calibration or --eval size:

- one onnxruntime run of a refit stage takes 1 / `RUN_SHARE` per network: a stage whose
  activations (every tensor it computes, `tensor_bytes`) would not fit at the batch size runs a
  few samples at a time (`calib.collect.run_chunked`);
- the staged refit's two frontiers (`calib.engine`) share what is left once both networks' runs,
  `BATCH_COPIES` of one batch of the tensors a level reads from both networks and a headroom of
  1 / `HEADROOM_SHARE` are counted, at most 1 / `FRONTIER_SHARE` each (`frontier_budget`: the
  terms add up to the budget); beyond it their batches spill to ``.npy`` files. A refit batch
  whose copies would pass 1 / `BATCH_SHARE` takes fewer samples (`refit_batch`). The headroom is
  what no share itemises but a run holds beside its floor: the interpreter's other libraries,
  the model's graph and plan, the statistics of the selection, heap the allocator has not yet
  handed back (EfficientNet-Lite1, `ldrf`, 3G: 550 MiB at the start of the refit, 870 MiB at its
  end, 28% of the budget);
- the selection statistics (`methods.datadriven`) keep the Gram matrices of one pass within half, one
  batch's exposed tensors within a quarter, and the covariances the passes leave within a quarter
  (`methods.datadriven.CovarianceStore`: the rest in ``.npy`` files, read back as the selection needs them);
- the verdict's batches take half, the original's outputs held for it an eighth (`api`); the
  rest of those outputs wait in ``.npy`` files, so the original's session is not rebuilt beside
  the pruned model's (`validate.HeldOutputs`).

The default is `MEMORY_SHARE` of physical RAM: a quarter, 4 GB on a 16 GB machine. The budget
is a run-scoped setting held in a context variable (`limited`), like a ``decimal`` context: the
API sets it around one ``prune`` call, and code deep in a pass reads it without every
signature carrying it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UsageError

log = logging.getLogger(__name__)

#: share of the machine's RAM that calibration passes may hold by default
MEMORY_SHARE = 0.25
#: the staged refit's two frontiers (`calib.engine`) each take 1 / FRONTIER_SHARE of the budget
FRONTIER_SHARE = 4
#: one onnxruntime run of a calibration pass (its arena: activations of the samples it takes) within 1 / RUN_SHARE
RUN_SHARE = 8
#: what a run holds beside its floor that no share itemises (the module docstring), set aside by `frontier_budget`
HEADROOM_SHARE = 3
#: one batch of the tensors a refit level reads from both networks is alive this many times over: the tensors
#: themselves, what the stages compute beside them or read back from a spilled frontier, the fit's float64 copies
BATCH_COPIES = 3
#: those copies take at most 1 / BATCH_SHARE of the budget: past it a refit batch takes fewer samples (`refit_batch`)
BATCH_SHARE = 4
#: the budget a rule that changes results (`refit_batch`) assumes without --calib-memory: a fixed figure (a quarter of
#: 16 GB), not a share of this machine's RAM, so that a command gives the same bytes on any machine
FIXED_DEFAULT_BUDGET = 4 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("calibration_memory", default=None)


def physical_memory() -> int:
    """Bytes of physical RAM (8 GiB when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_size(text: str) -> int:
    """Bytes of ``512M``, ``2G``, ``1.5GB``, ``300MiB``, ``4096`` (bytes) or ``25%`` (of physical RAM)."""
    value = text.strip()
    percent = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", value)
    if percent:
        share = float(percent.group(1)) / 100.0
        if not 0.0 < share <= 1.0:
            raise UsageError(f"--calib-memory {text!r}: a share of RAM must be in (0%, 100%]")
        return int(share * physical_memory())
    return byte_size(text, "--calib-memory", "(512M, 2G) or a share of RAM (25%)")


def byte_size(text: str, flag: str, examples: str, if_zero: str = "") -> int:
    """Bytes of ``512M``, ``2G``, ``1.5GB``, ``300MiB`` or ``4096`` given to `flag`; one-line usage errors."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise UsageError(f"{flag} {text!r}: give bytes with an optional K/M/G/T suffix {examples}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise UsageError(f"{flag} {text!r} must be positive{if_zero}")
    return size


def explicit_budget() -> int | None:
    """The budget the run was given (``--calib-memory``), or None for the default."""
    return _budget.get()


def calibration_budget() -> int:
    """The current run's budget in bytes (`limited`), else `MEMORY_SHARE` of physical RAM."""
    budget = _budget.get()
    return int(MEMORY_SHARE * physical_memory()) if budget is None else budget


def frontier_budget(budget: int, batch_bytes: int) -> int:
    """Bytes each of the staged refit's two frontiers may hold in memory (beyond it they spill to disk).

    The refit holds at once, besides its floor: each network's onnxruntime run (1 / `RUN_SHARE`
    each, `calib.engine`), `BATCH_COPIES` of one batch of the tensors a level reads from both
    networks (`batch_bytes`), the headroom (1 / `HEADROOM_SHARE`) and the two frontiers; these
    add up to `budget`. A frontier takes at most 1 / `FRONTIER_SHARE`; 0 when nothing is left.
    """
    rest = budget - 2 * (budget // RUN_SHARE) - BATCH_COPIES * batch_bytes - budget // HEADROOM_SHARE
    return max(0, min(budget // FRONTIER_SHARE, rest // 2))


def refit_batch(batch_size: int, sample_bytes: int, budget: int | None = None) -> int:
    """Samples in one batch of the staged refit: `batch_size`, or fewer when `BATCH_COPIES` of a batch of a level's
    tensors (`sample_bytes` a sample, both networks) would pass 1 / `BATCH_SHARE` of `budget`. A language model's
    logits are 25 MB a window: 32 windows, three times over, took 2.4 GB of a 6 GB budget (SmolLM2, `lowrank` of
    its logits layer), and the frontiers and the headroom were left nothing.

    The batching changes the refit's sums (and the rows a batch samples), so without an explicit budget (`budget`
    None and no ``--calib-memory``) the rule takes `FIXED_DEFAULT_BUDGET`, not a share of this machine's RAM: the
    same command gives the same bytes on any machine."""
    if budget is None:
        budget = explicit_budget()
    if budget is None:
        budget = FIXED_DEFAULT_BUDGET
    if sample_bytes <= 0:
        return batch_size
    return max(1, min(batch_size, (budget // BATCH_SHARE) // (BATCH_COPIES * sample_bytes)))


@contextlib.contextmanager
def limited(budget: int | None) -> Iterator[None]:
    """Within this block calibration passes hold at most `budget` bytes (None: the default)."""
    token = _budget.set(budget)
    try:
        yield
    finally:
        _budget.reset(token)


def _trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_TRIM = _trimmer() if sys.platform.startswith("linux") else None


def give_back() -> None:
    """Collect garbage and return the freed heap to the OS.

    A model's weights are protobuf byte fields and numpy arrays of a few MB each, below glibc's
    mmap threshold: freed copies (a cut model, the bytes a session was built from) stay in the
    heap as free chunks, so the resident size of a run that makes a copy per pass creeps up
    pass after pass (SmolLM2: 4.5 GB after tracing, 7 GB after 13 statistics passes).
    ``malloc_trim`` hands those pages back.
    """
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


@dataclass(frozen=True)
class SampleCost:
    """Bytes one sample costs when a model runs (estimates from static shapes at batch 1).

    `working`: the activations onnxruntime holds at once, taken as the largest inputs plus
    outputs of one node (the buffers it reads and writes are live together; its planner
    reuses the rest); `outputs`: the graph outputs of one sample.
    """

    working: int
    outputs: int

    def samples_within(self, budget: int, *, factor: float = 1.0) -> int:
        """Most samples whose `working` + `outputs` (times `factor`) fit `budget` (at least 1)."""
        per = max(1, int((self.working + self.outputs) * factor))
        return max(1, budget // per)


#: weights up to which `sample_cost` may run the model once for the shapes inference misses (a larger
#: model's session would cost more than the estimate saves; its known shapes are used as they are)
RUN_FOR_SHAPES_BYTES = 256 << 20


def _inferred_shapes(model: onnx.ModelProto, single: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Static shapes lenient inference gives on the weight-free skeleton (no run)."""
    from .. import ir

    skel = ir.skeleton(model)
    for vi in skel.graph.input:
        if vi.name in single:
            dims = vi.type.tensor_type.shape.dim
            for dim, value in zip(dims, single[vi.name]):
                dim.Clear()
                dim.dim_value = int(value)
    del skel.graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(skel, data_prop=True).graph
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if all(d >= 0 for d in dims):
                shapes[vi.name] = tuple(dims)
    return shapes


def tensor_bytes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int] | None:
    """Bytes of one sample of every activation of `model` (inputs at `input_shapes`, batch set to 1).

    Shapes come from inference on the weight-free skeleton; what it cannot give, from one run at
    batch 1 (`ir.static_shapes`, as tracing does) for models within `RUN_FOR_SHAPES_BYTES`
    (EfficientNet's padding is computed from Shape ops at run time); element sizes from the
    graph's types, 4 bytes where none is stated. Weights and tensors of unknown shape are left
    out; None when no shape is known.
    """
    from .. import ir

    single = {name: (1, *shape[1:]) for name, shape in input_shapes.items() if shape}
    try:
        shapes = _inferred_shapes(model, single)
        produced = [o for n in model.graph.node for o in n.output if o]
        if any(o not in shapes for o in produced) and ir.payload_bytes(model) <= RUN_FOR_SHAPES_BYTES:
            shapes = ir.static_shapes(model, single)  # what inference misses, from one run (a small model only)
    except Exception as exc:  # an estimate only: without shapes the caller keeps its batches
        log.debug("no per-sample cost: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    weights = {i.name for i in model.graph.initializer}
    itemsize = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
                for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info)
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    sizes = {name: int(np.prod(shape, dtype=np.int64)) * itemsize.get(name, 4)
             for name, shape in shapes.items() if name not in weights}
    return sizes or None


def sample_cost(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> SampleCost | None:
    """`SampleCost` of `model` with its inputs at `input_shapes` (batch set to 1); None when shapes are unknown
    (sizes from `tensor_bytes`)."""
    sizes = tensor_bytes(model, input_shapes)
    if sizes is None:
        return None

    def size(name: str) -> int:
        return sizes.get(name, 0) if name else 0

    working = max((sum(size(t) for t in {*n.input, *n.output}) for n in model.graph.node), default=0)
    if working == 0:
        return None
    return SampleCost(working, sum(size(o.name) for o in model.graph.output))
