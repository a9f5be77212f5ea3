"""The places on this machine that a command writes to, checked before it does any work.

Every output option (``predict --csv`` and ``--gradcam``, ``report --out``,
``export --out``, a local ``storage_path``, the folder of ``data synth``) goes
through ``writable_folder``, ``writable_file`` or ``writable_parent`` first:
missing parent folders are created, and a file in the way or a place that
refuses writes stops the command at once, naming the option and the path,
instead of after minutes of work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["OutputError", "writable_file", "writable_folder", "writable_parent"]

WRITE_CHECK_PREFIX = ".cxrtune-write-check-"


class OutputError(ValueError):
    """A place the user asked cxrtune to write to cannot take files; the message names it."""


def writable_folder(path: str | Path, *, option: str) -> Path:
    """Create the folder ``path`` and its missing parents; check a file can be written in it.

    Raises ``OutputError`` naming ``option`` and ``path``.
    """
    folder = Path(path).expanduser()
    _prepare(folder, f"{option} {path}")
    return folder


def writable_file(path: str | Path, *, option: str) -> Path:
    """Check that the file ``path`` can be written, creating its missing parent folders.

    An existing file is left as it is (the command replaces it later); an existing
    folder at ``path`` is an ``OutputError``.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give the name of a file to write")
    _prepare(file.parent, f"{option} {path}")
    return file


def writable_parent(path: str | Path, *, option: str) -> Path:
    """Check that a new file or folder ``path`` can be made, creating its missing parents.

    For outputs written beside their final place and renamed into it; what may already
    be at ``path`` is for the caller to judge.
    """
    target = Path(path).expanduser()
    _prepare(target.parent, f"{option} {path}")
    return target


def _prepare(folder: Path, shown: str) -> None:
    """Create ``folder``, then write and delete a small file in it.

    Writing is the only true test: permission bits say nothing to root, nor about a
    read-only mount.
    """
    for ancestor in (folder, *folder.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise OutputError(
                    f"{shown}: cannot write there, {ancestor} is a file, not a folder"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_CHECK_PREFIX):
            pass
    except OSError as error:
        raise OutputError(f"{shown}: cannot write there ({error.strerror or error})") from error
