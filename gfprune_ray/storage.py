"""Where results go: a local folder, or a folder in object storage that `pyarrow.fs` reaches.

`--out s3://bucket/prefix` (or gs://, abfs://, hdfs://: any URI `pyarrow.fs.FileSystem.from_uri`
takes, its options in the query, e.g. `?endpoint_override=host:9000&scheme=http`) lets a cluster
without a shared file system keep its pruned models: each unit's task writes its model there
itself, so only a path travels to the driver. Credentials come from the environment, as pyarrow
reads them (AWS_ACCESS_KEY_ID and friends), on every node.

Object stores cannot rename a folder, so the local folders' write-aside-and-rename becomes:
write the folder on local disk, then upload it file by file with its record (gfprune.json)
last. A remote folder counts as written only once its record is there; replacing one deletes
the record first, so a reader never takes a half-replaced folder for a whole one.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError, first_line
from .outputs import RECORD_FILE, check_writable_folder, read_record, record_from, staged_output

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass(frozen=True)
class RemoteFolder:
    """A folder in object storage: `base` is scheme://bucket/path, `query` the filesystem's options."""

    base: str
    query: str = ""

    @classmethod
    def parse(cls, uri: str) -> RemoteFolder:
        base, _, query = uri.partition("?")
        folder = cls(base.rstrip("/"), query)
        if not urlsplit(folder.base).path.strip("/"):  # prune keeps cofi/flop checkpoints beside OUT: it needs a parent
            raise UserError(f"{folder.shown()}: give a folder inside the bucket, e.g. {folder.shown()}/runs")
        return folder

    def __truediv__(self, name: str) -> RemoteFolder:
        return RemoteFolder(f"{self.base}/{name}", self.query)

    def __str__(self) -> str:
        return f"{self.base}?{self.query}" if self.query else self.base

    @property
    def name(self) -> str:
        return self.base.rpartition("/")[2]

    @property
    def parent(self) -> RemoteFolder:
        return RemoteFolder(self.base.rpartition("/")[0], self.query)

    def shown(self) -> str:
        """The address without credentials a user may have put in it (s3://KEY:SECRET@bucket)."""
        parts = urlsplit(self.base)
        return self.base.replace(f"{parts.username}:{parts.password}@", "") if parts.password else self.base

    def open(self):
        """(pyarrow filesystem, path inside it); a one-line error when the URI is not one pyarrow takes."""
        import pyarrow.fs as pafs

        try:
            filesystem, path = pafs.FileSystem.from_uri(str(self))
        except (ValueError, OSError, TypeError) as exc:
            raise UserError(f"{self.shown()}: not a storage location pyarrow can open ({first_line(exc)})") from None
        return filesystem, path.rstrip("/")


Location = Path | RemoteFolder


def location(value: str | Path | RemoteFolder) -> Location:
    """A local folder as an absolute path (tasks on other nodes resolve a relative one against
    their own working directory), or a remote folder given by its URI."""
    if isinstance(value, RemoteFolder):
        return value
    text = str(value)
    if text.startswith("file://"):
        return Path(urlsplit(text).path).absolute()
    if _URI.match(text):
        return RemoteFolder.parse(text)
    return Path(text).expanduser().absolute()


def shown(where: Location) -> str:
    return where.shown() if isinstance(where, RemoteFolder) else str(where)


def _info(folder: RemoteFolder, name: str):
    filesystem, path = folder.open()
    try:
        return filesystem.get_file_info(f"{path}/{name}")
    except OSError as exc:
        raise UserError(f"{folder.shown()}: cannot read ({first_line(exc)})") from None


def is_written(folder: Location) -> bool:
    """A local folder that exists; a remote one whose record was uploaded (it is whole)."""
    if isinstance(folder, Path):
        return folder.is_dir()
    import pyarrow.fs as pafs

    return _info(folder, RECORD_FILE).type == pafs.FileType.File


