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
