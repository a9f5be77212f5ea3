"""Files written whole or not at all: a reader sees the old file, or the new one, never half.

Everything cxrtune writes that another process may read while it is written goes through
here: checkpoints, the dataset cache, a trial's ``evaluation.json``, the report, files
downloaded from remote storage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomically"]


@contextmanager
def atomic_path(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it becomes ``path`` when the block ends.

    If the block raises, ``path`` is left as it was and the temporary file is removed.
    ``durable`` flushes the file to disk before the rename, so that it survives a crash
    of the machine and not only of the process. The temporary name is unique and hidden
    (``.<name>.<random>.partial``), so concurrent writers do not meet and folder
    listings skip it.
    """
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        if durable:
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, content: str | bytes, *, durable: bool = False) -> None:
    """Write ``content`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path, durable=durable) as partial:
        if isinstance(content, str):
            partial.write_text(content, encoding="utf-8")
        else:
            partial.write_bytes(content)
