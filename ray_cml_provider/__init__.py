"""Ray cluster launcher for Cloudera Machine Learning: nodes are CML applications.

``provider: {type: external, module: ray_cml_provider.CMLNodeProvider}`` loads the node
provider; it is imported lazily so that the CML client and the emulator work without Ray.
"""

from ray_cml_provider.version import __version__

__all__ = ["Cluster", "CMLNodeProvider", "__version__"]


def __getattr__(name: str):
    if name == "Cluster":
        from ray_cml_provider.api import Cluster

        return Cluster
    if name == "CMLNodeProvider":
        from ray_cml_provider.provider.node_provider import CMLNodeProvider

        return CMLNodeProvider
    raise AttributeError(f"module 'ray_cml_provider' has no attribute {name!r}")
