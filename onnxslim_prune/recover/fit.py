"""The recovery loop: stream each block's activations, take Adam steps on its weights, keep them if the guard agrees.

See the package docstring for what is minimised and how it is guarded. This module needs torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from .. import ir
from ..judge import validate
from ..calib.engine import StagedPasses, sample_inputs
from ..calib.memory import calibration_budget, tensor_bytes
from ..calib.sources import CalibrationSet
from ..calib.split import subset
from ..graph.norms import NormKind, NormRead, norms_reading
from . import Kept, RecoverSettings
from .blocks import Block, block_costs, find_blocks
from .torchblock import TorchBlock, Unsupported, check_supported

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: fraction of the fit samples kept aside to judge each block (at least `MIN_GUARD`, at most `MAX_GUARD`)
GUARD_FRACTION = 0.2
MIN_GUARD = 4
MAX_GUARD = 256
#: fewest samples a block is fitted on
MIN_TRAIN = 4
#: shares of the calibration budget: each network's frontier, and the samples one block holds
FRONTIER_SHARE = 4
DATA_SHARE = 4
#: torch threads, the same on any machine (the same bytes): two, the machines this tool is sized for. A SwiGLU FFN
#: step of SmolLM2-135M (2,048 tokens) takes 0.13 s with two, 0.24 s with one, with the same bytes; a small conv
#: step gains less (3.4 -> 2.7 ms) and, with another process busy on both cores, loses (6.5 -> 21 ms)
THREADS = 2
#: a block whose compared outputs take more than this per sample is not fitted (SmolLM2's logits: 24 MiB for a
#: window of 128 tokens, where its trainable weight is one RMSNorm scale)
MAX_OUTPUT_BYTES = 8 << 20
#: float64 bytes of held samples a statistic over them converts at a time (`_row_blocks`)
STAT_BLOCK_BYTES = 64 << 20
#: guard checkpoints per block (the best one is kept)
CHECKPOINTS = 4
#: a block the guard rejects is fitted again from its closed-form weights at this times the learning rate
#: (`RecoverSettings.retries` times)
RETRY_FACTOR = 0.1
#: steps timed (after the first) before a block's steps are fitted to its time (`fitted_steps`)
TIMED_STEPS = 4
#: most prefixes of the recovered blocks the network guard measures (`_network_guard`)
MAX_PREFIXES = 8
#: the network guard runs each network on as many samples as return at most this many bytes of outputs
GUARD_RUN_BYTES = 64 << 20
#: most of ``--recover-time`` the network guard's passes are planned to take (`guard_passes`)
GUARD_TIME_SHARE = 0.25
#: values of an output the guard's error sums convert to float64 at a time
SUM_BLOCK = 1 << 20


class Status(str, Enum):
    KEPT = "kept"  # the recovered weights were written
    REJECTED = "rejected"  # trained, but the guard error did not fall: closed-form weights kept
    SKIPPED = "skipped"  # not trained (`BlockResult.reason`)


@dataclass(frozen=True)
class BlockResult:
    block: Block
    status: Status
    reason: str = ""
    steps: int = 0  # of all tries together
    seconds: float = 0.0  # of all tries together
    before: float = math.nan  # guard error with the closed-form weights
    after: float = math.nan  # guard error with the best recovered weights
    train_samples: int = 0
    guard_samples: int = 0
    lr: float = math.nan  # the learning rate of the last try
    tries: int = 0  # tries of steps: a rejected try is followed by one at a tenth of the rate (`RETRY_FACTOR`)
    full_first: bool = False  # its first try took every step asked (the clock did not cut it)


    def row(self) -> dict[str, object]:
        """The report's record of the block (``extra.recover.blocks``)."""
        b = self.block
        return {"block": b.index, "first": b.nodes[0], "last": b.nodes[-1], "nodes": len(b.nodes),
                "weights": len(b.trainable), "status": self.status.value, "reason": self.reason or None,
                "steps": self.steps, "seconds": round(self.seconds, 2),
                "guard_error_before": None if math.isnan(self.before) else self.before,
                "guard_error_after": None if math.isnan(self.after) else self.after,
                "train_samples": self.train_samples, "guard_samples": self.guard_samples,
                "lr": None if math.isnan(self.lr) else self.lr, "tries": self.tries}


@dataclass(frozen=True)
class Recovery:
    model: onnx.ModelProto
    results: tuple[BlockResult, ...]
    notes: tuple[str, ...]
    seconds: float = 0.0

    def record(self) -> dict[str, object]:
        """``extra.recover`` of the report: the seconds and every block's `BlockResult.row`."""
        return {"seconds": round(self.seconds, 1), "blocks": [r.row() for r in self.results]}


