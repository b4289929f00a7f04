"""Which channel multiples make onnxruntime's CPU kernels fast here: the evidence for ``--round-to auto``.

    OMP_NUM_THREADS=1 python benchmarks/bench_round_to.py

One layer per model, batch 1, channels ``c`` in and out (a pruned layer loses channels on both
sides): Conv 3x3 and Conv 1x1 on 28x28 (NCHW), depthwise Conv 3x3 on 28x28, and MatMul of 196
tokens by ``c x c``. For each base (64, 128, 256) every ``c`` from ``base - 16`` to ``base`` is timed
(onnxruntime default session, ``intra_op_num_threads = 1``; the models of one base are timed in
interleaved rounds by the calling thread's CPU time, median per model). For a multiple ``m`` the *penalty* of a count ``c`` that is
not a multiple of ``m`` is ``time(c) / time(ceil_m(c))``: above 1, keeping the next multiple (more
channels) is faster than keeping ``c``. Writes ``results/round_to.md`` and ``results/round_to.json``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lib.internals import cpu_flags, isa_multiple
from lib.paths import RESULTS
from lib.results import environment, write_results

BASES = (64, 128, 256)
MULTIPLES = (4, 8, 16, 32)
SPATIAL = 28
TOKENS = 196


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: tuple[int, ...], y: tuple[int, ...]) -> bytes:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def conv(c: int, k: int, depthwise: bool = False) -> bytes:
    rng = np.random.default_rng(c)
    w = rng.standard_normal((c, 1 if depthwise else c, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[k // 2] * 4, group=c if depthwise else 1)
    shape = (1, c, SPATIAL, SPATIAL)
    return _model([node], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")], shape, shape)


def matmul(c: int) -> bytes:
    w = np.random.default_rng(c).standard_normal((c, c)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                  (1, TOKENS, c), (1, TOKENS, c))


LAYERS: dict[str, Callable[[int], bytes]] = {
    "conv3x3": lambda c: conv(c, 3), "conv1x1": lambda c: conv(c, 1),
    "dwconv3x3": lambda c: conv(c, 3, depthwise=True), "matmul": matmul,
}


def time_counts(build: Callable[[int], bytes], counts: list[int], rounds: int) -> dict[int, float]:
    """Median ms per count, the counts' sessions run in interleaved rounds (order rotating each round)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sessions, feeds = {}, {}
    for c in counts:
        sess = ort.InferenceSession(build(c), opts, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
        feeds[c] = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        sessions[c] = sess
        for _ in range(3):
            sess.run(None, feeds[c])
    times: dict[int, list[float]] = {c: [] for c in counts}
    for r in range(rounds):
        order = counts[r % len(counts):] + counts[:r % len(counts)]
        for c in order:
            t0 = time.thread_time()  # the calling thread's CPU time: the whole run with one intra-op thread
            sessions[c].run(None, feeds[c])
            times[c].append(time.thread_time() - t0)
    return {c: 1e3 * statistics.median(v) for c, v in times.items()}


def penalties(ms: dict[int, float], m: int) -> list[float]:
    """time(c) / time(next multiple of m) for the counts that are not multiples of m (and whose multiple was timed)."""
    out = []
    for c, t in ms.items():
        up = math.ceil(c / m) * m
        if c % m and up in ms:
            out.append(t / ms[up])
    return out


#: MACs grow as c^2 for dense layers (channels in and out), as c for depthwise
POWER = {"conv3x3": 2, "conv1x1": 2, "dwconv3x3": 1, "matmul": 2}
CLASSES = (1, 2, 4, 8, 16)


def divisor_class(c: int) -> int:
    """The largest of CLASSES dividing c (16: a multiple of 16)."""
    return max(d for d in CLASSES if c % d == 0)


def excess(ms: dict[int, float], base: int, power: int) -> dict[int, list[float]]:
    """Time over MACs-proportional time (the base's ms scaled by (c / base)^power), per divisor class of c."""
    out: dict[int, list[float]] = {d: [] for d in CLASSES}
    for c, t in ms.items():
        if c != base:
            out[divisor_class(c)].append(t / (ms[base] * (c / base) ** power))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, dict[str, dict[int, float]]] = {}
    for name, build in LAYERS.items():
        results[name] = {}
        for base in BASES:
            counts = list(range(base - 16, base + 1))
            results[name][str(base)] = time_counts(build, counts, args.rounds)
            print(f"{name} base {base}: " + " ".join(f"{c}:{t:.3f}" for c, t in results[name][str(base)].items()),
                  flush=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, per_base in results.items():
        summary[name] = {}
        for m in MULTIPLES:
            p = [x for ms in per_base.values() for x in penalties(ms, m)]
            summary[name][str(m)] = {"median": statistics.median(p), "mean": statistics.fmean(p),
                                     "slower_share": sum(x > 1.0 for x in p) / len(p)}
    by_class: dict[str, dict[str, float]] = {}
    for name, per_base in results.items():
        pooled: dict[int, list[float]] = {d: [] for d in CLASSES}
        for base, ms in per_base.items():
            for d, v in excess(ms, int(base), POWER[name]).items():
                pooled[d].extend(v)
        by_class[name] = {str(d): statistics.median(v) for d, v in pooled.items() if v}
    flags = cpu_flags()
    isa = isa_multiple(flags)
    payload = {**environment(), "isa_rule": isa,
               "isa_flags": sorted(f for f in flags if f.startswith(("avx", "sse4", "asimd", "neon"))),
               "spatial": SPATIAL, "tokens": TOKENS, "rounds": args.rounds, "ms": results, "penalty": summary, "excess_by_class": by_class,
               "seconds": time.perf_counter() - started}
    lines = [
        "# Which channel multiples matter (`--round-to auto`)", "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_round_to.py`. One layer per model at batch 1, `c` channels in "
        f"and out: Conv 3x3 / Conv 1x1 / depthwise Conv 3x3 on {SPATIAL}x{SPATIAL}, MatMul of {TOKENS} tokens by c x c; every "
        "c from base-16 to base for bases 64, 128, 256; onnxruntime CPU, default graph optimisations, one intra-op thread; "
        f"the models of one base timed in {args.rounds} interleaved rounds, median each, by the calling thread's CPU time "
        "(`time.thread_time`; the machine is shared with other jobs, which inflate wall time but hardly CPU time, and "
        "interleaving moves all counts alike). The *penalty* of a count c that is not a multiple of m is "
        "time(c) / time(next multiple of m): above 1 means keeping more channels (the multiple) is faster.", "",
        f"onnxruntime {ort.__version__}, {platform.machine()}; ISA flags {', '.join(payload['isa_flags']) or 'none'}; "
        f"the rule `--round-to auto` resolves to **{isa}** here.", "",
        "| layer | " + " | ".join(f"m={m}: median penalty (share slower)" for m in MULTIPLES) + " |",
        "|---|" + "---:|" * len(MULTIPLES),
    ]
    for name, per_m in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{per_m[str(m)]['median']:.3f} ({per_m[str(m)]['slower_share']:.0%})"
                                               for m in MULTIPLES) + " |")
    lines += ["", "Time over MACs-proportional time (the base's time scaled by (c/base)^2, depthwise ^1), median, by the "
              "largest of 1/2/4/8/16 dividing c: 1.00 means the count costs what its MACs say; above it, the kernel pays "
              "for a padded block.", "",
              "| layer | " + " | ".join(f"c % {d} == 0" + (" (not 2d)" if d < 16 else "") for d in CLASSES) + " |",
              "|---|" + "---:|" * len(CLASSES)]
    for name, per_d in by_class.items():
        lines.append(f"| {name} | " + " | ".join(f"{per_d.get(str(d), float('nan')):.2f}" for d in CLASSES) + " |")
    conv = results["conv3x3"]["128"]
    dw = results["dwconv3x3"]["128"]
    odd = [conv[c] for c in range(113, 128)]
    lines += ["", f"Finding: a dense Conv 3x3 with c = 112 (a multiple of 16) takes {conv[112]:.3f} ms, every c in 113..127 "
              f"{min(odd):.3f}-{max(odd):.3f} ms and c = 128 {conv[128]:.3f} ms: removing channels below a multiple of 16 "
              f"buys nothing until the next multiple of 16 down (the NCHWc block, {isa} here); counts that are not multiples "
              f"of 4 are slower still. Depthwise Conv: multiples of 4 take {dw[116]:.3f}-{dw[124]:.3f} ms, the others "
              f"{min(dw[c] for c in range(113, 128) if c % 4):.3f}-{max(dw[c] for c in range(113, 128) if c % 4):.3f} ms. "
              "Conv 1x1 and MatMul (GEMM paths) barely depend on the multiple. Hence `auto` = the NCHWc block of the CPU.",
              "", "Median ms per channel count (base 128):", "",
              "| c | " + " | ".join(LAYERS) + " |", "|---:|" + "---:|" * len(LAYERS)]
    for c in range(112, 129):
        lines.append(f"| {c} | " + " | ".join(f"{results[n]['128'][c]:.3f}" for n in LAYERS) + " |")
    write_results(args.out / "round_to", payload, "\n".join(lines), indent=2, sort_keys=True)
    print(f"wrote {args.out / 'round_to.md'} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
