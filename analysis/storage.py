"""Experiment dirs on object storage (``s3://bucket/prefix``), through pyarrow's filesystems.

The one place cxrtune turns a storage URI into a pyarrow filesystem, checks that it
can write there, and copies files between a remote folder and a local one. Ray Tune
is handed the same filesystem (``RunConfig(storage_filesystem=...)``), so trials,
the sweep's own files and the analysis all reach the store the same way.

It lives in ``analysis`` because both the sweep and the analysis need it and
``analysis`` must not import Ray; ``search`` already imports ``analysis`` for the
experiment-dir layout. Only pyarrow (a Ray dependency) is imported.

The endpoint of an S3-compatible store (MinIO, on-prem) is pyarrow's: the
``AWS_ENDPOINT_URL`` environment variable, or ``?endpoint_override=HOST:PORT``
(with ``&scheme=http`` for plain HTTP) on the URI. Credentials come from the usual
AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an
instance role) on every node.

An append-only file (the sweep's Optuna journal) cannot be appended to on object
storage, and uploading it whole after every change costs bytes quadratic in its
length. ``AppendedFile`` keeps it remote as its appended parts instead: a whole copy
of its start, if any, and one segment object per upload holding only the bytes
appended since the one before; ``AppendedFile.fetch`` joins them back into one file.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow
import pyarrow.fs

from cxrtune.trainables.atomic import atomic_path

__all__ = [
    "REDACTED_KEYS",
    "AppendUpload",
    "AppendedFile",
    "RemoteDir",
    "RemoteFile",
    "StorageError",
    "driver_files_dir",
    "has_credentials",
    "is_remote",
    "joined",
    "mirror_dir",
    "redacted",
    "remote_cache_dir",
    "segment_name",
    "unsafe_path_reason",
]

SUPPORTED_SCHEMES = ("s3",)
# Query parameters of pyarrow's S3 URIs that hold keys.
KEY_PARAMETERS = ("access_key", "secret_key", "session_token")
REDACTED_KEYS = "***"  # what ``redacted`` shows in place of keys
WRITE_CHECK_FILE = ".cxrtune-write-check"
CHECKLIST = (
    "check that the bucket exists, that the credentials (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role) may write there, and that the "
    "endpoint is reachable (AWS_ENDPOINT_URL or ?endpoint_override= on the URI for "
    "MinIO and other S3-compatible stores)"
)


# A segment of an appended file is named by its first byte's offset in the file, zero-padded
# to this many digits so that names sort as the offsets do (any size below 10**20 bytes).
SEGMENT_NAME_DIGITS = 20


class StorageError(ValueError):
    """Remote storage that cannot be used; the message names the URI and what failed."""


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``s3://...``) rather than a local or mounted folder."""
    return "://" in str(location)


