"""Suite-wide (`tests/` and the op tests beside `onnxslim_prune/ops`): no test reads or writes the user's
statistics cache (`calib.cache`), and the process's long-lived objects are frozen out of the garbage collector."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_statistics_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # the variable reaches the library and the CLI subprocesses alike; a test that needs its own folder sets it again
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path_factory.mktemp("statistics-cache")))
        yield


_modules_at_freeze = 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The library calls ``gc.collect()`` after every pass (`calib.memory.give_back`), and a full collection walks
    every object the process tracks: in a CLI run the tool's own, in the test process also pytest's, torch's,
    Ray's and those of every module a test imported (0.1-0.3 s a collection, most of the suite's time). Whenever
    a test has imported new modules, what is alive before it starts is collected once and frozen (`gc.freeze`:
    never walked again; modules and pytest's state live to the end anyway); a test's own objects are collected
    as in a real run."""
    global _modules_at_freeze
    if len(sys.modules) != _modules_at_freeze:
        gc.collect()
        gc.freeze()
        _modules_at_freeze = len(sys.modules)