def _is_empty(folder: RemoteFolder) -> bool:
    import pyarrow.fs as pafs

    filesystem, path = folder.open()
    try:
        return not filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise UserError(f"{folder.shown()}: cannot read ({first_line(exc)})") from None


def read_record_at(folder: Location) -> dict:
    """The record (gfprune.json) of a folder written by `prune` or a sweep; a one-line error when
    it is not one."""
    if isinstance(folder, Path):
        return read_record(folder)
    filesystem, path = folder.open()

    def read() -> bytes:
        with filesystem.open_input_stream(f"{path}/{RECORD_FILE}") as stream:
            return stream.read()

    return record_from(read, folder.shown())


def check_writable(where: Location, what: str) -> None:
    """Fail in one line, before any work, when `where` cannot be written: for object storage a
    real probe object is written and deleted (a wrong bucket, endpoint or credentials fail here)."""
    if isinstance(where, Path):
        check_writable_folder(where, what)
        return
    filesystem, path = where.open()
    probe = f"{path}/.gfprune-ray-probe-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"probe")
        filesystem.delete_file(probe)
    except OSError as exc:
        raise UserError(f"{what} {where.shown()}: cannot write there ({first_line(exc)})") from None


def remove(folder: Location) -> None:
    """Delete a folder and what it holds; nothing when it is not there."""
    if isinstance(folder, Path):
        shutil.rmtree(folder, ignore_errors=True)
        return
    filesystem, path = folder.open()
    try:
        filesystem.delete_dir(path)
    except FileNotFoundError:
        pass


def upload(local: Path, folder: RemoteFolder, replace: bool) -> None:
    """Copy the files of `local` into `folder`, the record last. With `replace`, what `folder`
    held goes first, its record before anything else."""
    import pyarrow.fs as pafs

    filesystem, path = folder.open()
    try:
        if replace:
            if _info(folder, RECORD_FILE).type == pafs.FileType.File:
                filesystem.delete_file(f"{path}/{RECORD_FILE}")
            filesystem.delete_dir_contents(path, missing_dir_ok=True)
        files = sorted(f for f in local.rglob("*") if f.is_file())
        files.sort(key=lambda f: f == local / RECORD_FILE)  # stable: the record goes last
        for file in files:
            pafs.copy_files(str(file), f"{path}/{file.relative_to(local).as_posix()}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    except OSError as exc:
        raise UserError(f"cannot write to {folder.shown()}: {first_line(exc)}") from None


def download(folder: RemoteFolder, into: Path) -> None:
    """The files of `folder`, put directly into the local folder `into`."""
    import pyarrow.fs as pafs

    filesystem, path = folder.open()
    into.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(into), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise UserError(f"cannot read {folder.shown()}: {first_line(exc)}") from None


@contextmanager
def staged_folder(out: Location, force: bool = False) -> Iterator[Path]:
    """A local folder to write a result in, put in place at `out` only if the block succeeds (see
    the module's docstring for object storage). Without `force`, `out` must be empty or absent."""
    if isinstance(out, Path):
        with staged_output(out, force) as staging:
            yield staging
        return
    if not force and not _is_empty(out):
        raise UserError(f"output exists and is not empty: {out.shown()} (use --force to replace it)")
    check_writable(out, "--out")  # before the work, not after it
    with tempfile.TemporaryDirectory(prefix="gfprune-ray-upload-") as staging:
        yield Path(staging)
        upload(Path(staging), out, replace=True)


@contextmanager
def local_copy(folder: Location) -> Iterator[Path]:
    """A local folder with the files of `folder` for the block: itself, or a downloaded copy."""
    if isinstance(folder, Path):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="gfprune-ray-download-") as copy:
        download(folder, Path(copy))
        yield Path(copy)


@contextmanager
def files_into(folder: Location) -> Iterator[Path]:
    """A local folder whose files are added to `folder` when the block ends (nothing removed)."""
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="gfprune-ray-upload-") as staging:
        yield Path(staging)
        upload(Path(staging), folder, replace=False)
