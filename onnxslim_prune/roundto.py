"""``--round-to``: the channel multiples kept counts are rounded to (``auto``, the default of the CLI).

onnxruntime's CPU convolutions run in the NCHWc layout (its default graph optimisations): the
channels are processed in blocks of the vector width, 16 floats with AVX-512, 8 with AVX/AVX2,
4 with NEON or SSE. A channel count that is not a multiple of the block pays for a padded block,
so keeping the next multiple costs (almost) no time. ``benchmarks/bench_round_to.py`` measures it
(``benchmarks/results/round_to.md``); the rule reads the CPU's instruction set once, so it is the
same on every run on the same machine:

    AVX-512F -> 16,   AVX or AVX2 -> 8,   NEON/ASIMD or SSE4.1 -> 4,   otherwise 1.

``auto`` never rounds to less than `AUTO_FLOOR` (8): a model pruned on an SSE or NEON machine keeps
the multiples of 8 its original had, so it stays fast on the AVX2 machines it is likely deployed to.

Per group, ``auto`` keeps the alignment the original had, up to the block (`Rounding.channel_multiple`):
a group of ``c`` channels keeps a multiple of ``gcd(c, block)`` channels. The block is a power of two,
so this is the largest power of two dividing ``c``, capped at the block:

    c = 64, 96, 1280 (block 16)  ->  16     the NCHWc block the original's kernels used, kept
    c = 40, 120, 1000            ->  8      the original was not a multiple of 16, but is of 8 (AVX2's block): kept
    c = 100, 300                 ->  4      (LeNet-300-100: multiples of 4, as the original)
    c = 10                       ->  2
    c = 3                        ->  1      nothing to keep: any count is as aligned as the original

so a kept count never breaks a multiple the original had (up to the block), and a group that is not
a multiple of the block is not forced to one (which would take its MACs budget in big steps for no
kernel gain: its original ran the unblocked path already). Counts are of channels: an attention
head group (one class per head of ``head_dim`` channels) keeps any number of heads when
``head_dim`` is a multiple of the channel multiple. ``--round-to N`` is a fixed multiple of every
group's kept count (of classes: heads for a head group), as before; ``--round-to 1`` turns rounding off.
A group with no smaller multiple than its size is kept whole (`analysis.plan.kept_count`).
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import click

from .channels import Group, Trace
from .errors import UsageError

#: the least channel block ``auto`` rounds to (module docstring)
AUTO_FLOOR = 8


class RoundTo(str, Enum):
    """The symbolic values of ``--round-to``."""

    AUTO = "auto"


#: a ``--round-to`` value as given (the CLI's default is `RoundTo.AUTO`)
RoundToValue = int | RoundTo


@dataclass(frozen=True)
class Rounding:
    """How kept counts are rounded: a fixed `multiple` of classes, or with `adaptive` (``auto``) per group, a
    multiple of ``gcd(channels, multiple)`` channels (module docstring)."""

    multiple: int = 1
    adaptive: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise UsageError(f"--round-to must be a positive integer or 'auto', got {self.multiple!r}")

    @staticmethod
    def of(value: int | str | Rounding | RoundTo) -> Rounding:
        """A `Rounding` from what callers pass (an int is a fixed multiple, as ``--round-to N``; ``"auto"``)."""
        if isinstance(value, Rounding):
            return value
        if isinstance(value, str):
            if value.strip().lower() != RoundTo.AUTO.value:
                raise UsageError(f"--round-to must be a positive integer or 'auto', got {value!r}")
            return auto()
        return Rounding(value)

    def channel_multiple(self, channels: int) -> int:
        """The multiple a group of `channels` channels keeps (a fixed rounding: `multiple` classes)."""
        return math.gcd(channels, self.multiple) if self.adaptive else self.multiple

    def classes(self, group: Group, trace: Trace) -> int:
        """The multiple of `group`'s kept class count (a head group's class is ``head_dim`` channels)."""
        if not self.adaptive:
            return self.multiple
        width = class_width(group, trace)
        channels = self.channel_multiple(group.size * width)
        return channels // math.gcd(channels, width)

    def describe(self) -> str:
        return f"auto ({self.multiple})" if self.adaptive else str(self.multiple)


def class_width(group: Group, trace: Trace) -> int:
    """Channels per class of `group` (1, or ``head_dim`` for attention heads), read from its first space."""
    atoms = trace.space_atoms.get(group.spaces[0]) if group.spaces else None
    return max(1, int(atoms.size) // max(group.size, 1)) if atoms is not None else 1


def auto() -> Rounding:
    """``--round-to auto`` on this machine: the CPU's block, at least `AUTO_FLOOR`, kept per group."""
    return Rounding(max(isa_multiple(), AUTO_FLOOR), adaptive=True)


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


def resolve(value: RoundToValue) -> Rounding:
    """The rounding of a ``--round-to`` value."""
    return Rounding.of(value)


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
