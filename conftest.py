"""Suite-wide: no test reads or writes the user's statistics cache (`calib.cache`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_statistics_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # the variable reaches the library and the CLI subprocesses alike; a test that needs its own folder sets it again
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXSLIM_PRUNE_CACHE", str(tmp_path_factory.mktemp("statistics-cache")))
        yield
