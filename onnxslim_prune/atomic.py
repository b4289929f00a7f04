"""The one writer of a run's outputs (model, its external data, report, plot): all of them or none.

Every file is first written to a temporary file of its own (``tempfile.mkstemp`` in the target's folder,
so concurrent runs never share a name and a rename never crosses file systems) and flushed to disk. Only
when every temporary is complete are they renamed over their targets, in the order they were staged
(a model's external data before the model that points at it, the report last), under an exclusive lock
of each folder so two runs writing the same outputs cannot interleave their files; then the folders are
synced. A failure or Ctrl-C at any point removes the temporaries this run created, and a failure between
two renames also undoes the renames already done (the replaced files come back from hard links taken
before). A file this run did not create is never removed.

    with Outputs() as out:
        out.add_bytes(Path("m.onnx"), data)
        out.add_text(Path("r.json"), text)
        out.commit()
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staged:
    """One output: the temporary holding its bytes and the path it is renamed to."""

    target: Path
    temp: Path


def cannot_write(path: Path, exc: OSError) -> UsageError:
    """The one-line error of an output that cannot be written (exit 2: nothing is written)."""
    return UsageError(f"{path}: cannot write: {exc.strerror or exc}")


def temporary(folder: Path, name: str) -> Path:
    """A new, empty, uniquely named file in `folder` (hidden, named after `name`); the caller owns it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{folder}: cannot write there: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(tmp)


def default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; a written output gets the usual 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class Outputs:
    """The files of one run, staged as temporaries and committed together (see the module docstring)."""

    def __init__(self) -> None:
        self._staged: list[Staged] = []
        self._committed = False

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()  # committed temporaries are gone already; anything else is removed, also on Ctrl-C

    def stage(self, target: Path) -> Path:
        """A new temporary for `target` (written by the caller), committed with the others."""
        target = Path(target)
        if self._committed:
            raise RuntimeError("outputs already committed")
        if any(s.target.resolve() == target.resolve() for s in self._staged):
            raise UsageError(f"{target}: given for two outputs; choose another path")
        folder = target.parent if str(target.parent) else Path(".")
        temp = temporary(folder, target.name)
        self._staged.append(Staged(target, temp))
        return temp

    def drop(self, target: Path) -> None:
        """Forget a staged output (its temporary is removed): nothing is written to `target`."""
        for s in [s for s in self._staged if s.target == Path(target)]:
            self._staged.remove(s)
            s.temp.unlink(missing_ok=True)

    def add_bytes(self, target: Path, data: bytes) -> None:
        temp = self.stage(target)
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise cannot_write(target, exc) from None

    def add_text(self, target: Path, text: str) -> None:
        self.add_bytes(target, text.encode("utf-8"))

    def commit(self) -> None:
        """Sync every temporary, then rename them all over their targets; on any failure, undo and raise."""
        if self._committed:
            raise RuntimeError("outputs already committed")
        for s in self._staged:  # before any rename: a full disk or an I/O error surfaces here
            try:
                default_permissions(s.temp)
                _fsync(s.temp)
            except OSError as exc:
                raise cannot_write(s.target, exc) from None
        folders = sorted({s.temp.parent.resolve() for s in self._staged})
        with _locked(folders):
            done: list[tuple[Staged, Path | None]] = []
            try:
                for s in self._staged:
                    done.append((s, _backup(s.target)))  # recorded first: an interrupted rename is undone too
                    os.replace(s.temp, s.target)
            except BaseException as exc:
                _undo(done)
                if isinstance(exc, OSError):
                    raise cannot_write(s.target, exc) from None
                raise
            self._committed = True
            for _, backup in done:
                if backup is not None:
                    backup.unlink(missing_ok=True)
        for folder in folders:
            _fsync_folder(folder)

    def discard(self) -> None:
        """Remove every temporary not yet committed (only files this object created)."""
        if not self._committed:
            for s in self._staged:
                s.temp.unlink(missing_ok=True)
        self._staged = []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # our own file; Windows syncs only a writable descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable; some platforms (Windows) and file systems cannot sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folders: list[Path]) -> Iterator[None]:
    """An exclusive flock on each folder (in sorted order), so concurrent runs commit one after another."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the renames are still atomic one by one
        yield
        return
    fds: list[int] = []
    try:
        for folder in folders:
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock: go on unlocked
                pass
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the lock


def _backup(target: Path) -> Path | None:
    """A hard link to the file `target` replaces, so a failed commit can restore it; None when there is none."""
    if not target.is_file() or target.is_symlink():
        return None
    backup = temporary(target.parent if str(target.parent) else Path("."), target.name + ".old")
    backup.unlink()
    try:
        os.link(target, backup)
    except OSError:  # no hard links here: a failure after this rename cannot bring the old file back
        return None
    return backup


def _undo(done: list[tuple[Staged, Path | None]]) -> None:
    """Put back what the renames replaced (newest first) and remove the files this commit created."""
    for s, backup in reversed(done):
        try:
            if s.temp.exists():  # not renamed: the target is untouched
                if backup is not None:
                    backup.unlink(missing_ok=True)
            elif backup is not None:
                os.replace(backup, s.target)
            else:
                s.target.unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not undo the write of %s: %s", s.target, exc)
