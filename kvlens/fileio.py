"""Writing files safely: each writer its own temporary file in the target folder, renamed atomically.

Caches (statistics, trigger examples, the converted embedded model) and user files (deltas, data
sets) are written through :func:`atomic_path`, so an interrupted or concurrent write never leaves
a half file under the real name, and two processes writing the same cache never share a
temporary file. :func:`check_folder` refuses a destination folder that does not exist, before
anything is written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvlens.errors import MissingFolder


def check_folder(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a Path whose folder exists; :class:`MissingFolder` naming the folder otherwise."""
    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise MissingFolder(
            f"cannot save the {what} to {str(path)!r}: the folder {str(folder)!r} does not exist; "
            f"create it first (os.makedirs({str(folder)!r}, exist_ok=True)) or choose another path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, make_parents: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; on success rename it onto ``path`` (atomic).

    The temporary name is unique per writer (:func:`tempfile.mkstemp`); on any error, including
    KeyboardInterrupt, it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
