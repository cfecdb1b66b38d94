"""One lock on a filesystem, for the node side: a folder made atomically, with its owner.

``mkdir`` is atomic on a local disk and on NFS, so of two processes taking the same lock one
wins. The winner writes ``owner.json`` in it. A lock whose owner is gone (the caller says
how to tell: a dead pid on this machine, or no heartbeat for a while on a shared disk) is
broken by moving it aside with one ``rename`` (of two breakers one wins) and checking that
what moved is still the owner judged gone; a lock taken over in between is given back.

Used for the environment build shared by a project's nodes (``environment.py``) and the
ports a node claims on its machine (``ports.py``). Standard library only (the bootstrap).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

OWNER = "owner.json"


class DirLock:
    """``path`` held while it exists; ``is_gone(owner, age_s)`` says when its holder is gone
    (``owner`` None: the lock was made but its owner not written yet)."""

    def __init__(self, path: Path, is_gone: Callable[[dict | None, float], bool]):
        self.path = path
        self.is_gone = is_gone
        self.took_over_from: dict | None = None  # the gone holder the last take replaced

    def take(self, owner: dict) -> bool:
        """Take the lock if free, or if its holder is gone; True when this process holds it."""
        self.took_over_from = None
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.mkdir()
            except FileExistsError:
                gone = self.owner()
                if not self.break_if_gone():
                    return False
                self.took_over_from = gone or {}
                continue
            self.write_owner(owner)
            return True
        return False

    def owner(self) -> dict | None:
        return read_json_object(self.path / OWNER)

    def age_s(self) -> float:
        """Seconds since the lock or its owner record was last written."""
        newest = 0.0
        for path in (self.path, self.path / OWNER):
            with contextlib.suppress(OSError):
                newest = max(newest, path.stat().st_mtime)
        return time.time() - newest if newest else 0.0

    def write_owner(self, owner: dict) -> None:
        """Write (or refresh: a heartbeat) the owner record, atomically."""
        tmp = self.path / f".{OWNER}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(owner))
            tmp.replace(self.path / OWNER)

    def break_if_gone(self) -> bool:
        """Remove a lock whose holder is gone; True when it was removed (by anyone)."""
        owner = self.owner()
        if not self.path.exists():
            return True
        if not self.is_gone(owner, self.age_s()):
            return False
        aside = self.path.with_name(f"{self.path.name}.gone-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            self.path.rename(aside)
        except OSError:
            return not self.path.exists()  # another breaker was first
        moved = read_json_object(aside / OWNER)
        if moved != owner:  # taken over between our look and our rename: give it back
            with contextlib.suppress(OSError):
                aside.rename(self.path)
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_json_object(path: Path) -> dict | None:
    """A JSON object from ``path``; None when it is missing, half-written or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
