"""The one result writer: ``NAME.json`` and ``NAME.md`` side by side, and the header every result carries.

    from lib.results import environment, header, write_results
    meta = environment()                       # machine, processor, cores, onnxruntime, commit, date
    write_results(out / "latency", {"meta": meta, "rows": rows}, header(meta) + table)

A result is its JSON (what `update_readme.py`, `glance` and the plots read) and its markdown (what
docs/benchmarks.md shows). Both are written to temporary files beside their targets and renamed into
place, so a stopped run leaves the previous pair whole, never a half-written file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .paths import ROOT


def commit(rev: str = "HEAD", root: Path = ROOT) -> str:
    """The short commit of `rev` in `root`'s repository ("?" outside one)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def environment() -> dict[str, Any]:
    """Where a result was measured: machine, processor, cores, onnxruntime's version, the checkout's commit, the date."""
    import onnxruntime as ort

    return {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
            "onnxruntime": ort.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M")}


def header(meta: dict[str, Any]) -> str:
    """One markdown line saying where a result was measured (from `environment`)."""
    return (f"Measured on {meta.get('machine', '?')} ({meta.get('cores', '?')} cores), onnxruntime "
            f"{meta.get('onnxruntime', '?')}, commit {meta.get('commit', '?')}, {meta.get('date', '?')}.")


def write_text(path: Path, text: str) -> None:
    """`text` into `path`, atomically (a temporary file beside it, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any, *, indent: int = 1, sort_keys: bool = False) -> None:
    """`payload` as JSON (non-JSON values as their str), newline-terminated, atomically."""
    write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def write_results(stem: Path, payload: Any, markdown: str | None, *, indent: int = 1, sort_keys: bool = False) -> None:
    """``STEM.json`` (`payload`) and ``STEM.md`` (`markdown`, newline-terminated; None: no markdown): the JSON first,
    so a markdown never describes a JSON that is not there."""
    write_json(stem.with_suffix(".json"), payload, indent=indent, sort_keys=sort_keys)
    if markdown is not None:
        write_text(stem.with_suffix(".md"), markdown if markdown.endswith("\n") else markdown + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """A result's JSON, or `default` when there is none."""
    return json.loads(path.read_text()) if path.exists() else default
