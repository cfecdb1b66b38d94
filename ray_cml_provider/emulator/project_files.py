"""The project filesystem (/home/cdsw on CML), played by one local folder.

Uploads never overwrite: like CML, an existing path makes the file land at ``name(1).ext``.

On CML the project filesystem is NFS, and NFS clients cache directory attributes (Linux's
``acdirmin`` is 30 s): a file the API server writes may reach a running engine seconds
later, and a file an engine writes may reach the API that late. ``visibility_delay_s``
plays that between the two sides:

- a file uploaded through the API is visible to the API at once, and lands in the folder
  the engines see only after the delay (or when an engine starts: a fresh mount sees all);
- a file an engine wrote in the folder is hidden from the API until it is that old.

Between two engines the folder is one local disk: the emulator cannot delay that side.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from ray_cml_provider.emulator.errors import invalid, not_found


class ProjectFiles:
    def __init__(self, root: Path, visibility_delay_s: float = 0.0):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.visibility_delay_s = visibility_delay_s
        self._lock = threading.RLock()
        # Uploads the engines do not see yet: absolute path -> (data, when they land).
        self._pending: dict[Path, tuple[bytes, float]] = {}
        # Files the API itself wrote: visible to the API at once, whatever their age.
        self._written_by_api: set[Path] = set()

    # ------------------------------------------------------------------ paths

    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative``, refusing anything outside the project."""
        relative = relative.strip().strip("/")
        target = (self.root / relative).resolve()
        if target != self.root and self.root not in target.parents:
            raise invalid(f"path {relative!r} is outside the project")
        return target

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ the delay

    def apply_due(self, flush: bool = False) -> None:
        """Land the uploads whose delay has passed (all of them with ``flush``)."""
        now = time.monotonic()
        with self._lock:
            for path, (data, due) in sorted(self._pending.items(), key=lambda kv: kv[1][1]):
                if flush or due <= now:
                    del self._pending[path]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)

    def flush(self) -> None:
        self.apply_due(flush=True)

    def _visible_to_api(self, path: Path) -> bool:
        """A folder always; a file an engine wrote once it is ``visibility_delay_s`` old."""
        if not self.visibility_delay_s or path in self._written_by_api or path.is_dir():
            return True
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        return age >= self.visibility_delay_s

    def _pending_under(self, folder: Path) -> list[Path]:
        return [p for p in self._pending if folder in p.parents]

    # ------------------------------------------------------------------ the API's view

    def upload(self, relative: str, data: bytes) -> str:
        """Store ``data`` at ``relative`` or, if taken, at the first free ``name(N).ext``."""
        target = self.resolve(relative)
        if target == self.root:
            raise invalid("an upload needs a file path as its form field name")
        with self._lock:
            candidate, n = target, 0
            while candidate in self._pending or candidate.exists():
                n += 1
                candidate = target.with_name(f"{target.stem}({n}){target.suffix}")
            self._written_by_api.add(candidate)
            if self.visibility_delay_s:
                self._pending[candidate] = (data, time.monotonic() + self.visibility_delay_s)
            else:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                candidate.write_bytes(data)
        return self.relative(candidate)

    def list(self, relative: str) -> list[dict]:
        target = self.resolve(relative)
        with self._lock:
            pending = self._pending_under(target)
            if target in self._pending:
                return [self._entry(target, is_dir=False, size=len(self._pending[target][0]))]
            if not (target.exists() and self._visible_to_api(target)) and not pending:
                raise not_found(f"file or directory {relative!r} not found")
            if target.is_file():
                return [self._entry(target, is_dir=False, size=target.stat().st_size)]
            entries: dict[Path, dict] = {}
            if target.is_dir():
                for entry in target.iterdir():
                    if self._visible_to_api(entry):
                        size = 0 if entry.is_dir() else entry.stat().st_size
                        entries[entry] = self._entry(entry, entry.is_dir(), size)
            for path in pending:
                child = target / path.relative_to(target).parts[0]
                if child == path:
                    entries[child] = self._entry(child, False, len(self._pending[path][0]))
                else:
                    entries.setdefault(child, self._entry(child, True, 0))
            return [entries[key] for key in sorted(entries)]

    def _entry(self, path: Path, is_dir: bool, size: int) -> dict:
        return {"path": self.relative(path), "is_dir": is_dir, "file_size": str(size)}

    def read(self, relative: str) -> bytes:
        target = self.resolve(relative)
        with self._lock:
            if target in self._pending:
                return self._pending[target][0]
            if target.is_dir() or self._pending_under(target):
                raise invalid(f"{relative!r} is a directory")
            if not target.is_file() or not self._visible_to_api(target):
                raise not_found(f"file {relative!r} not found")
            return target.read_bytes()

    def delete(self, relative: str) -> None:
        target = self.resolve(relative)
        if target == self.root:
            raise invalid("refusing to delete the project root")
        with self._lock:
            dropped = [p for p in self._pending if p == target or target in p.parents]
            for path in dropped:
                del self._pending[path]
            self._written_by_api -= {
                p for p in self._written_by_api if p == target or target in p.parents
            }
            if not target.exists():
                if dropped:
                    return
                raise not_found(f"file or directory {relative!r} not found")
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
