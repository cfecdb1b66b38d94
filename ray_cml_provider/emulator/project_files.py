"""The project filesystem (/home/cdsw on CML), played by one local folder.

Uploads never overwrite: like CML, an existing path makes the file land at ``name(1).ext``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ray_cml_provider.emulator.errors import invalid, not_found


class ProjectFiles:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative``, refusing anything outside the project."""
        relative = relative.strip().strip("/")
        target = (self.root / relative).resolve()
        if target != self.root and self.root not in target.parents:
            raise invalid(f"path {relative!r} is outside the project")
        return target

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def upload(self, relative: str, data: bytes) -> str:
        """Store ``data`` at ``relative`` or, if taken, at the first free ``name(N).ext``."""
        target = self.resolve(relative)
        if target == self.root:
            raise invalid("an upload needs a file path as its form field name")
        target.parent.mkdir(parents=True, exist_ok=True)
        candidate, n = target, 0
        while candidate.exists():
            n += 1
            candidate = target.with_name(f"{target.stem}({n}){target.suffix}")
        candidate.write_bytes(data)
        return self.relative(candidate)

    def list(self, relative: str) -> list[dict]:
        target = self.resolve(relative)
        if not target.exists():
            raise not_found(f"file or directory {relative!r} not found")
        entries = sorted(target.iterdir()) if target.is_dir() else [target]
        return [
            {
                "path": self.relative(entry),
                "is_dir": entry.is_dir(),
                "file_size": str(0 if entry.is_dir() else entry.stat().st_size),
            }
            for entry in entries
        ]

    def read(self, relative: str) -> bytes:
        target = self.resolve(relative)
        if not target.is_file():
            raise (
                not_found(f"file {relative!r} not found")
                if not target.exists()
                else invalid(f"{relative!r} is a directory")
            )
        return target.read_bytes()

    def delete(self, relative: str) -> None:
        target = self.resolve(relative)
        if target == self.root:
            raise invalid("refusing to delete the project root")
        if not target.exists():
            raise not_found(f"file or directory {relative!r} not found")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
