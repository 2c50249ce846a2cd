"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one,
never half of one.

Each write goes to a temporary file with a unique name in the target's directory (so two writers
never share one), is flushed to disk, and replaces the target with ``os.replace`` (atomic on
POSIX and Windows within one file system). No JAX here: programs use it before importing JAX.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """``with atomic_write(path) as handle: ...`` writes ``path`` atomically; on an exception
    inside the block the target is left as it was and the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                             suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_json(path: str, data, indent: int | None = 2) -> None:
    """``data`` as JSON in ``path``, atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=indent)


def write_text(path: str, text: str) -> None:
    """``text`` in ``path``, atomically."""
    with atomic_write(path) as handle:
        handle.write(text)
