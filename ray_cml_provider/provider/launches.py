"""When a starting node may be shown to Ray's autoscaler.

A CML application takes tens of seconds to minutes to start, and its script (our node
launcher) can run while CML still says STARTING: CML learns that an application is up by
polling its HTTP endpoint (Cloudera's "Application polling endpoint" page), which only a
running script can answer. So a worker's raylet may register with the head's GCS, under
cloud instance id = our node id, before CML reports RUNNING; the rule below is right
whether or not it does.

The provider's ``create_node`` waits for RUNNING so that a launch that fails (FAILED, over
quota, stuck STARTING) reaches Ray as a ``NodeLaunchException``. Autoscaler v2 files that
error under "Recent failures" only while its instance is still REQUESTED, that is, while the
node is not yet in ``non_terminated_nodes``; so a starting node is hidden at first. Hidden
too long, though, it breaks v2 in two ways:

- a raylet whose cloud instance v2 cannot see becomes an "unmanaged" instance, which v2
  marks TERMINATED on its next loop; the real request then never gets its Ray node (a
  phantom pending instance) and the idle node is never scaled down;
- a request still unmatched after ``RAY_AUTOSCALER_RECONCILE_REQUEST_STATUS_TIMEOUT_S`` is
  launched again (the provider must not create a second application for it), and after
  ``..._MAX_NUM_RETRY_REQUEST_TO_ALLOCATE`` re-launches v2 gives the request up.

``LaunchTracker`` holds the rule: a starting node is shown from the first of (a) its Ray
registered with the GCS, (b) CML reports it RUNNING, (c) it has been hidden for most of
the time v2 keeps a request open across its re-launches. v2 reads the GCS before it asks
the provider for nodes, so checking the GCS inside ``non_terminated_nodes`` is race-free:
any raylet v2 has seen, the provider has seen too. Autoscaler v1 matches nodes by IP and
counts pending launches itself, so the same rule is harmless there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_ENV = "RAY_AUTOSCALER_RECONCILE_REQUEST_STATUS_TIMEOUT_S"
MAX_RETRY_ENV = "RAY_AUTOSCALER_RECONCILE_MAX_NUM_RETRY_REQUEST_TO_ALLOCATE"
# Ray 2.60's defaults for the two variables above (autoscaler/v2/instance_manager/config.py).
DEFAULT_REQUEST_TIMEOUT_S = 600
DEFAULT_MAX_RETRY = 3


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def hidden_limit_s() -> float:
    """How long a starting node may stay hidden: into the last of v2's request windows.

    v2 re-launches a REQUESTED instance every ``request timeout`` seconds and fails it on the
    timeout after ``max retries`` re-launches, so it keeps the request open for about
    ``timeout * (retries + 1)``. Showing the node half-way through the last window lets v2
    match it before it gives the request up (which would orphan the application and launch
    another); from then on v2's ALLOCATED -> RAY_RUNNING timeout (1 h by default) applies.
    """
    timeout = _env_int(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S)
    retries = max(0, _env_int(MAX_RETRY_ENV, DEFAULT_MAX_RETRY))
    return timeout * (retries + 0.5)


@dataclass
class Launch:
    """One application this provider created and is waiting on."""

    node_id: str
    node_type: str
    request_id: str  # Ray's ``ray-launch-request`` tag (v2 only; "" on v1 and ``ray up``)
    started: float = field(default_factory=time.monotonic)
    shown: bool = False  # returned by non_terminated_nodes: Ray may have matched it


class LaunchTracker:
    """The applications being launched, and whether each may be shown to Ray yet."""

    def __init__(self, gcs_address: str | None) -> None:
        self._gcs_address = gcs_address
        self._gcs_client = None
        self._lock = threading.Lock()
        self._launches: dict[str, Launch] = {}

    def add(self, launches: list[Launch]) -> None:
        with self._lock:
            self._launches.update((launch.node_id, launch) for launch in launches)

    def finish(self, node_id: str) -> None:
        with self._lock:
            self._launches.pop(node_id, None)

    def is_launching(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._launches

    def was_shown(self, node_id: str) -> bool:
        with self._lock:
            launch = self._launches.get(node_id)
        return bool(launch and launch.shown)

    def in_flight(self, request_id: str, node_type: str) -> int:
        """How many applications of this v2 request and type are still starting unseen by
        Ray (one that was shown has been matched to an instance of the request already)."""
        if not request_id:
            return 0
        with self._lock:
            return sum(
                1
                for launch in self._launches.values()
                if launch.request_id == request_id
                and launch.node_type == node_type
                and not launch.shown
            )

    def visible(self, starting: list[str]) -> set[str]:
        """Of the given STARTING nodes that are being launched, the ones Ray may see now."""
        with self._lock:
            launches = [self._launches[n] for n in starting if n in self._launches]
        if not launches:
            return set()
        limit = hidden_limit_s()
        now = time.monotonic()
        shown = {launch.node_id for launch in launches if launch.shown}
        shown |= {launch.node_id for launch in launches if now - launch.started >= limit}
        if len(shown) < len(launches):
            shown |= self.joined_ray({launch.node_id for launch in launches})
        return shown

    def mark_shown(self, node_id: str) -> None:
        """The provider returned this node to Ray: from now on Ray may have matched it."""
        with self._lock:
            if node_id in self._launches:
                self._launches[node_id].shown = True

    @property
    def can_ask_ray(self) -> bool:
        """True in the head's autoscaler (it can reach its GCS); False on a laptop."""
        return bool(self._gcs_address)

    def joined_ray(self, node_ids: set[str]) -> set[str]:
        """The nodes among ``node_ids`` whose raylet the head's GCS knows (alive or dead).

        Only the head's provider launches workers, and it can reach its own GCS. If the GCS
        cannot be asked, every node counts as joined: a node Ray runs on must never be hidden
        from it or deleted as stuck, and a late launch failure then shows as a lost node.
        """
        if not self._gcs_address:
            return set()
        try:
            from ray._raylet import GcsClient
            from ray.autoscaler.v2.sdk import get_cluster_resource_state

            if self._gcs_client is None:
                self._gcs_client = GcsClient(address=self._gcs_address)
            state = get_cluster_resource_state(self._gcs_client)
        except Exception as exc:  # any failure: fail open, see above
            logger.warning("could not ask the GCS which nodes joined (%s): showing them", exc)
            self._gcs_client = None
            return set(node_ids)
        return {node.instance_id for node in state.node_states if node.instance_id in node_ids}
