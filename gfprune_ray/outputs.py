"""Where results land on disk: checked before the work starts, written whole or not at all.

A pruned model is written under `.NAME.partial-PID@HOST` next to its destination and renamed into
place at the end, so a failure never leaves half a model under the real name. What a killed
process leaves (its partial folder) is removed by the next run on the same host that writes next
to it (on shared storage, another host's process cannot be checked from here: left alone).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

RECORD_FILE = "gfprune.json"  # what an output folder holds besides the model: options, masks, metrics

PARTIAL = ".partial-"


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail in one line, before any work, when `folder` (or the folders that would be made for
    it) cannot be written. A real probe: permissions do not say it for root or read-only mounts."""
    base = nearest_existing(folder)
    if not base.is_dir():
        raise UserError(f"{what} {folder}: {base} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".gfprune-ray-probe-", dir=base)
    except OSError as exc:
        raise UserError(f"{what} {folder}: cannot write in {base} ({exc.strerror or exc})") from None
    os.rmdir(probe)


def check_output_folder(out: Path, force: bool, what: str = "--out") -> None:
    """The checks `staged_output` needs, done up front: the folder is free (or --force), its parent
    can be written, and it is not a mount point (which cannot be replaced by a rename)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"output exists and is not empty: {out} (use --force to replace it)")
    if out.is_dir() and os.path.ismount(out):
        raise UserError(f"{what} {out} is a mount point, which cannot be replaced: give a folder inside it")
    check_writable_folder(out.absolute().parent, what)
    if out.exists():  # the result replaces it by a rename at the end: try one now, and undo it
        probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
        try:
            os.rename(out, probe)
        except OSError as exc:
            raise UserError(f"{what} {out} cannot be replaced ({exc.strerror or exc}): give another folder") from None
        try:
            os.rename(probe, out)
        except OSError as exc:  # never seen; but the user's folder must not be lost under another name silently
            raise UserError(f"{what} {out}: moved to {probe} to test it and could not be moved back ({exc.strerror or exc})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Partial folders for `out` whose process (on this host) is gone, killed, are deleted."""
    for partial in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid, _, host = partial.name.rpartition(PARTIAL)[2].partition("@")
        if host and host != socket.gethostname():
            continue
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; move it to `out` only if the block succeeds."""
    out = Path(out)
    check_output_folder(out, force)
    new_parents = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staging = out.parent / f".{out.name}{PARTIAL}{os.getpid()}@{socket.gethostname()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    def discard() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in new_parents:  # folders made for this run go too, if nothing else landed there
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()

    try:
        yield staging
    except BaseException:
        discard()
        raise
    try:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except OSError as exc:
        discard()
        raise UserError(f"cannot put the result in place at {out}: {exc.strerror or exc}") from None


@contextmanager
def scratch_folder(base: Path, name: str) -> Iterator[Path]:
    """A private working folder `base/.NAME.partial-PID@HOST`, removed when the block ends; one a
    killed process left on this host is removed the next time one is made."""
    base.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(base / name)
    folder = base / f".{name}{PARTIAL}{os.getpid()}@{socket.gethostname()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_record(folder: Path) -> dict:
    """The record of a folder written by `prune`; a one-line error when it is not one."""
    return record_from(lambda: (Path(folder) / RECORD_FILE).read_text(), str(folder))


def record_from(read: Callable[[], str | bytes], folder: str) -> dict:
    """The record `read` returns (from wherever the folder is), parsed; a one-line error naming
    `folder` when there is none or it is not JSON."""
    try:
        record = json.loads(read())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"not a gfprune-ray output folder (no readable {RECORD_FILE}): {folder}") from None
    return record if isinstance(record, dict) else {}
