"""The statistics cache stays within its cap, evicts the least recently used, and never leaves debris.

Unit tests drive `calib.cache` directly with arrays of known size; the CLI and API tests prune a
small conv chain with `ldrf` on seeded random calibration (one statistic per pass is cached) and
check that the written model is byte-identical whether its statistics came from the cache or not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from conftest import check_full

import models as M
from onnxslim_prune import CacheSettings, UsageError, cache_info, clear_cache, prune
from onnxslim_prune.calib import cache as C
from onnxslim_prune.cli import main

N = 1000  # float64 values per test entry: about 8 KB on disk


def _values(i: int) -> dict[str, np.ndarray]:
    return {"v": np.full(N, float(i))}


def _key(i: int) -> list[str]:
    return ["model", "fingerprint", f"test-stat/v1|i={i}"]


def _entry_size(tmp_path: Path) -> int:
    """Bytes of one test entry on disk (all test entries have the same size)."""
    probe = tmp_path / "probe"
    with C.using(CacheSettings(directory=probe)):
        C.store_entry(_key(0), _values(0))
    (entry,) = probe.glob("*.npz")
    return entry.stat().st_size


def _age(directory: Path, i: int, seconds: float) -> None:
    """Make entry `i` look last used `seconds` ago."""
    when = time.time() - seconds
    os.utime(C.cache_path(_key(i), directory), (when, when))


def _store_four_aged(directory: Path) -> None:
    """Entries 0..3 in the current cache (`C.using`), last used 400, 300, 200 and 100 seconds ago: 0 is the oldest."""
    for i in range(4):
        C.store_entry(_key(i), _values(i))
        _age(directory, i, 400 - 100 * i)


def _remaining(directory: Path) -> set[int]:
    present = {p.name for p in directory.glob("*.npz")}
    return {i for i in range(10) if C.cache_path(_key(i), directory).name in present}


def _total(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.npz"))


def test_the_cap_evicts_the_least_recently_used_entries(tmp_path: Path) -> None:
    size = _entry_size(tmp_path)
    cache = tmp_path / "cache"
    settings = CacheSettings(directory=cache, max_bytes=int(4.5 * size))  # room for 4 entries
    with C.using(settings):
        _store_four_aged(cache)
        assert _remaining(cache) == {0, 1, 2, 3} and _total(cache) == 4 * size
        C.store_entry(_key(4), _values(4))
        assert _remaining(cache) == {1, 2, 3, 4}
        _age(cache, 4, 50)
        C.store_entry(_key(5), _values(5))
        C.store_entry(_key(6), _values(6))
        assert _remaining(cache) == {3, 4, 5, 6}
        assert _total(cache) == 4 * size <= settings.max_bytes
        hit = C.load_entry(_key(6))
    assert hit is not None
    np.testing.assert_array_equal(hit["v"], np.full(N, 6.0))  # the survivors hold their numbers
    assert cache_info(settings) == C.CacheInfo(cache, 4, 4 * size, settings.max_bytes, True)


def test_rewriting_an_entry_does_not_count_it_twice(tmp_path: Path) -> None:
    size = _entry_size(tmp_path)
    cache = tmp_path / "cache"
    with C.using(CacheSettings(directory=cache, max_bytes=int(4.5 * size))):
        _store_four_aged(cache)
        C.store_entry(_key(3), {"v": np.full(N, 33.0)})  # a corrupt entry being replaced, say
        hit = C.load_entry(_key(3))
    assert _remaining(cache) == {0, 1, 2, 3} and _total(cache) == 4 * size
    assert hit is not None and float(hit["v"][0]) == 33.0


def test_a_read_refreshes_recency(tmp_path: Path) -> None:
    size = _entry_size(tmp_path)
    cache = tmp_path / "cache"
    with C.using(CacheSettings(directory=cache, max_bytes=int(4.5 * size))):
        _store_four_aged(cache)
        before = C.cache_path(_key(0), cache).stat().st_mtime
        hit = C.load_entry(_key(0))  # the oldest, now the most recently used
        assert hit is not None and float(hit["v"][0]) == 0.0
        assert C.cache_path(_key(0), cache).stat().st_mtime > before + 300
        C.store_entry(_key(4), _values(4))
    assert _remaining(cache) == {0, 2, 3, 4}  # 1 went, not the older-written 0


def test_an_entry_over_a_quarter_of_the_cap_is_not_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    size = _entry_size(tmp_path)
    cache = tmp_path / "cache"
    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return _values(7)

    with C.using(CacheSettings(directory=cache, max_bytes=3 * size)), caplog.at_level(logging.INFO):
        C.store_entry(_key(1), {"small": np.zeros(10)})
        first = C.cached(_key(7), compute)
        second = C.cached(_key(7), compute)
    assert len(calls) == 2  # computed twice: never stored
    np.testing.assert_array_equal(first["v"], second["v"])
    assert _remaining(cache) == {1}  # and nothing was evicted to make room for it
    assert "not caching test-stat" in caplog.text and "--cache-size" in caplog.text


def test_an_interrupted_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"

    def dies(handle: Any, **arrays: Any) -> None:
        handle.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    def disk_full(handle: Any, **arrays: Any) -> None:
        handle.write(b"PK\x03\x04")
        raise OSError(28, "No space left on device")

    with C.using(CacheSettings(directory=cache)):
        monkeypatch.setattr(C.np, "savez", dies)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the run
            C.store_entry(_key(1), _values(1))
        monkeypatch.setattr(C.np, "savez", disk_full)
        with caplog.at_level(logging.WARNING):
            C.store_entry(_key(2), _values(2))  # an error writing the cache only warns
        assert "No space left" in caplog.text
        assert sorted(p.name for p in cache.iterdir()) == []
        monkeypatch.undo()
        C.store_entry(_key(3), _values(3))
        hit = C.load_entry(_key(3))
    assert hit is not None and float(hit["v"][0]) == 3.0
    assert [p.name for p in cache.iterdir()] == [C.cache_path(_key(3), cache).name]


def test_a_stale_temp_file_is_swept_a_fresh_one_and_foreign_files_are_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    stem = C.cache_path(_key(1), cache).stem
    stale, fresh, foreign = cache / f".{stem}.dead1234.tmp", cache / f".{stem}.live5678.tmp", cache / "notes.txt"
    older_version = cache / f"{stem}k2j_3abc.tmp"  # the temp name before the cap
    for path in (stale, fresh, foreign, older_version):
        path.write_bytes(b"x" * 100)
    old = time.time() - C.STALE_TEMP_SECONDS - 60
    for path in (stale, foreign, older_version):
        os.utime(path, (old, old))
    with C.using(CacheSettings(directory=cache, max_bytes=1 << 20)):
        C.store_entry(_key(1), _values(1))
    assert sorted(p.name for p in cache.iterdir()) == sorted([fresh.name, foreign.name, f"{stem}.npz"])


def test_an_entry_deleted_by_another_run_while_reading_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    real_load = np.load

    def evicted_meanwhile(path: Any, **kwargs: Any) -> Any:
        Path(path).unlink()  # another run's eviction, between the lookup and the open
        return real_load(path, **kwargs)

    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return _values(5)

    with C.using(CacheSettings(directory=cache)):
        C.store_entry(_key(5), _values(5))
        monkeypatch.setattr(C.np, "load", evicted_meanwhile)
        with caplog.at_level(logging.WARNING):
            assert C.load_entry(_key(5)) is None
            values = C.cached(_key(5), compute)  # recomputed and stored again
        monkeypatch.undo()
        again = C.load_entry(_key(5))
    assert caplog.text == ""  # a miss, not a corrupt file
    assert len(calls) == 1 and again is not None
    np.testing.assert_array_equal(values["v"], again["v"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CACHE_HOME is the Linux convention")
def test_xdg_cache_home_is_honoured_and_the_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    C.store_entry(_key(1), _values(1))
    assert _remaining(tmp_path / "xdg" / "onnxslim-prune") == {1}
    monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "env"))
    C.store_entry(_key(2), _values(2))
    assert _remaining(tmp_path / "env") == {2}
    monkeypatch.setenv(C.ENV_VAR, "off")
    assert C.resolve_cache_dir() is None
    with C.using(CacheSettings(directory=tmp_path / "given")):  # an explicit folder beats the variable
        assert C.resolve_cache_dir() == tmp_path / "given"
    with C.using(CacheSettings(enabled=False)):
        monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "env"))
        assert C.resolve_cache_dir() is None


def test_cache_sizes_parse_and_bad_ones_are_usage_errors() -> None:
    assert C.parse_cache_size("2G") == C.DEFAULT_MAX_BYTES == 2 << 30
    assert C.parse_cache_size("500M") == 500 << 20
    assert C.parse_cache_size("1.5GiB") == 3 << 29
    assert C.parse_cache_size("4096") == 4096
    for bad in ("0", "10%", "lots", "-1G"):
        with pytest.raises(UsageError, match="--cache-size"):
            C.parse_cache_size(bad)
    with pytest.raises(UsageError, match="positive"):
        CacheSettings(max_bytes=0)


# ----------------------------------------------------------------------------- API and CLI


def _prune_bytes(**kwargs: Any) -> bytes:
    result = prune(M.conv_chain(), "ldrf", 0.5, calib="random", latency=False, **kwargs)
    check_full(result.model)
    assert M.initializer(result.model, "conv1.w").shape == (4, 3, 3, 3)  # 8 output channels, half kept
    return result.model.SerializeToString()


def test_the_api_takes_cache_settings_and_reports_and_clears_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "env"))
    settings = CacheSettings(directory=tmp_path / "given")
    fresh = _prune_bytes(cache=settings)
    info = cache_info(settings)
    assert info.directory == tmp_path / "given" and info.entries >= 1 and info.enabled
    assert info.bytes == _total(tmp_path / "given")
    assert _prune_bytes(cache=settings) == fresh  # statistics read back: the same bytes
    assert _prune_bytes(cache=CacheSettings(enabled=False)) == fresh
    assert not (tmp_path / "env").exists()  # neither run used the default folder
    freed = clear_cache(settings)
    assert (freed.entries, freed.bytes) == (info.entries, info.bytes)
    assert cache_info(settings).entries == 0 and list((tmp_path / "given").iterdir()) == []


def invoke(args: list[Any]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "env"))
    onnx.save(M.conv_chain(), tmp_path / "good.onnx")
    return tmp_path / "good.onnx"


LDRF = ["--method", "ldrf", "--ratio", "0.5", "--calib", "random", "--no-latency", "-q"]


def test_cli_cache_dir_is_used_and_no_cache_writes_nothing(chain: Path, tmp_path: Path) -> None:
    given = tmp_path / "given"
    result = invoke([chain, "-o", "a.onnx", "--cache-dir", given, *LDRF])
    assert result.exit_code == 0, result.output
    entries = sorted(p.name for p in given.iterdir())
    assert entries and all(name.endswith(".npz") for name in entries)
    assert invoke([chain, "-o", "b.onnx", "--cache-dir", given, *LDRF]).exit_code == 0
    assert sorted(p.name for p in given.iterdir()) == entries  # read back, nothing new
    result = invoke([chain, "-o", "c.onnx", "--no-cache", *LDRF])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "env").exists()
    a, b, c = (onnx.load(tmp_path / f"{n}.onnx") for n in "abc")
    check_full(a)
    assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()
    feeds = M.inputs_for(a)
    np.testing.assert_allclose(M.run(a, feeds)[0], M.run(c, feeds)[0], rtol=0, atol=0)


def test_cli_cache_size_below_four_entries_stores_nothing(chain: Path, tmp_path: Path) -> None:
    result = invoke([chain, "-o", "a.onnx", "--cache-dir", tmp_path / "small", "--cache-size", "1K", *LDRF])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "small").glob("*")) == []
    check_full(onnx.load(tmp_path / "a.onnx"))


def test_cli_clear_cache_needs_no_model_and_prints_what_it_freed(chain: Path, tmp_path: Path) -> None:
    given = tmp_path / "given"
    assert invoke([chain, "-o", "a.onnx", "--cache-dir", given, *LDRF]).exit_code == 0
    (given / "mine.txt").write_text("not the cache's")
    held = _total(given)
    count = len(list(given.glob("*.npz")))
    result = invoke(["--clear-cache", "--cache-dir", given])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"cleared {count} cache entries ({C.human_bytes(held)}) from {given}"
    assert [p.name for p in given.iterdir()] == ["mine.txt"]
    again = invoke(["--clear-cache", "--cache-dir", given])
    assert again.exit_code == 0 and again.stdout.startswith("cleared 0 cache entries (0 B)")


@pytest.mark.parametrize("args, message", [
    (["good.onnx", "--clear-cache"], "--clear-cache takes no MODEL"),
    (["--clear-cache", "--no-cache"], "--clear-cache conflicts with --no-cache"),
    (["good.onnx", "--no-cache", "--cache-dir", "d"], "--no-cache conflicts with --cache-dir"),
    (["good.onnx", "--no-cache", "--cache-size", "1G"], "--no-cache conflicts with --cache-size"),
    (["good.onnx", "--cache-size", "half"], "--cache-size 'half'"),
], ids=["model", "no_cache", "dir", "size", "bad_size"])
def test_cli_cache_usage_errors_are_one_line(chain: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]  # nothing written, nothing cleared
