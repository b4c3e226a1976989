"""runlock.py — one training per run folder: a lock file naming the process that holds the folder.

`acquire(folder)` creates FOLDER/.lock with this process's pid and host. A lock held by another live process on
this host is one NMTError line; a lock left by a process that no longer runs (killed) is taken over; this process
may take its own lock again (a recipe trains several models in one process). `release` removes it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from nmt.errors import NMTError

LOCK_NAME = ".lock"


def _holder(path: Path) -> dict | None:
    """The lock's {pid, host}, or None when it is missing or unreadable (a write cut short)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def acquire(folder: Path) -> Path:
    """Take FOLDER/.lock for this process; returns its path."""
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # another process may take a stale lock between our look and our create
        try:
            with open(path, "x", encoding="utf-8") as handle:
                json.dump(me, handle)
            return path
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder["pid"] != me["pid"] and (
                    holder.get("host") != me["host"] or _alive(holder["pid"])):
                raise NMTError(f"{folder} is in use by training process {holder['pid']} on {holder.get('host')} "
                               f"(lock file {path}; remove it if that process is gone)") from None
            path.unlink(missing_ok=True)  # ours, or stale: take it over
    raise NMTError(f"{folder}: could not take the lock file {path} (other processes keep taking it)")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid():
        path.unlink(missing_ok=True)
