"""Independent probes side by side: a local process pool (``--workers N``) or a Ray cluster (``--ray ADDRESS``).

Each worker process prepares the model once (`api.prepare`: load, calibration data, the original's
outputs on the selection half, the trace) the first time it is handed a probe of this search, and
keeps it for the search's other probes; a probe is one `Prober.probe` there and comes back as its
`Measurement` (a few numbers, never the model). The parent gets the measurements in the order of
the jobs, so a profile measured in parallel is the serial one, figure for figure (the seconds aside).

Local workers start with the ``spawn`` context (no forked copy of the parent's onnxruntime threads).
On Ray each probe is one task; the model's bytes and the settings travel once (``ray.put``), and
paths in the settings (``--calib``, ``--eval``) must be readable where the tasks run. Ray is the
optional extra ``pip install 'onnxslim-prune[ray]'``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import onnx

from ..errors import UsageError
from ..settings import RunSettings

log = logging.getLogger(__name__)

#: what a missing Ray says (the CLI's one line, exit 2)
RAY_MISSING = "--ray needs Ray: pip install 'onnxslim-prune[ray]'"

#: the settings of one search, as a worker receives them: (model bytes, the probes' run settings, margin)
Spec = tuple[bytes, RunSettings, float]


def default_workers() -> int:
    """The cores this process may use (``--workers``' default)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def check_workers(workers: int, ray_address: str | None) -> int:
    """`workers` checked (>= 1); with a Ray address, Ray must be importable."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {workers!r}")
    if ray_address is not None:
        ray_module()
    return workers


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


# ----------------------------------------------------------------------------- in a worker

#: the searches a worker process has prepared, by the digest of their settings
_PROBERS: dict[str, Any] = {}


def _key(spec: Spec) -> str:
    model, settings, margin = spec
    return hashlib.sha256(model + repr((settings, margin)).encode()).hexdigest()


def _prober(key: str, spec: Spec) -> Any:
    from .search import Prober

    if key not in _PROBERS:
        _PROBERS.clear()  # one search at a time: the previous one's model and data are freed
        model, settings, margin = spec
        _PROBERS[key] = Prober(onnx.load_from_string(model), settings, margin=margin)
    return _PROBERS[key]


def probe_in_worker(key: str, spec: Spec, params: Mapping[str, Any]) -> Any:
    """One probe of the search `spec` in this process (prepared on its first probe)."""
    return _prober(key, spec).probe(params)[0]


_SPEC: tuple[str, Spec] | None = None


def _init_local(key: str, spec: Spec) -> None:
    global _SPEC
    _SPEC = (key, spec)


def _probe_local(params: Mapping[str, Any]) -> Any:
    assert _SPEC is not None
    return probe_in_worker(_SPEC[0], _SPEC[1], params)


# ----------------------------------------------------------------------------- in the parent


class Pool:
    """The workers of one search: `measure` runs independent probes and returns their measurements in order."""

    def __init__(self, model: onnx.ModelProto, settings: RunSettings, margin: float, workers: int,
                 ray_address: str | None = None) -> None:
        data = model.SerializeToString()
        self.spec: Spec = (data, settings, margin)
        self.key = _key(self.spec)
        self.ray_address = ray_address
        self._executor: ProcessPoolExecutor | None = None
        self._ray: Any = None
        self._spec_ref: Any = None
        if ray_address is None:
            self.where = f"{workers} local worker processes"
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_local, initargs=(self.key, self.spec))
        else:
            ray = ray_module()
            if not ray.is_initialized():
                ray.init(address=ray_address, log_to_driver=False)
            self._ray = ray
            self._spec_ref = ray.put(self.spec)
            self._task = ray.remote(probe_in_worker)
            self.where = f"the Ray cluster at {ray_address}"

    def measure(self, jobs: Sequence[Mapping[str, Any]], done: Callable[[int], None]) -> list[Any]:
        if self._ray is not None:
            return self._measure_ray(jobs, done)
        assert self._executor is not None
        futures: dict[Future[Any], int] = {self._executor.submit(_probe_local, params): i for i, params in enumerate(jobs)}
        out: list[Any] = [None] * len(jobs)
        pending = set(futures)
        finished = 0
        try:
            while pending:
                complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in complete:
                    out[futures[future]] = future.result()
                    finished += 1
                    done(finished)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return out

    def _measure_ray(self, jobs: Sequence[Mapping[str, Any]], done: Callable[[int], None]) -> list[Any]:
        ray = self._ray
        refs = [self._task.remote(self.key, self._spec_ref, dict(params)) for params in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(jobs)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    out[index[ref]] = ray.get(ref)
                    done(len(jobs) - len(pending))
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
