"""One campaign at a time: OS file locks that a killed process cannot leave stuck.

Two sweeps of one campaign would each see the same units unfinished and record every one twice;
two sweeps writing one output folder would overwrite each other's models and summary. Each takes
an exclusive `flock` on a small file under the cache root for what it uses; the kernel drops it
when the process ends, however it ends. The file says who holds it, for the error message.
These locks see the processes of one machine (and of machines sharing the cache root on a file
system with working flock); they do not reach a remote tracking server used from two hosts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from ..errors import UserError
from ..packaged import cache_root
from ..storage import Location, shown

WAIT_POLL_S = 0.1


def lock_path(kind: str, identity: str) -> Path:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root() / "locks" / f"{kind}-{digest}.lock"


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    try:
        who = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        who = {}
    if not who:
        return "another process"
    return f"pid {who.get('pid')} on {who.get('host')} ({who.get('command')}), since {who.get('since')}"


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")  # never truncate: the holder's note stays readable until it is replaced


def _write_note(handle: IO[str], what: str) -> None:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv and sys.argv[0] else what
    note = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what}
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(note))
    handle.flush()


@contextmanager
def exclusive(path: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the lock at `path` for the block. Waits up to `wait_s` for another holder, then fails
    in one line saying who holds it and what it guards (`what`)."""
    handle = _open(path)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(f"{what} is in use by {_holder(handle)}: wait for it to finish, or stop it") from None
                time.sleep(WAIT_POLL_S)
        _write_note(handle, what)
        yield
    finally:
        handle.close()  # closing drops the lock


@contextmanager
def campaign_locks(store: str, campaign_key: str, experiment: str, out: Location) -> Iterator[None]:
    """The locks a sweep holds while it runs: its campaign in its tracking store, and its output
    folder (which two campaigns must not share at once either)."""
    with ExitStack() as stack:
        stack.enter_context(exclusive(lock_path("campaign", f"{store}\n{campaign_key}"), f"campaign {experiment!r} in {store}"))
        # a local folder is absolute here (Campaign.out); object storage is one URI. Only the
        # processes of this machine see the lock: two machines writing one bucket are not stopped
        stack.enter_context(exclusive(lock_path("out", str(out)), f"output folder {shown(out)}"))
        yield
