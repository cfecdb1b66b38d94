"""``ray up`` ships the provider code it runs to the cluster: no index, wheel or pip step.

A CML runtime has no ray-cml-provider, and no package index carries this exact code. So the
provider zips its own package (deterministically: same code, same bytes, same name) into
the cluster's folder, ``lib/ray_cml_provider-<digest>.zip``. The node launcher puts that
zip first on ``PYTHONPATH`` for the head's commands, so the head's autoscaler imports the
very code that ``ray up`` ran (Python imports pure-Python packages from a zip). A new
version of the code is a new name: a running autoscaler never sees its zip change under it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from importlib import resources
from pathlib import Path

PACKAGE = "ray_cml_provider"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # zip entries carry no build time: same code, same bytes


def _package_files() -> list[tuple[str, bytes]]:
    """(path inside the zip, content) of every module of the package, sorted."""
    root = Path(str(resources.files(PACKAGE)))
    if not root.is_dir():
        # Running from a shipped zip already (the head's autoscaler): ship that zip's content.
        return _files_of_zip(root)
    return [
        (f"{PACKAGE}/{path.relative_to(root).as_posix()}", path.read_bytes())
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    ]


def _files_of_zip(package_root: Path) -> list[tuple[str, bytes]]:
    archive = Path(str(package_root)).parent
    with zipfile.ZipFile(archive) as source:
        names = sorted(n for n in source.namelist() if n.startswith(f"{PACKAGE}/"))
        return [(name, source.read(name)) for name in names if name.endswith(".py")]


@functools.lru_cache(maxsize=1)
def provider_zip() -> tuple[str, bytes]:
    """(file name, bytes) of the zip of the running provider's code."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in _package_files():
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{PACKAGE}-{digest}.zip", data


BOOTSTRAP_SCRIPT = "bootstrap.py"
LAUNCHER_FILES = {  # the standard-library stage, flat; the launcher runs from the zip
    BOOTSTRAP_SCRIPT: "node/bootstrap.py",
    "node_api.py": "node/project_api.py",
    "node_env.py": "node/environment.py",
    "node_processes.py": "node/processes.py",
    "node_dirlock.py": "node/dirlock.py",
    "node_contract.py": "contract.py",
}


def launcher_files() -> dict[str, bytes]:
    """What every application runs first, by its name in the cluster's folder: the bootstrap
    and the modules it imports (read from a folder or from a shipped zip)."""
    package = resources.files(PACKAGE)
    return {
        name: package.joinpath(*module.split("/")).read_bytes()
        for name, module in LAUNCHER_FILES.items()
    }
