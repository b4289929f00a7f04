"""Calibration samples that carry their own index, and a recorder of which samples each stage reads.

The held-out oracles (`test_verdict`, `test_search`) use these: pixel (0, 0) of sample i holds ``ID_OFFSET + i``,
and every read of the calibration source is recorded with the pipeline's phase at that moment ("load" until the
verdict's reference pass, "reference" during it, "method" after it, "verdict" while a verdict is measured, then
"load" again), so a test can prove which samples fitting, selection and judging saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ID_OFFSET = 1000.0


def tagged_calibration(source: Path, tmp_path: Path, count: int = 120) -> Path:
    """The first `count` images of `source` whose pixel (0, 0) holds ID_OFFSET + the sample's index."""
    images = np.load(source)["input"][:count].copy()
    images[:, 0, 0, 0] = ID_OFFSET + np.arange(count)
    path = tmp_path / "tagged.npz"
    np.savez(path, input=images)
    return path


def sample_ids(batch: dict[str, np.ndarray]) -> set[int]:
    return {int(v - ID_OFFSET) for v in batch["input"][:, 0, 0, 0]}


@dataclass
class SampleReads:
    """What `record_reads` saw: every read with its phase, and the samples of each verdict in order."""

    reads: list[tuple[str, set[int]]] = field(default_factory=list)
    verdicts: list[set[int]] = field(default_factory=list)
    phase: str = "load"

    def seen(self, *phases: str) -> set[int]:
        return set().union(*(ids for when, ids in self.reads if when in phases))


def record_reads(monkeypatch: pytest.MonkeyPatch) -> SampleReads:
    """Patch the calibration loader and the pipeline's reference and verdict functions to record `SampleReads`."""
    import onnxslim_prune.calib as calib_pkg
    from onnxslim_prune.pipeline import judging

    seen = SampleReads()
    real_load, real_reference, real_verdict = calib_pkg.load_calibration, judging.reference_outputs, judging.verdict_of

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calib = real_load(*args, **kwargs)
        inner = calib._read

        def read(start: int, stop: int) -> dict[str, np.ndarray]:
            batch = inner(start, stop)
            seen.reads.append((seen.phase, sample_ids(batch)))
            return batch

        return replace(calib, _read=read)

    def reference(*args: Any, **kwargs: Any) -> Any:
        seen.phase = "reference"
        out = real_reference(*args, **kwargs)
        seen.phase = "method"
        return out

    def verdict(original: Any, pruned: Any, m: Any, fit: Any, gates: Any, progress: Any = None) -> Any:
        seen.verdicts.append(set().union(*(sample_ids(feed) for feed in m.feeds)))
        seen.phase = "verdict"
        out = real_verdict(original, pruned, m, fit, gates, progress)
        seen.phase = "load"
        return out

    monkeypatch.setattr(calib_pkg, "load_calibration", recording_load)
    monkeypatch.setattr(judging, "reference_outputs", reference)
    monkeypatch.setattr(judging, "verdict_of", verdict)
    return seen
