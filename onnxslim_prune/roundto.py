"""``--round-to auto``: the channel multiple that makes onnxruntime's CPU kernels fast on this machine.

onnxruntime's CPU convolutions run in the NCHWc layout (its default graph optimisations): the
channels are processed in blocks of the vector width, 16 floats with AVX-512, 8 with AVX/AVX2,
4 with NEON or SSE. A channel count that is not a multiple of the block pays for a padded block,
so keeping the next multiple costs (almost) no time. ``benchmarks/bench_round_to.py`` measures it
(``benchmarks/results/round_to.md``); the rule reads the CPU's instruction set once, so it is the
same on every run on the same machine:

    AVX-512F -> 16,   AVX or AVX2 -> 8,   NEON/ASIMD or SSE4.1 -> 4,   otherwise 1.

Groups smaller than two blocks are exempt in effect: `passes.plan.kept_count` keeps a group whole
when no smaller multiple exists.
"""

from __future__ import annotations

import functools
import platform
from enum import Enum
from pathlib import Path
from typing import Any

import click

from .errors import UsageError


class RoundTo(str, Enum):
    """The symbolic values of ``--round-to``."""

    AUTO = "auto"


#: what ``--round-to`` means when not given: 1 (plain and MACs/params runs), auto with ``--objective latency``
RoundToValue = int | RoundTo


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``: ``flags`` on x86, ``Features`` on ARM); empty when unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def isa_multiple(flags: frozenset[str] | None = None, machine: str | None = None) -> int:
    """The NCHWc block of onnxruntime's CPU kernels for these flags (module docstring)."""
    flags = cpu_flags() if flags is None else flags
    machine = (platform.machine() if machine is None else machine).lower()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    if "asimd" in flags or "neon" in flags or machine in ("arm64", "aarch64") or "sse4_1" in flags:
        return 4
    return 1


def resolve(value: RoundToValue) -> int:
    """The channel multiple of a ``--round-to`` value."""
    if isinstance(value, RoundTo):
        return isa_multiple()
    if value < 1:
        raise UsageError(f"--round-to must be a positive integer or 'auto', got {value}")
    return value


class RoundToParam(click.ParamType):
    """``--round-to N`` or ``--round-to auto``."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> RoundToValue:
        if isinstance(value, (int, RoundTo)):
            return value
        text = str(value).strip().lower()
        if text == RoundTo.AUTO.value:
            return RoundTo.AUTO
        try:
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)
