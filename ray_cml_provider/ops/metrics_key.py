"""``ray-cml metrics-key CONFIG``: print the key a scraper of the head's ``/metrics`` sends
(``provider/metrics_key.py``)::

    ray-cml metrics-key cluster.yaml > metrics_key   # Prometheus: credentials_file
    curl https://<head URL>/metrics -H "Authorization: Bearer $(cat metrics_key)"

It reads figures only: it opens neither the OpenAI API nor the dashboard.
"""

from __future__ import annotations

from ray_cml_provider.ops import print_cluster_secret
from ray_cml_provider.provider.metrics_key import read_metrics_key


def main(argv: list[str] | None = None) -> int:
    return print_cluster_secret(
        argv,
        "ray-cml metrics-key",
        "Print the key a scraper of the head's /metrics sends (Authorization: Bearer, or "
        "X-Metrics-Key behind CML's login).",
        read_metrics_key,
        "cluster {cluster!r} has no metrics key: it is down, or its head started before "
        "metrics keys existed (`ray up` again gives it one)",
    )