def redacted(uri: str) -> str:
    """``uri`` with any keys written into it shown as ``***``, for messages and written files.

    The user-info part (``s3://KEY:SECRET@bucket``, ``http://user:password@host``) and
    pyarrow's key parameters (``?access_key=...&secret_key=...``) are hidden. A local
    path is given back as it is.
    """
    if not is_remote(uri):
        return uri
    original = parts = urlsplit(uri)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=f"{REDACTED_KEYS}@" + parts.netloc.rpartition("@")[2])
    if parts.query:
        fields = [field.partition("=") for field in parts.query.split("&")]
        parts = parts._replace(
            query="&".join(
                f"{name}{equals}{REDACTED_KEYS if name in KEY_PARAMETERS else value}"
                for name, equals, value in fields
            )
        )
    # Rebuilt only when changed: urlunsplit would turn sqlite:///x into sqlite:/x.
    return uri if parts == original else urlunsplit(parts)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` holds keys itself (see ``redacted``), not leaving them to the chain."""
    return redacted(uri) != uri


def unsafe_path_reason(path: str, *, folders: bool) -> str | None:
    """Why ``path``, read from storage, must not be joined to a local folder; ``None`` if safe.

    Safe is relative, with no empty, ``.`` or ``..`` part and no backslash, and with no
    ``/`` at all unless ``folders``: a bucket key or a trial id can then never name a
    file outside the folder it is written into.
    """
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is an absolute path"
    if "\\" in path or "\0" in path:
        return "holds a backslash or a NUL character"
    parts = path.split("/")
    if not folders and len(parts) > 1:
        return "holds a path separator"
    if any(part in ("", ".", "..") for part in parts):
        return "holds an empty, '.' or '..' part"
    return None


def joined(location: str | Path, relative_path: str) -> str:
    """``relative_path`` under the folder ``location`` (a path or a URI), for messages.

    In a URI it goes before the query, and keys are left out, as in ``redacted``.
    """
    if not is_remote(location):
        return str(Path(location) / relative_path)
    return redacted(_join_uri(str(location), relative_path))


def _join_uri(uri: str, relative_path: str) -> str:
    """``relative_path`` under the folder ``uri``, before its query."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", relative_path)))


def remote_cache_dir(uri: str) -> Path:
    """This machine's folder for local copies of the remote folder ``uri``.

    Under cxrtune's cache dir (``$CXRTUNE_CACHE_DIR``, default ``~/.cache/cxrtune``),
    keyed by the URI without keys, so every command on this machine finds the same
    folder again.
    """
    from cxrtune.trainables.data import default_cache_dir

    key = hashlib.sha256(redacted(uri).encode()).hexdigest()[:16]
    return default_cache_dir() / "remote" / key


@dataclass(frozen=True)
class RemoteFile:
    """A file under a remote folder: its path relative to the folder, size and change time."""

    relative_path: str  # posix, e.g. "trial_1/result.json"
    size: int
    mtime_ns: int | None  # None when the store does not say


@dataclass(frozen=True)
class RemoteDir:
    """A folder on object storage: the URI as given, its pyarrow filesystem and path there."""

    uri: str  # s3://[KEY:SECRET@]bucket/prefix[?endpoint_override=...], as given
    filesystem: pyarrow.fs.FileSystem
    path: str  # bucket/prefix, as the filesystem names it

    @classmethod
    def open(cls, uri: str) -> RemoteDir:
        """Resolve ``uri`` to its filesystem; nothing is read or written yet.

        Only ``s3://`` is supported; another scheme or a URI without a bucket is a
        ``StorageError``.
        """
        parts = urlsplit(uri)
        if parts.scheme not in SUPPORTED_SCHEMES:
            raise StorageError(
                f"{redacted(uri)}: unsupported storage URI; use a local folder or "
                "s3://bucket/prefix"
            )
        if not parts.netloc:
            raise StorageError(f"{redacted(uri)}: the URI names no bucket (s3://bucket/prefix)")
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        except (OSError, pyarrow.ArrowException) as error:
            # On AWS a URI without ?region= is resolved by asking for the bucket's region.
            raise StorageError(f"cannot open {redacted(uri)}: {error}; {CHECKLIST}") from error
        return cls(uri=uri, filesystem=filesystem, path=path.rstrip("/"))

    @property
    def display(self) -> str:
        """The URI for messages, without any keys written into it."""
        return redacted(self.uri)

    @property
    def name(self) -> str:
        """The last part of the path (the experiment name for an experiment dir)."""
        return posixpath.basename(self.path)

    def child(self, name: str) -> RemoteDir:
        """The folder ``name`` inside this one; the URI keeps its query."""
        return RemoteDir(
            uri=_join_uri(self.uri, name), filesystem=self.filesystem, path=f"{self.path}/{name}"
        )

    @contextmanager
    def _reporting(self, action: str) -> Iterator[None]:
        """Turn the filesystem's errors into a ``StorageError`` naming the URI and ``action``."""
        try:
            yield
        except (OSError, pyarrow.ArrowException) as error:
            raise StorageError(f"cannot {action} {self.display}: {error}; {CHECKLIST}") from error

    def files(self) -> list[RemoteFile]:
        """Every file under this folder, at any depth; none when the folder does not exist."""
        selector = pyarrow.fs.FileSelector(self.path, recursive=True, allow_not_found=True)
        with self._reporting("list"):
            infos = self.filesystem.get_file_info(selector)
        prefix = self.path + "/"
        files = [
            RemoteFile(
                relative_path=info.path.removeprefix(prefix), size=info.size, mtime_ns=info.mtime_ns
            )
            for info in infos
            if info.type == pyarrow.fs.FileType.File
        ]
        for remote in files:
            # Each file may be copied to local_dir / relative_path: that must stay in local_dir.
            if reason := unsafe_path_reason(remote.relative_path, folders=True):
                raise StorageError(
                    f"refusing the key {prefix + remote.relative_path!r} in {self.display}: "
                    f"its path below the folder {reason}, so a local copy could land elsewhere"
                )
        return files

    def check_writable(self) -> None:
        """Write and delete a small file here, so a store that refuses fails before any work.

        Deleting is checked too: Ray deletes checkpoints beyond ``checkpoints_to_keep``.
        """
        probe = f"{self.path}/{WRITE_CHECK_FILE}"
        with self._reporting("write to"):
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"cxrtune write check\n")
            self.filesystem.delete_file(probe)

    def upload(self, local_file: Path, relative_path: str) -> None:
        """Copy ``local_file`` to ``relative_path`` here, replacing what was there."""
        with self._reporting(f"upload {local_file} to"):
            pyarrow.fs.copy_files(
                str(local_file),
                f"{self.path}/{relative_path}",
                destination_filesystem=self.filesystem,
                # Threaded uploads to S3 are unsafe in pyarrow (apache/arrow#32372).
                use_threads=False,
            )

    def upload_bytes(self, data: bytes, relative_path: str, source: Path) -> None:
        """Write ``data`` (read from ``source``, named in errors) to ``relative_path`` here.

        Given whole rather than streamed from ``source``, so a failed read can never
        leave a partial object behind: an object appears whole or not at all.
        """
        path = f"{self.path}/{relative_path}"
        with (
            self._reporting(f"upload {source} to"),
            self.filesystem.open_output_stream(path) as out,
        ):
            out.write(data)

    def read_bytes(self, relative_path: str) -> bytes:
        """The content of the file ``relative_path`` here."""
        path = f"{self.path}/{relative_path}"
        with (
            self._reporting(f"download {relative_path} from"),
            self.filesystem.open_input_stream(path) as stream,
        ):
            return bytes(stream.read())

    def delete_folder(self, relative_path: str) -> None:
        """Delete the folder ``relative_path`` here with everything in it; a missing one is fine."""
        path = f"{self.path}/{relative_path}"
        with self._reporting(f"delete {relative_path} in"):
            if self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
                self.filesystem.delete_dir(path)

    def upload_files(self, local_dir: Path, relative_paths: Iterable[str]) -> None:
        """Copy the given files of ``local_dir`` to the same relative paths here."""
        for relative_path in relative_paths:
            self.upload(local_dir / relative_path, relative_path)

    def download(self, remote: RemoteFile, local_dir: Path) -> None:
        """Copy ``remote`` to the same relative path under ``local_dir``, whole or not at all.

        The local copy takes the remote change time, so ``is_current`` can tell
        whether it needs fetching again.
        """
        target = local_dir / remote.relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as partial:
            with self._reporting(f"download {remote.relative_path} from"):
                pyarrow.fs.copy_files(
                    f"{self.path}/{remote.relative_path}",
                    str(partial),
                    source_filesystem=self.filesystem,
                )
            if remote.mtime_ns is not None:
                os.utime(partial, ns=(remote.mtime_ns, remote.mtime_ns))

    @staticmethod
    def is_current(remote: RemoteFile, local_dir: Path) -> bool:
        """Whether the copy of ``remote`` under ``local_dir`` has its size and change time."""
        target = local_dir / remote.relative_path
        if not target.is_file():
            return False
        stat = target.stat()
        return stat.st_size == remote.size and (
            remote.mtime_ns is None or stat.st_mtime_ns == remote.mtime_ns
        )


def segment_name(offset: int) -> str:
    """The name of the segment that starts at byte ``offset`` of an appended file."""
    return f"{offset:0{SEGMENT_NAME_DIGITS}d}"


@dataclass(frozen=True)
class AppendedFile:
    """An append-only file kept in the remote folder ``folder`` as its appended parts.

    Its parts are a whole copy of its first bytes at ``whole`` (left by ``compact``, or
    by a sweep that uploaded the file whole), then segments in the folder ``segments``,
    each named by the offset of its first byte (``segment_name``) and ending at a line
    end. Parts may overlap, as when a reader lists the folder between ``compact``
    writing the whole copy and deleting the segments; the file is the whole copy
    followed by what each segment adds beyond the bytes before it.
    """

    folder: RemoteDir
    whole: str  # relative path of the whole copy, also the local file ``fetch`` writes
    segments: str  # relative path of the folder of segments

    def parts(self, files: Iterable[RemoteFile]) -> list[tuple[int, RemoteFile]]:
        """The whole copy (at offset 0) and the segments among ``files``, in file order.

        A file in the segments folder whose name is not an offset is a ``StorageError``.
        """
        whole: list[tuple[int, RemoteFile]] = []
        segments = []
        prefix = self.segments + "/"
        for remote in files:
            if remote.relative_path == self.whole:
                whole.append((0, remote))
            elif remote.relative_path.startswith(prefix):
                name = remote.relative_path.removeprefix(prefix)
                if not (name.isdigit() and len(name) == SEGMENT_NAME_DIGITS):
                    raise StorageError(
                        f"{joined(self.folder.uri, remote.relative_path)}: not a segment of "
                        f"{self.whole} (a segment is named by its {SEGMENT_NAME_DIGITS}-digit "
                        "byte offset)"
                    )
                segments.append((int(name), remote))
        return whole + sorted(segments, key=lambda part: part[0])

    def length(self, files: Iterable[RemoteFile]) -> int:
        """How many bytes of the file the parts among ``files`` hold, from the listing alone."""
        length = 0
        for offset, remote in self.parts(files):
            self._check_joins(offset, length)
            length = max(length, offset + remote.size)
        return length

    def fetch(self, files: Iterable[RemoteFile], local_dir: Path) -> bool:
        """Write the file its parts among ``files`` make to ``local_dir / whole``.

        False, and nothing written, when there are no parts. A lone whole copy is
        downloaded only if the local one is not current; parts are joined into a
        ``.partial`` file first, so the local file is replaced whole or not at all.
        A gap between parts (a segment missing) is a ``StorageError`` naming the bytes.
        """
        parts = self.parts(files)
        if not parts:
            return False
        if [remote.relative_path for _, remote in parts] == [self.whole]:
            if not self.folder.is_current(parts[0][1], local_dir):
                self.folder.download(parts[0][1], local_dir)
            return True
        target = local_dir / self.whole
        target.parent.mkdir(parents=True, exist_ok=True)
        length = 0
        with atomic_path(target) as partial, partial.open("wb") as joined_file:
            for offset, remote in parts:
                self._check_joins(offset, length)
                if offset + remote.size <= length:
                    continue  # already held by the parts before (a compaction's leftovers)
                data = self.folder.read_bytes(remote.relative_path)
                joined_file.write(data[length - offset :])
                length = offset + len(data)
        return True

    def _check_joins(self, offset: int, length: int) -> None:
        if offset > length:
            raise StorageError(
                f"{joined(self.folder.uri, self.segments)}: bytes {length} to {offset - 1} "
                f"of {self.whole} are missing (no segment {segment_name(length)})"
            )


class AppendUpload:
    """Uploads a growing local file to an ``AppendedFile``, each byte once.

    ``upload_appended`` sends the lines appended since the last upload as one new
    segment; ``compact`` replaces the parts with one whole copy. A failed upload raises
    ``StorageError`` and leaves ``uploaded`` as it was, so the next one carries its
    bytes. Only whole lines go up: a line still being written waits for the next upload.
    """

    def __init__(self, local_file: Path, remote: AppendedFile) -> None:
        self.local_file = local_file
        self.remote = remote
        self.uploaded = 0  # bytes of the local file the remote parts hold

    def resume(self) -> None:
        """Take ``uploaded`` from the remote parts, for a local file a remote copy exists of.

        When they hold more than the local file (it is not the file they were made from),
        the parts are replaced by a whole copy of the local file.
        """
        length = self.remote.length(self.remote.folder.files())
        if length > self._size():
            self.compact()
        else:
            self.uploaded = length

    def upload_appended(self) -> int:
        """Upload the whole lines appended since the last upload; the bytes sent (0: none)."""
        data = self._lines(self.uploaded)
        if data:
            segment = f"{self.remote.segments}/{segment_name(self.uploaded)}"
            self.remote.folder.upload_bytes(data, segment, self.local_file)
            self.uploaded += len(data)
        return len(data)

    def compact(self) -> int:
        """Upload the file's whole lines as the whole copy, then delete the segments.

        Readers see the same file between the two steps and if the deletion fails. The
        bytes sent are returned.
        """
        data = self._lines(0)
        self.remote.folder.upload_bytes(data, self.remote.whole, self.local_file)
        self.uploaded = len(data)
        self.remote.folder.delete_folder(self.remote.segments)
        return len(data)

    def _size(self) -> int:
        return self.local_file.stat().st_size if self.local_file.exists() else 0

    def _lines(self, start: int) -> bytes:
        """The local file from byte ``start`` up to and with its last line end."""
        if not self.local_file.exists():
            return b""
        with self.local_file.open("rb") as source:
            source.seek(start)
            data = source.read()
        return data[: data.rfind(b"\n") + 1]


@contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """The folder at ``location`` as a local folder to read, for the length of the block.

    A local path is given back as it is. A URI's files are downloaded into a scratch
    folder, deleted when the block ends.
    """
    if not is_remote(location):
        yield Path(location)
        return
    folder = RemoteDir.open(str(location))
    with tempfile.TemporaryDirectory(prefix="cxrtune-copy-") as scratch:
        for remote in folder.files():
            folder.download(remote, Path(scratch))
        yield Path(scratch)


def driver_files_dir(experiment: RemoteDir) -> Path:
    """Where a sweep's driver keeps its own files of the remote experiment dir ``experiment``.

    The files the sweep writes before its trials (``sweep.yaml``, ``splits.csv``, ...)
    are written here and uploaded; the Optuna journal lives here, since an append-only
    file cannot live on object storage, and what is appended to it is uploaded as the
    sweep goes (``AppendUpload``). The folder is the same for every command on this
    machine that names the same URI, so a resumed sweep finds the journal again.
    """
    return remote_cache_dir(experiment.uri) / "driver"


def mirror_dir(experiment: RemoteDir) -> Path:
    """The local mirror of the remote experiment dir ``experiment`` that the analysis reads.

    Named like the experiment, as reports and MLflow take the name from the folder.
    Kept apart from ``driver_files_dir`` so that refreshing the mirror can never put an
    older journal over the one a running sweep appends to.
    """
    return remote_cache_dir(experiment.uri) / "mirror" / experiment.name
