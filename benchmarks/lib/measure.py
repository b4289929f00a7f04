"""Run a command in a child process and measure its wall time and its own peak memory.

    from measure import run_measured
    run = run_measured([sys.executable, "-m", "onnxslim_prune.cli", ...], timeout=900)
    run.seconds, run.peak_mib, run.returncode, run.stderr
    run, report = prune_cli(model, ["--method", "l1", "--ratio", "0.5"], timeout=900)  # report: the --report JSON

The peak is the child's ``ru_maxrss`` read with ``os.wait4`` on that very child, so each
measurement is its own (``RUSAGE_CHILDREN`` would report the largest child so far).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_mib: float
    stderr: str
    timed_out: bool


def run_measured(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` (stdout discarded), kill it after `timeout` seconds; time and peak RSS of the child."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err, env=env)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Measured(proc.returncode, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), text, killed.is_set())


def prune_cli(
    model: Path, args: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[Measured, dict[str, Any] | None]:
    """``onnx-prune MODEL ARGS`` in a fresh process, writing to a scratch folder: its measurement and its
    ``--report`` JSON (None when it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--report", str(report), "-q", *args]
        run = run_measured(cmd, timeout=timeout, env=env)
        ok = run.returncode == 0 and not run.timed_out and report.exists()
        return run, json.loads(report.read_text()) if ok else None


def failure(run: Measured) -> str:
    """One line saying why a measured run failed."""
    return "timeout" if run.timed_out else (run.stderr.strip().splitlines() or ["?"])[-1][:200]


def prune_cli_keep(
    model: Path, args: Sequence[str], out_dir: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[Measured, dict[str, Any] | None, Path | None]:
    """``onnx-prune MODEL ARGS`` in a fresh process, writing ``out.onnx`` and ``report.json`` into `out_dir`
    (kept): its measurement, the report (read whatever the exit code, so a missed gate's exit 3 still has
    one; None when none was written) and the pruned model's path (None when none was written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out, report = out_dir / "out.onnx", out_dir / "report.json"
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "onnxslim_prune.cli", str(model), "-o", str(out), "--report", str(report), "-q", *args]
    run = run_measured_isolated(cmd, timeout=timeout, env=env)
    data = json.loads(report.read_text()) if not run.timed_out and report.exists() else None
    return run, data, out if not run.timed_out and out.exists() else None


#: runs argv[2:] as its own child and writes "exit_code ru_maxrss_kib" of that child to argv[1]
_TRAMPOLINE = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "open(sys.argv[1], 'w').write(f'{code} {usage.ru_maxrss}')\n"
    "sys.exit(code if code >= 0 else 1)\n"
)


def run_measured_isolated(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> Measured:
    """`run_measured` for a large parent: the same fields, but the peak is that of `cmd` alone.

    On Linux a child's ``ru_maxrss`` starts from the high-water mark of the memory it was forked
    (vforked) from, so `run_measured` in a process holding 2 GB reports about 2 GB for
    ``python -c pass``. Here a small trampoline process starts `cmd` and reads its rusage: the
    trampoline's own image is fresh after exec, so the grandchild's peak is its own. On timeout
    the whole process group is killed.
    """
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rusage"
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(result), *cmd], stdout=subprocess.DEVNULL,
                                stderr=err, env=env, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        err.seek(0)
        text = err.read().decode(errors="replace")
        code, peak_kib = proc.returncode, 0
        if result.exists():
            code_text, peak_text = result.read_text().split()
            code, peak_kib = int(code_text), int(peak_text)
    return Measured(code, round(seconds, 2), round(peak_kib / 1024, 1), text, killed.is_set())


def verdict_cosine(verdict: dict[str, Any]) -> float | None:
    """The report's output cosine; a data-free run keeps it under ``random_inputs`` (structure evidence only)."""
    if verdict.get("cosine") is not None:
        return float(verdict["cosine"])
    structure = verdict.get("random_inputs") or {}
    return None if structure.get("cosine") is None else float(structure["cosine"])
