"""``ray-cml token CONFIG``: print the cluster's Ray token, for a Ray client outside CML's
sessions (every Ray port of the cluster asks for it; see ``provider/ray_auth.py``)::

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(ray-cml token cluster.yaml)
    ray job submit --address http://HEAD:PORT -- python my_script.py

Nothing else prints the token: it is read through the files API with your key, as any file
of the project could be. In a CML session of the project use the file itself (the line
``ray up`` and ``ray-cml status`` print).
"""

from __future__ import annotations

from ray_cml_provider.ops import print_cluster_secret
from ray_cml_provider.provider.ray_auth import read_token


def main(argv: list[str] | None = None) -> int:
    return print_cluster_secret(
        argv,
        "ray-cml token",
        "Print the cluster's Ray token (every Ray port of the cluster asks for it).",
        read_token,
        "cluster {cluster!r} has no Ray token: it is down, or its head was created with "
        "provider.ray_auth_mode: disabled",
    )
