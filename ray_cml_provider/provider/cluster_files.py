"""A cluster's secret files in the project (Ray's token, the endpoint key): made once by
``ray up`` through the files API, read back through it, deleted by ``ray down`` with the
cluster's folder. CML never overwrites an upload, so "make" means "make unless there"."""

from __future__ import annotations

from collections.abc import Callable

from ray_cml_provider.cml import CMLClient, CMLNotFoundError


def ensure_file(client: CMLClient, path: str, make: Callable[[], str]) -> bool:
    """Upload ``make()`` to ``path`` unless the file exists; True when it was made."""
    folder, name = path.rsplit("/", 1)
    try:
        if any(f.path.rsplit("/", 1)[-1] == name for f in client.list_files(folder)):
            return False
    except CMLNotFoundError:
        pass
    client.upload_file(path, make())
    return True


def read_file(client: CMLClient, path: str) -> str | None:
    """The file's text, stripped; None when it is not there (or empty)."""
    try:
        return client.download_file(path).decode().strip() or None
    except CMLNotFoundError:
        return None
