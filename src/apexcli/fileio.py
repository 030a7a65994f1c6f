"""Writes that never leave half a file: a temp file (or folder) beside the target, then one rename.

Readers see the old content or the new one, never a mix, and a crash mid-write leaves the old
file (or checkpoint folder) intact. Every file apex writes goes through these.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: Path | str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to a temp path beside ``path``, which then replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """``text`` (UTF-8, newlines as given) to ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it replaces ``final`` in one rename, so a
    crash never leaves a half-written checkpoint under the final name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _naming(exc, final) from exc
        except RuntimeError as exc:  # torch.save reports a failed write (a full disk) as a RuntimeError
            raise _naming(OSError(errno.EIO, f"writing failed ({str(exc).splitlines()[0][:120]})"), final) from exc
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with the file it was writing named, so the one-line error says where (a full disk
    raises ENOSPC with no file name from deep inside a library)."""
    if exc.filename:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))