@contextmanager
def _torch_state(seed: int) -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, fit: CalibrationSet, settings: RecoverSettings,
            progress: Progress | None = None, kept: Kept | None = None) -> Recovery:
    """Recover `pruned`'s blocks in place of their closed-form weights (only initializers change); see the package.

    `kept`: the channels a pruned tensor keeps of the original's (`kept_channels`): the original's block outputs
    are compared on those."""
    blocks = find_blocks(original, pruned)
    names = [n.name for n in pruned.graph.node]
    if not blocks:
        return Recovery(pruned, (), ("recover: no block differs from the original; nothing to recover",))
    if len(set(names)) != len(names) or not all(names):
        return Recovery(pruned, (), ("recover: skipped, the pruned graph's nodes are not uniquely named",))
    nodes = {n.name: n for n in pruned.graph.node}
    planned: list[Block] = []
    for block in blocks:
        if block.skip is None:
            try:
                check_supported([nodes[n] for n in block.nodes])
            except Unsupported as exc:
                block = _skipped(block, f"not convertible to torch: {exc}")
        planned.append(block)
    original_outputs = {o for n in original.graph.node for o in n.output} | {o.name for o in original.graph.input}
    planned = [b if b.skip is not None or set(b.outputs) <= original_outputs
               else _skipped(b, "the original computes no tensor of its output") for b in planned]

    # a block whose compared outputs are too large to fit is skipped before the time is shared out: SmolLM2's logits
    # block kept a fifth of the 1,800 s (its MACs' share) and was then skipped by `_collect`, leaving 296 s unused
    # {} when shapes are unknown: the original's engine then knows it too, and does not infer them again
    sizes = tensor_bytes(original, sample_inputs(fit)) or {}
    planned = [_skipped(b, _too_large(out)) if b.skip is None and (out := sum(sizes.get(t, 0) for t in b.outputs))
               > MAX_OUTPUT_BYTES else b for b in planned]
    # a block skipped here is not streamed: nothing computes its inputs or the original's outputs for it
    streamed = [b for b in planned if b.skip is None]

    if not streamed:
        skipped = [BlockResult(b, Status.SKIPPED, b.skip or "") for b in planned]
        return Recovery(pruned, tuple(skipped), _notes(skipped, 0.0))

    budget = calibration_budget()
    # the passes run in batches of a gradient step's size: shape tensors a block reads from outside (a Reshape
    # target computed from a Shape of the batch, as exporters write attention) then hold the step's batch size too
    mine = StagedPasses(pruned, fit, settings.batch, [b.inputs for b in streamed], budget=budget // FRONTIER_SHARE,
                        label="recovered network", changes={n: k for k, b in enumerate(streamed) for n in b.nodes})
    theirs = StagedPasses(original, fit, settings.batch, [b.outputs for b in streamed],
                          budget=budget // FRONTIER_SHARE, label="original network", sizes=sizes)
    settings = replace(settings, batch=mine.size)  # a static batch, or fewer samples than a step
    total = mine.batches * mine.size if mine.drop_last else fit.num_samples
    if total < 2 * mine.size:
        mine.close()
        theirs.close()
        return Recovery(pruned, (), (f"recover: skipped, {total} fit samples are too few for steps of {mine.size} "
                                     "and a guard part",))
    guard, train_order = _split(total, settings.seed, mine.size)
    tokens = _token_mask(original, fit, total)
    results: list[BlockResult] = []
    # each block's share of the time left is its share of the estimated cost left (early CNN blocks, at high
    # resolution, take ten times longer per step than late ones)
    costs = [0.0 if b.skip else c for b, c in zip(planned, block_costs(pruned, planned, fit.sample_shapes))]
    closed_form: dict[str, onnx.TensorProto] = {}  # the closed-form value of every weight a block replaced
    # the norm that reads each compared output: read once (recovery changes weights only, not the graph)
    compared = list(dict.fromkeys(t for b in streamed for t in b.outputs))
    reads = dict(zip(compared, norms_reading(pruned, compared)))
    started = time.perf_counter()
    # the network guard's passes come out of the time too: the original's outputs on the guard samples first (one
    # pass, which times about what each of the guard's passes costs), and the blocks share what is left after the
    # passes planned for the guard. They are held on disk: the frontiers and a block's samples hold the memory now
    judge: _OutputError | None = None
    per_pass, planned_passes = 0.0, 0
    notes: list[str] = []
    try:
        try:
            if pruned.ByteSize() < ir.PROTO_LIMIT:
                judge = _OutputError(validate.session(original), ir.token_mask_input(original),
                                     subset(fit, sorted(int(i) for i in guard), "recover guard"), settings.batch, 0)
                per_pass = time.perf_counter() - started
                planned_passes = guard_passes(settings.seconds, per_pass, len(streamed))
            deadline = started + settings.seconds - per_pass * planned_passes
            # the rate a block starts at: the user's, or the lower one a block before it kept from its retry. The
            # rate that works falls with depth (SmolLM2's last blocks, and Lite1's mostly from its third on, gain
            # only at a tenth of 1e-2), so a later block starting over at the user's rate would spend half its time
            # on a try its guard rejects (Lite1: 777 s of recovery, 562 s so). Only after a first try the clock did
            # not cut: one cut short says little of its rate (in a time-bound SmolLM2 run, its fourth block, cut to
            # 10 steps at 1e-2, sent the next 33 to 1e-3, where layers 13-22 gain less: perplexity 1.38x, not 1.26x)
            rate = settings.lr
            with _torch_state(settings.seed):
                for block in planned:
                    fraction = costs[block.index] / max(sum(costs[block.index:]), 1e-9)
                    result = _one_block(block, nodes, pruned, mine, theirs, Samples(guard, train_order, tokens),
                                        replace(settings, lr=rate), _Clock(deadline, fraction), budget // DATA_SHARE,
                                        kept or {}, closed_form, reads)
                    if result.status is Status.KEPT and result.tries > 1 and result.full_first:
                        rate = result.lr
                    results.append(result)
                    _log(result)
                    if progress is not None:
                        progress(block.index + 1, len(planned))
        finally:
            try:
                mine.close()
            finally:
                theirs.close()
        notes.extend(_notes(results, time.perf_counter() - started))
        if closed_form and judge is None:
            notes.append("recover: the network was not checked on the guard samples (a model past 2 GB)")
        elif closed_form and judge is not None:
            # the passes planned, or more when the blocks left time over (the same count whenever time is not short)
            left = settings.seconds - (time.perf_counter() - started)
            most = max(planned_passes, min(MAX_PREFIXES, int(left / max(per_pass, 1e-9))))
            results, guard_note = _network_guard(judge, pruned, closed_form, results, most)
            notes.append(guard_note)
    finally:
        if judge is not None:
            judge.close()
    spent = time.perf_counter() - started
    return Recovery(pruned, tuple(results), tuple(notes), spent)


def guard_passes(seconds: float, per_pass: float, blocks: int) -> int:
    """The network guard's passes planned out of `seconds` (a pass takes `per_pass`): one per prefix of the `blocks`,
    at most `MAX_PREFIXES`, and no more than `GUARD_TIME_SHARE` of the time pays for, but the closed-form network and
    the recovered one whatever they cost (a short ``--recover-time`` then goes mostly to them)."""
    affordable = int(GUARD_TIME_SHARE * seconds / max(per_pass, 1e-9))
    return max(2, min(MAX_PREFIXES, blocks + 1, affordable))


@dataclass(frozen=True)
class _Clock:
    """A block's time: its share (`fraction`) of what is left until the blocks' `deadline` (`time.perf_counter`)."""

    deadline: float
    fraction: float

    def share(self) -> float:
        return max(self.deadline - time.perf_counter(), 0.0) * self.fraction


def _skipped(block: Block, reason: str) -> Block:
    return replace(block, skip=reason)


def _too_large(out_bytes: int) -> str:
    return f"its output is {out_bytes >> 20} MiB a sample (a language model's logits): too costly to fit"


@dataclass(frozen=True)
class Samples:
    """Which fit samples guard and train a block, and which of their tokens count (None: every one)."""

    guard: np.ndarray  # positions among the fit samples, sorted
    train_order: np.ndarray  # the rest, in the seeded order training takes them
    tokens: np.ndarray | None  # [samples, T] bool: False at padding (`ir.token_mask_input` 0)


def _token_mask(original: onnx.ModelProto, fit: CalibrationSet, total: int) -> np.ndarray | None:
    """The fit samples' non-padding tokens, where the model has a padding mask input: an output at a padding
    position is read by nothing (a sentence embedding pools over the mask), so no loss or guard counts it."""
    name = ir.token_mask_input(original)
    if name is None or name not in fit.names:
        return None
    rows = np.concatenate([np.asarray(b[name]) != 0 for b in fit.iter_batches(max(1, min(total, 1024)))])[:total]
    return None if rows.all() else rows


def _split(total: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(guard positions, the rest in the seeded order training takes them) among the fit samples; the guard is
    whole steps (it is evaluated `step` samples at a time)."""
    perm = np.random.default_rng([seed, 0x2EC0]).permutation(total)
    count = min(MAX_GUARD, max(MIN_GUARD, math.ceil(GUARD_FRACTION * total)), total // 2)
    count = max(step, count // step * step)
    return np.sort(perm[:count]), perm[count:]


def _one_block(block: Block, nodes: dict[str, onnx.NodeProto], model: onnx.ModelProto, mine: StagedPasses,
               theirs: StagedPasses, samples: Samples, settings: RecoverSettings, clock: _Clock,
               data_budget: int, kept: Kept, closed_form: dict[str, onnx.TensorProto], reads: Mapping[str, NormRead | None],
               ) -> BlockResult:
    if block.skip is not None:  # not in the engines' schedules (`recover`)
        return BlockResult(block, Status.SKIPPED, block.skip)
    # both streams advance for every streamed block (the engines' schedule)
    inputs = mine.advance(block.inputs, model)
    targets = (_kept_only(batch, kept) for batch in theirs.advance(block.outputs))
    seconds = clock.share()  # taken before the block's samples stream: the streaming comes out of later blocks
    held = _collect(inputs, targets, block, samples, data_budget)
    if isinstance(held, str):
        return BlockResult(block, Status.SKIPPED, held)
    x_train, y_train, x_guard, y_guard, fixed, m_train, m_guard = held
    inits = {t.name: t for t in model.graph.initializer}
    used = {t for n in block.nodes for t in nodes[n].input if t in inits}
    values = {name: numpy_helper.to_array(inits[name]) for name in used}
    norms = [reads.get(t) for t in block.outputs]
    n_train, n_guard = ([_seen_by(y, norm) for y, norm in zip(ys, norms)] for ys in (y_train, y_guard))
    scale = [_variance(y, m_train, inv) or 1.0 for y, inv in zip(y_train, n_train)]
    train = _Training(x_train, y_train, n_train, m_train, x_guard, y_guard, n_guard, m_guard, fixed, block, scale,
                      settings)

    def closed_form_net() -> TorchBlock:
        return TorchBlock([nodes[n] for n in block.nodes], values, block.trainable, block.inputs, block.outputs)

    started = time.perf_counter()
    try:
        net = closed_form_net()
        before = train.error(net)
    except (Unsupported, RuntimeError, ValueError, IndexError, TypeError) as exc:  # torch reports shape errors so
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BlockResult(block, Status.SKIPPED, f"not run by torch: {first}")
    if not math.isfinite(before):
        return BlockResult(block, Status.SKIPPED, "the closed-form block's error is not finite")
    per_check = time.perf_counter() - started  # one guard evaluation (and building the block)
    lr, best, best_values, steps, tries = settings.lr, before, None, 0, 0
    # a block whose guard finds no checkpoint below its closed-form error starts again from those weights at a
    # tenth of the rate: the best rate differs by model and by layer (SmolLM2's first blocks gain most at 1e-2, its
    # last ones and MiniLM's only at 1e-3). A block already exact, or one that overfits its samples, is rejected
    # at every rate: its retry costs its share of the time left, which the blocks after it lose in proportion
    begun, budget, no_time, full_first = started, seconds, False, False
    while best_values is None and tries <= settings.retries:
        if tries:
            budget = min(seconds, clock.share())  # as if the retry were one more block of the same cost
            if budget <= per_check * (CHECKPOINTS + 1):
                no_time = True
                break
            net = closed_form_net()
            lr, begun = lr * RETRY_FACTOR, time.perf_counter()
        best, best_values, taken = train.run(net, lr, begun, budget, per_check, before,
                                             settings.seed + 7919 * block.index + tries)
        if not tries:
            full_first = taken == settings.steps
        steps += taken
        tries += 1
    spent = time.perf_counter() - started
    result = BlockResult(block, Status.KEPT, "", steps, spent, before, best, train.count, int(y_guard[0].shape[0]), lr,
                         tries, full_first)
    if best_values is None:
        return replace(result, status=Status.REJECTED, reason="the guard samples' error did not improve"
                       + (f" at learning rates {settings.lr:g} .. {lr:g}" if tries > 1 else "")
                       + (" (no time left for a retry)" if no_time else ""))
    for name, value in best_values.items():
        closed_form[name] = _copy(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return result


@dataclass
class _Training:
    """One block's held samples and loss, from which `run` takes a try of Adam steps at a learning rate."""

    x_train: Sequence[torch.Tensor]
    y_train: Sequence[torch.Tensor]
    n_train: Sequence[AsSeen | None]
    m_train: torch.Tensor | None
    x_guard: Sequence[torch.Tensor]
    y_guard: Sequence[torch.Tensor]
    n_guard: Sequence[AsSeen | None]
    m_guard: torch.Tensor | None
    fixed: BlockFeeds
    block: Block
    scale: Sequence[float]
    settings: RecoverSettings

    @property
    def count(self) -> int:
        return int(self.x_train[0].shape[0] if self.x_train else self.y_train[0].shape[0])

    def error(self, net: TorchBlock) -> float:
        return _error(net, self.x_guard, self.y_guard, self.n_guard, self.m_guard, self.fixed, self.block, self.scale,
                      self.settings.batch)

    def run(self, net: TorchBlock, lr: float, started: float, seconds: float, per_check: float, before: float,
            seed: int) -> tuple[float, dict[str, np.ndarray] | None, int]:
        """Up to ``settings.steps`` steps from `lr`, cosine-decayed to end within `seconds` from `started` (a guard
        evaluation takes `per_check`): the best guard error of the checkpoints, its weights (None when none was
        below `before`) and the steps taken."""
        settings = self.settings
        best, best_values = before, None
        optimiser = torch.optim.Adam(list(net.weights), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        horizon = settings.steps  # where the cosine decay ends: fitted to the block's time once steps are timed
        checkpoints = _checkpoints(horizon)
        steps = 0
        timed = started
        for step in range(1, settings.steps + 1):
            if step > horizon or (time.perf_counter() - started > seconds and step > 1):
                break
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(lr, step, horizon)
            pick = torch.randint(0, self.count, (settings.batch,), generator=generator)
            loss = _loss(net, [x[pick] for x in self.x_train], [y[pick] for y in self.y_train],
                         _rows(self.n_train, pick), None if self.m_train is None else self.m_train[pick], self.fixed,
                         self.block, self.scale)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps = step
            if step == 1:
                timed = time.perf_counter()  # the first step warms torch up: it is not timed
            elif step == TIMED_STEPS + 1:
                per_step = (time.perf_counter() - timed) / TIMED_STEPS
                horizon = fitted_steps(settings.steps, seconds, time.perf_counter() - started, step, per_step,
                                       per_check)
                checkpoints = _checkpoints(horizon)
            if step in checkpoints:
                now = self.error(net)
                if now < best:
                    best, best_values = now, net.values()
        if steps not in checkpoints and steps:
            now = self.error(net)
            if now < best:
                best, best_values = now, net.values()
        return best, best_values, steps


def learning_rate(lr: float, step: int, horizon: int) -> float:
    """Step `step`'s learning rate (from 1): `lr` cosine-decayed to zero at step ``horizon + 1``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(horizon, 1)))


def _checkpoints(horizon: int) -> set[int]:
    return {max(1, round(horizon * (k + 1) / CHECKPOINTS)) for k in range(CHECKPOINTS)}


def fitted_steps(steps: int, seconds: float, spent: float, done: int, per_step: float, per_check: float) -> int:
    """The steps a block takes: `steps`, or fewer when they would not fit its `seconds`, so that the cosine decay
    ends within the time (`spent` of it gone with `done` steps; a step takes `per_step`, each of the
    `CHECKPOINTS` guard evaluations `per_check`). A decay cut off by the clock stopped SmolLM2's blocks at about
    100 of 200 steps, their learning rate still at half of its start."""
    left = seconds - spent - CHECKPOINTS * per_check
    return max(done, min(steps, done + int(max(left, 0.0) / max(per_step, 1e-9))))


def _network_guard(judge: _OutputError, model: onnx.ModelProto, closed_form: dict[str, onnx.TensorProto],
                   results: list[BlockResult], most: int = MAX_PREFIXES) -> tuple[list[BlockResult], str]:
    """Keep the recovered weights of the first blocks, as many as bring the whole network's outputs closest to the
    original's on the guard samples (`judge`), and put the closed-form weights back in the rest (all of them when no
    prefix beats the closed-form network). Returns the results, the blocks put back marked rejected, and a note.

    Each block is judged on its own output, on inputs from the recovered blocks before it; a later block that
    kept its closed-form weights was fitted to the closed-form inputs, so the network can lose what each block
    gained (a residual stream pruned by half: block errors down, the output's up). A prefix, not any subset: a
    block was recovered on the inputs of the recovered blocks before it. At most `most` prefixes are measured
    (at least 2: none and all of the recovered blocks, and others evenly spaced between), each one pass of the
    network over the guard samples (`judge`: the original's outputs on them, computed once).
    """
    inits = {t.name: t for t in model.graph.initializer}
    recovered = {name: _copy(inits[name]) for name in closed_form}
    kept = [i for i, r in enumerate(results) if r.status is Status.KEPT]
    count = len(kept)
    most = max(2, most)
    prefixes = sorted({round(k * count / (most - 1)) for k in range(most)}) if count >= most else list(range(count + 1))

    def use_prefix(prefix: int) -> None:
        """The recovered weights in the first `prefix` recovered blocks, the closed-form ones elsewhere."""
        ours = {n for i in kept[:prefix] for n in results[i].block.trainable}
        for name in closed_form:
            inits[name].CopyFrom(recovered[name] if name in ours else closed_form[name])

    errors: dict[int, float] = {}
    for prefix in reversed(prefixes):  # all recovered first: the weights are already in place
        use_prefix(prefix)
        errors[prefix] = judge(validate.session(model))
    best = min(prefixes, key=lambda k: (errors[k], k))
    if errors[best] >= errors[0]:
        best = 0
    use_prefix(best)
    log.info("recover: the network's guard error by recovered blocks kept: %s",
             ", ".join(f"{k}: {errors[k]:.4g}" for k in prefixes))
    put_back = set(kept[best:])
    results = [replace(r, status=Status.REJECTED, reason="put back by the network guard") if i in put_back else r
               for i, r in enumerate(results)]
    if best == 0:
        return results, (f"recover: the network's output error on the guard samples rose ({errors[0]:.4g} closed-form, "
                         f"{errors[count]:.4g} recovered): every block keeps its closed-form weights")
    return results, (f"recover: the network's output error on the guard samples: {errors[0]:.4g} closed-form, "
                     f"{errors[best]:.4g} with the first {best} of {count} recovered blocks (kept)"
                     + (f", {errors[count]:.4g} with all" if best < count else ""))


def _copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    return out


class _OutputError:
    """A model's output error to the original's on `samples`: the sum over the graph outputs of the squared error
    over the original output's variance (float outputs; the positions of padding tokens left out, as the verdict
    leaves them).

    The original runs once, here: its outputs are held in memory within `budget` bytes and on disk beyond it
    (`validate.HeldOutputs`), so each call runs only the model judged (SmolLM2, 1,024 windows, 160 of them
    guarding: the network guard took 872 s re-running the original for each of 9 prefixes, 403 s now). The networks run on as
    many samples at a time as keep each one's outputs within `GUARD_RUN_BYTES` (learnt from the first sample), and
    the sums are taken `SUM_BLOCK` values at a time: a batch of 16 SmolLM2 windows returned 0.4 GB of logits per
    network, and their float64 copies were the run's peak."""

    def __init__(self, original: ort.InferenceSession, mask_name: str | None, samples: CalibrationSet, batch: int,
                 budget: int) -> None:
        self._mask_name = mask_name
        self._samples = samples
        self._batch = batch
        self._inputs = {i.name for i in original.get_inputs()}
        self._most: int | None = None  # samples a run takes, once the first one's outputs are known
        self._cuts: list[list[int]] | None = None  # per batch, where its parts start and the last ends
        self._reference = validate.HeldOutputs(budget)
        try:
            for part in self._parts():
                want = original.run(None, part)
                count = _leading_samples(part)
                if self._most is None and count is not None:
                    self._most = max(1, GUARD_RUN_BYTES // max(1, sum(np.asarray(w).nbytes for w in want) // count))
                self._reference.add([np.asarray(w) for w in want])
        except BaseException:
            self._reference.close()
            raise

    def _parts(self) -> Iterator[dict[str, np.ndarray]]:
        """The feeds the networks run: on the first pass cut as `_most` allows once it is learnt, and recorded in
        `_cuts`; on every later pass the recorded cuts, so that part ``i`` is the same samples each time."""
        recorded = self._cuts
        cuts: list[list[int]] = []
        for b, whole in enumerate(self._samples.iter_batches(self._batch)):
            feed = {k: v for k, v in whole.items() if k in self._inputs}
            count = _leading_samples(feed)
            if count is None:  # an input without a leading sample axis: the batch runs whole
                cuts.append([])
                yield feed
                continue
            if recorded is not None:
                for at, stop in zip(recorded[b], recorded[b][1:]):
                    yield {k: v[at:stop] for k, v in feed.items()}
                continue
            bounds = [0]
            cuts.append(bounds)
            while bounds[-1] < count:
                at = bounds[-1]
                bounds.append(min(count, at + (self._most or 1)))
                yield {k: v[at:bounds[-1]] for k, v in feed.items()}
        if recorded is None:
            self._cuts = cuts

    def __call__(self, model: ort.InferenceSession) -> float:
        sums: dict[int, list[float]] = {}
        index = -1
        for index, part in enumerate(self._parts()):
            got = model.run(None, part)
            _add_errors(sums, self._reference.get(index), got, part.get(self._mask_name) if self._mask_name else None)
        if index + 1 != len(self._reference):
            raise RuntimeError(f"the guard samples gave {index + 1} parts, the original's outputs {len(self._reference)}")
        total = 0.0
        for err, sq, s1, n in sums.values():
            var = sq / max(n, 1) - (s1 / max(n, 1)) ** 2
            total += err / max(n, 1) / (var if var > 0 else 1.0)
        return total

    def close(self) -> None:
        """Remove the original's outputs held on disk."""
        self._reference.close()


def _leading_samples(feed: dict[str, np.ndarray]) -> int | None:
    """The samples of a batch when every fed array has them first (then it can run a part at a time), else None."""
    counts = {v.shape[0] if v.ndim else -1 for v in feed.values()}
    return counts.pop() if len(counts) == 1 and min(counts, default=-1) > 0 else None


def _add_errors(sums: dict[int, list[float]], want: Sequence[np.ndarray], got: Sequence[np.ndarray],
                mask: np.ndarray | None) -> None:
    """Add each float output's squared error, squares, sum and count (the rows of real tokens only) to `sums`."""
    for i, (w, g) in enumerate(zip(want, got)):
        w, g = np.asarray(w), np.asarray(g)
        if mask is not None and w.ndim >= 2 and w.shape[:2] == np.shape(mask) and w.shape == g.shape:
            real = np.asarray(mask) != 0  # the rows of real tokens
            w, g = w[real], g[real]
        if not np.issubdtype(w.dtype, np.floating) or np.shape(w) != np.shape(g):
            continue
        acc = sums.setdefault(i, [0.0, 0.0, 0.0, 0.0])
        flat_w, flat_g = w.reshape(-1), g.reshape(-1)
        for at in range(0, flat_w.size, SUM_BLOCK):
            w64 = flat_w[at:at + SUM_BLOCK].astype(np.float64)
            d64 = flat_g[at:at + SUM_BLOCK].astype(np.float64) - w64
            acc[0] += float(np.dot(d64, d64))
            acc[1] += float(np.dot(w64, w64))
            acc[2] += float(np.sum(w64))
            acc[3] += w64.size


def _kept_only(batch: dict[str, np.ndarray], kept: Kept) -> dict[str, np.ndarray]:
    """The original's outputs on the channels the pruned network keeps."""
    return {name: np.take(value, kept[name][1], axis=kept[name][0]) if name in kept else value
            for name, value in batch.items()}


Held = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], "BlockFeeds",
             torch.Tensor | None, torch.Tensor | None]


def _collect(inputs: Iterator[dict[str, np.ndarray]], targets: Iterator[dict[str, np.ndarray]], block: Block,
             samples: Samples, budget: int) -> Held | str:
    """The block's inputs and the original's outputs on the guard samples and the training samples that fit,
    and those samples' token masks (None without padding)."""
    guard, train_order = samples.guard, samples.train_order
    guard_set = set(guard.tolist())
    taken: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # positions of the guard and training samples
    train_set: set[int] | None = None
    first_count = 0
    batched: set[str] = set()
    shared: dict[str, np.ndarray] = {}
    folded: dict[str, int] = {}  # per-sample tensors whose first axis is samples x k: name -> k
    held = _Rows()
    done = 0
    for feed, want in zip(inputs, targets):
        count = next(iter(want.values())).shape[0]
        if train_set is None:
            first_count = count
            for name, value in feed.items():
                if value.ndim and value.shape[0] == count:
                    batched.add(name)
                elif value.ndim >= 2 and count > 1 and value.shape[0] % count == 0:
                    # a sample-major flattening of per-sample rows (BERT exports build the attention mask from a
                    # Flatten of [N, T] to [N * T, 1]): held as [N, k, ...], flattened back for the block
                    batched.add(name)
                    folded[name] = value.shape[0] // count
                else:
                    shared[name] = value
            out_bytes = sum(v.nbytes for v in want.values()) // max(count, 1)
            if out_bytes > MAX_OUTPUT_BYTES:  # the sizes `recover` skips by were unknown
                return _too_large(out_bytes)
            per_sample = sum(v.nbytes for k, v in feed.items() if k in batched) + sum(v.nbytes for v in want.values())
            per_sample = max(1, per_sample // max(count, 1))
            room = max(0, budget // per_sample - len(guard_set))
            chosen = train_order[:room]
            train_set = set(chosen.tolist())
            if room < len(train_order):
                log.info("recover: %s: %d of %d fit samples held within %d MiB", block.label, len(chosen),
                         len(train_order), budget >> 20)
        if any(not v.ndim or v.shape[0] != count for v in want.values()):
            return "the original's output at its end has no batch axis"
        positions = np.arange(done, done + count)
        in_guard = np.array([p in guard_set for p in positions])
        in_train = np.array([p in train_set for p in positions])
        taken[0].append(positions[in_guard])
        taken[1].append(positions[in_train])
        for name, value in [*feed.items(), *(("\0" + k, v) for k, v in want.items())]:
            if name in shared:
                # a batch of another size has other shape tensors; one of the same size must not differ
                if count == first_count and (value.shape != shared[name].shape or not np.array_equal(value, shared[name])):
                    return f"it reads {name}, which changes from batch to batch and has no batch axis"
                continue
            if name in folded:
                value = value.reshape(count, folded[name], *value.shape[1:])
            held.put(name, value, in_guard, in_train, (len(guard_set), len(train_set)))
        done += count
    if train_set is None:
        return "no calibration batch reached it"
    x_train = [held.taken(n, 1) for n in block.inputs if n in batched]
    y_train = [held.taken("\0" + n, 1) for n in block.outputs]
    x_guard = [held.taken(n, 0) for n in block.inputs if n in batched]
    y_guard = [held.taken("\0" + n, 0) for n in block.outputs]
    if not y_train or y_train[0].shape[0] < MIN_TRAIN or y_guard[0].shape[0] == 0:
        return f"too few samples fit the memory budget ({0 if not y_train else y_train[0].shape[0]})"
    masks = [None if samples.tokens is None else torch.from_numpy(samples.tokens[np.concatenate(k)]) for k in taken]
    # np.require keeps a scalar's shape (np.ascontiguousarray made EfficientNet's batch-size scalar [1])
    fixed = BlockFeeds({k: torch.from_numpy(np.require(v, requirements="C")) for k, v in shared.items()}, frozenset(folded))
    return x_train, y_train, x_guard, y_guard, fixed, masks[1], masks[0]


class _Rows:
    """Per tensor, its guard and training samples, written into arrays of their final size as the batches pass
    (gathered in lists and concatenated, they were held twice at the end: 1.5 GB more for Lite1's stem block)."""

    def __init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._filled: dict[str, list[int]] = {}

    def put(self, name: str, value: np.ndarray, in_guard: np.ndarray, in_train: np.ndarray,
            totals: tuple[int, int]) -> None:
        if name not in self._arrays:
            self._arrays[name] = (np.empty((totals[0], *value.shape[1:]), value.dtype),
                                  np.empty((totals[1], *value.shape[1:]), value.dtype))
            self._filled[name] = [0, 0]
        for which, rows in enumerate((in_guard, in_train)):
            count = int(rows.sum())
            if count:
                start = self._filled[name][which]
                self._arrays[name][which][start : start + count] = value[rows]
                self._filled[name][which] = start + count

    def taken(self, name: str, which: int) -> torch.Tensor:
        """The samples of `name` that passed (0: guard, 1: training), in the order they passed."""
        return torch.from_numpy(self._arrays[name][which][: self._filled[name][which]])


@dataclass(frozen=True)
class BlockFeeds:
    """How a block's inputs other than the per-sample batches are fed."""

    shared: dict[str, torch.Tensor]  # the same for every batch (shape tensors): fed as they are
    folded: frozenset[str]  # held [samples, k, ...], fed as [samples * k, ...]


def _run(net: TorchBlock, xs: Sequence[torch.Tensor], fixed: BlockFeeds, block: Block) -> list[torch.Tensor]:
    it = iter(xs)
    args = []
    for name in block.inputs:
        if name in fixed.shared:
            args.append(fixed.shared[name])
            continue
        x = next(it)
        args.append(x.reshape(-1, *x.shape[2:]) if name in fixed.folded else x)
    return net(*args)


def _token_weights(value: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
    """`tokens` shaped to broadcast over `value` when its leading axes are the tokens' ``[N, T]``, else None."""
    if tokens is None or value.dim() < 2 or tuple(value.shape[:2]) != tuple(tokens.shape):
        return None
    return tokens.reshape(tuple(tokens.shape) + (1,) * (value.dim() - 2))


def _masked_mean(value: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The mean of `value` over the non-padding tokens (every element without a mask)."""
    weights = _token_weights(value, tokens)
    if weights is None:
        return value.mean()
    per_token = value[0, 0].numel()
    return (value * weights).sum() / (weights.sum().clamp(min=1) * per_token)


def _row_blocks(y: torch.Tensor, *others: torch.Tensor | AsSeen | None,
                ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor | AsSeen | None]]]:
    """`y` and `others` (None, or with `y`'s samples first) `STAT_BLOCK_BYTES` of `y` in float64 at a time: a
    statistic over every held sample in one piece made float64 copies of them all (EfficientNet-Lite1's stem
    block, 768 samples of 0.9 MB: 3.9 GB past the held data)."""
    rows = max(1, STAT_BLOCK_BYTES // max(1, 8 * y[0].numel()))
    for start in range(0, int(y.shape[0]), rows):
        part = slice(start, start + rows)
        yield y[part], [None if v is None else v[part] for v in others]


def _masked_average(y: torch.Tensor, tokens: torch.Tensor | None, seen: AsSeen | None,
                    fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The mean of ``fn(y as the norm after it sees it)`` (float64) over the non-padding tokens, a block at a time."""
    total = count = 0.0
    for part, (mask, norm) in _row_blocks(y, tokens, seen):
        assert not isinstance(mask, AsSeen) and not isinstance(norm, torch.Tensor)
        value = fn(_as_seen(part, norm).double())
        weights = _token_weights(value, mask)
        if weights is None:
            total += float(value.sum())
            count += value.numel()
        else:
            total += float((value * weights).sum())
            count += float(weights.sum()) * value[0, 0].numel()
    return total / max(count, 1.0)


def _variance(y: torch.Tensor, tokens: torch.Tensor | None, seen: AsSeen | None = None) -> float:
    """The variance of `y` as the norm after it sees it (`_as_seen`) over the non-padding tokens (two passes)."""
    mean = _masked_average(y, tokens, seen, lambda v: v)
    return _masked_average(y, tokens, seen, lambda v: (v - mean) ** 2)


@dataclass(frozen=True)
class AsSeen:
    """How the norm after a compared output sees it, up to its scale and shift: each token centred over the
    channels (a LayerNorm; not an RMSNorm) and multiplied by ``inverse_std``, the original's ``1 / sigma_t`` (its
    root mean square for an RMSNorm). Indexed like the samples it holds."""

    inverse_std: torch.Tensor  # [samples, ..., 1]
    centred: bool

    def __getitem__(self, index: torch.Tensor | slice) -> AsSeen:
        return AsSeen(self.inverse_std[index], self.centred)


def _seen_by(y: torch.Tensor, norm: NormRead | None) -> AsSeen | None:
    """`AsSeen` of the original's output over its last axis, where a norm reads it (None else)."""
    if norm is None or y.dim() < 2:
        return None
    centred = norm.kind is NormKind.LAYER

    def spread(part: torch.Tensor) -> torch.Tensor:
        part = part.double()
        return part.var(dim=-1, unbiased=False, keepdim=True) if centred else (part * part).mean(dim=-1, keepdim=True)

    inverse = torch.cat([torch.rsqrt(spread(part) + norm.epsilon).float() for part, _ in _row_blocks(y)])
    return AsSeen(inverse, centred)


def _as_seen(value: torch.Tensor, seen: AsSeen | None) -> torch.Tensor:
    """`value` as the norm after it sees it (`AsSeen`): post-LN BERT's tokens differ tenfold in ``sigma_t``, and
    a Llama model's first token carries massive activations, so an error on a wide token is that much smaller after
    the norm. Unchanged where no norm reads it."""
    if seen is None:
        return value
    value = value.float()
    if seen.centred:
        value = value - value.mean(dim=-1, keepdim=True)
    return value * seen.inverse_std


def _rows(values: Sequence[AsSeen | None], index: torch.Tensor | slice) -> list[AsSeen | None]:
    return [None if v is None else v[index] for v in values]


def _loss(net: TorchBlock, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], norms: Sequence[AsSeen | None],
          tokens: torch.Tensor | None, fixed: BlockFeeds, block: Block, scale: Sequence[float]) -> torch.Tensor:
    """The squared error of each compared output to the original's (as a norm after it sees both, `_as_seen`),
    over its variance, summed."""
    outs = _run(net, xs, fixed, block)
    total = torch.zeros((), dtype=torch.float32)
    for out, y, inv, s in zip(outs, ys, norms, scale):
        if tuple(out.shape) != tuple(y.shape):
            raise Unsupported(f"output shape {tuple(out.shape)} differs from the original's {tuple(y.shape)}")
        total = total + _masked_mean((_as_seen(out.float(), inv) - _as_seen(y.float(), inv)) ** 2, tokens) / s
    return total


def _error(net: TorchBlock, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], norms: Sequence[AsSeen | None],
           tokens: torch.Tensor | None, fixed: BlockFeeds, block: Block, scale: Sequence[float], batch: int) -> float:
    """The normalised squared error on held samples (batch by batch, no gradients; a batch counts by its samples)."""
    n = ys[0].shape[0]
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch):
            part = slice(start, start + batch)
            count = min(batch, n - start)
            total += float(_loss(net, [x[part] for x in xs], [y[part] for y in ys], _rows(norms, part),
                                 None if tokens is None else tokens[part], fixed, block, scale)) * count
    return total / max(n, 1)


def _log(result: BlockResult) -> None:
    if result.status is Status.SKIPPED:
        log.info("recover: %s: skipped, %s", result.block.label, result.reason)
        return
    log.info("recover: %s: %d steps in %.1f s on %d samples (%d tries, last at lr %g), guard error %.4g -> %.4g on "
             "%d samples: %s", result.block.label, result.steps, result.seconds, result.train_samples, result.tries,
             result.lr, result.before, result.after, result.guard_samples, result.status.value)


def _notes(results: Sequence[BlockResult], seconds: float) -> tuple[str, ...]:
    kept = [r for r in results if r.status is Status.KEPT]
    tried = [r for r in results if r.status is not Status.SKIPPED]
    notes = [f"recover: {len(kept)} of {len(results)} blocks kept recovered weights in {seconds:.0f} s"
             + (f" (guard error {_mean(r.before for r in kept):.4g} -> {_mean(r.after for r in kept):.4g} on average)"
                if kept else "")
             + (f"; {len(tried) - len(kept)} rejected by the guard" if len(tried) > len(kept) else "")
             + (f"; {retried} kept the weights of a retry at a lower learning rate" if (retried := sum(
                 r.tries > 1 for r in kept)) else "")]
    for r in results:
        if r.status is Status.SKIPPED:
            notes.append(f"recover: {r.block.label} keeps its closed-form weights: {r.reason}")
    return tuple(notes)


def _mean(values: Iterator[float] | Sequence[float]) -> float:
    items = list(values)
    return sum(items) / max(len(items), 1)
