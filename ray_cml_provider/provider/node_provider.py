"""``CMLNodeProvider``: Ray's node provider interface on top of CML applications.

- A node is one CML application named ``ray-<cluster>-<head|worker>-<node id>``; the node id
  (8 hex digits) is chosen before the create, so it can be the raylet's
  ``RAY_CLOUD_INSTANCE_ID`` and a lost create answer can be checked by name.
- Ray's tags live in the application's ``description`` (JSON), so the provider on the laptop
  (``ray up``/``down``) and the one in the head's autoscaler see the same thing.
- Everything is scoped by cluster name: listing filters by name prefix and then re-checks the
  ``ray-cluster-name`` tag exactly (CML's filter matches substrings).
- One application list call per autoscaler update: ``non_terminated_nodes`` refreshes a cache
  that every other query reads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    TAG_RAY_CLUSTER_NAME,
    TAG_RAY_LAUNCH_REQUEST,
    TAG_RAY_NODE_KIND,
    TAG_RAY_USER_NODE_TYPE,
)

from ray_cml_provider.cml import (
    TRANSIENT_ERRORS,
    Application,
    ApplicationStatus,
    CMLClient,
    CMLError,
    CMLNotFoundError,
)
from ray_cml_provider.cml.models import parse_timestamp, seconds_since
from ray_cml_provider.contract import (
    CommandVar,
    LedgerEntry,
    NodeFolder,
    NodeSpec,
    application_name,
    autostop_record_path,
    cluster_dir,
    decode_tags,
    encode_tags,
    gcs_state_path,
    ledger_dir,
)
from ray_cml_provider.errors import HeadDidNotStart, ends_command
from ray_cml_provider.node import watchdog as node_watchdog
from ray_cml_provider.provider import endpoint, metrics_key, ray_auth
from ray_cml_provider.provider.config import (
    ClusterConfigError,
    node_type_resources,
    validate_cluster_config,
    validate_cluster_name,
    validate_provider_config,
)
from ray_cml_provider.provider.launches import Launch, LaunchTracker
from ray_cml_provider.provider.lookup import cluster_applications, take_prefetched
from ray_cml_provider.provider.mailbox import NodeMailbox
from ray_cml_provider.provider.packages import node_type_packages
from ray_cml_provider.provider.ray_auth import TOKEN, cluster_mode, ensure_token
from ray_cml_provider.provider.shipping import BOOTSTRAP_SCRIPT, launcher_files, provider_zip
from ray_cml_provider.provider.tag_writer import TagWriter
from ray_cml_provider.provider.workspace_check import check_workspace

logger = logging.getLogger(__name__)

DEFAULT_LAUNCH_TIMEOUT_S = 900.0
DEFAULT_HEAD_LOST_TIMEOUT_S = 120.0
MAX_PARALLEL_CALLS = 8
# How long `ray down` waits between deleting the nodes and looking whether any is left.
TEARDOWN_LOOK_AGAIN_S = 0.5
# How long a worker's create waits for a just-started head to publish its address.
HEAD_ADDRESS_WAIT_S = 60.0


def _shorten_teardown_poll() -> None:
    """``ray down`` waits ``POLL_INTERVAL`` (5 s) after asking to delete the nodes, whatever
    the provider: shorten that wait in this process (``ray down``'s own)."""
    from ray.autoscaler._private import commands

    if getattr(commands, "POLL_INTERVAL", 0) > TEARDOWN_LOOK_AGAIN_S:
        commands.POLL_INTERVAL = TEARDOWN_LOOK_AGAIN_S


def _here() -> NodeSpec:
    """The node this provider runs on, if any: inside the head (the head's autoscaler), its
    spec; elsewhere (a laptop, a session) an empty one."""
    return NodeSpec.from_env(os.environ)


def _is_own_head(node_id: str) -> bool:
    """True inside the head application of ``node_id`` (the head's autoscaler)."""
    here = _here()
    return here.is_head and here.node_id == node_id


def _own_gcs_address() -> str | None:
    """The GCS of the head this provider runs in (the autoscaler's), else None (a laptop)."""
    ip, port = os.environ.get("CDSW_IP_ADDRESS"), os.environ.get(CommandVar.GCS_PORT)
    return f"{ip}:{port}" if _here().is_head and ip and port else None


class _Progress:
    """Progress lines for ``ray up``: on each change of status, and every 15 s without one."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last: tuple[str, float] = ("", 0.0)

    def report(self, what: str, status: str) -> None:
        now = time.monotonic()
        if status == self.last[0] and now - self.last[1] < 15:
            return
        self.last = (status, now)
        from ray.autoscaler._private.cli_logger import cli_logger

        cli_logger.print(
            f"ray-cml: {what} is {status.removeprefix('APPLICATION_')} ({now - self.started:.1f} s)"
        )


@dataclass
class Node:
    node_id: str
    app: Application
    tags: dict[str, str] = field(default_factory=dict)


class CMLNodeProvider(NodeProvider):
    """Ray nodes as CML applications. Thread-safe: the autoscaler calls it from many threads."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        node_watchdog.install_stack_dump()  # in the head's autoscaler: stacks on SIGUSR1
        validate_provider_config(provider_config)
        validate_cluster_name(cluster_name)
        self.client = CMLClient(
            host=provider_config.get("host"),
            project_id=provider_config.get("project_id"),
            api_key_env=provider_config.get("api_key_env", "CML_API_KEY"),
        )
        self.launch_timeout_s = float(
            provider_config.get("launch_timeout_s", DEFAULT_LAUNCH_TIMEOUT_S)
        )
        self.head_lost_timeout_s = float(
            provider_config.get("head_lost_timeout_s", DEFAULT_HEAD_LOST_TIMEOUT_S)
        )
        self.poll_interval_s = float(provider_config.get("poll_interval_s", 2.0))
        self.ray_auth_mode = cluster_mode(provider_config)  # see provider/ray_auth.py
        self.dir = cluster_dir(cluster_name)
        # Guards the listing below, and is never held across a call to CML: the head's
        # autoscaler reads the listing every update, and an update waiting on another
        # thread's retries (minutes under API faults) is an autoscaler that stops deciding.
        self._lock = threading.RLock()
        self._launcher_lock = threading.Lock()  # one upload of the launcher
        self._shipping_lock = threading.Lock()  # one upload of the code
        self._tags_lock = threading.Lock()  # one tag update at a time: none is lost
        self._tag_writer = TagWriter(self._write_tags)
        self._nodes: dict[str, Node] = {}  # every application of this cluster, last listing
        self._ips: dict[str, str] = {}
        self._launches = LaunchTracker(_own_gcs_address())
        # In the head's autoscaler, the launcher files are those `ray up` uploaded with this
        # very code (the head runs the provider zip it shipped): a first scale-up does not
        # wait to upload them again.
        here = _here()
        in_own_head = here.is_head and here.cluster == cluster_name
        self._launcher_uploaded = in_own_head
        # Likewise the code: its workers run the zip the head's own Ray was started with
        # (`ray up` shipped it and named it in the start command's environment).
        self._shipped_zip: str | None = (here.provider_zip or None) if in_own_head else None
        self.ready_nodes: set[str] = set()  # nodes whose environment the runner has seen
        self._refused_head = False  # see _refuse_own_head_termination

    # ------------------------------------------------------------------ listing

    def _refresh(self) -> dict[str, Node]:
        """One application list call: the cluster's applications, whatever their status."""
        prefetched = take_prefetched(self.client, self.cluster_name)
        if prefetched:  # asked beside the workspace check, an instant ago
            asked_at, listing = prefetched
        else:
            asked_at = time.monotonic()
            listing = cluster_applications(self.client, self.cluster_name)
        nodes = {own.node_id: Node(own.node_id, own.app, own.tags) for own in listing.nodes}
        for node_id, tags in self._tag_writer.newer_than_listing(asked_at).items():
            if node_id in nodes:
                nodes[node_id] = Node(node_id, nodes[node_id].app, tags)
        with self._lock:
            self._nodes = nodes
        return nodes

    def _node(self, node_id: str) -> Node:
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None:
            node = self._refresh().get(node_id)
        if node is None:
            raise KeyError(f"no application for node {node_id} in cluster {self.cluster_name}")
        return node

    def application(self, node_id: str) -> Application:
        """The CML application of a node of this cluster (``KeyError`` if there is none)."""
        return self._node(node_id).app

    @staticmethod
    def _matches(node: Node, tag_filters: dict[str, str]) -> bool:
        return all(node.tags.get(k) == v for k, v in tag_filters.items())

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        node_watchdog.beat()  # the head's autoscaler is alive: an update got this far
        try:
            nodes = self._refresh()
        except TRANSIENT_ERRORS as exc:
            # Ray's monitor gives up after 5 failed updates in a row: a CML hiccup that
            # outlasted the client's retries must not end autoscaling. Answer from the last
            # listing; the next update asks CML again.
            logger.warning("listing applications failed (%s); using the last listing", exc)
            with self._lock:
                nodes = dict(self._nodes)
        live, stuck = [], []
        for node in nodes.values():
            status = node.app.status
            if status == ApplicationStatus.FAILED:
                # CML would restart it (up to 3 times): a node we consider dead must go.
                self._delete_in_background(node, "it FAILED", with_failure=True)
            elif status not in ApplicationStatus.LIVE:
                continue
            elif (
                status == ApplicationStatus.STARTING
                and not self._launches.is_launching(node.node_id)
                and seconds_since(node.app.created_at) > self.launch_timeout_s
            ):
                stuck.append(node)
            else:
                live.append(node)
        live += self._reap_stuck(stuck)
        # A node being launched is hidden while STARTING, until Ray could know it (see
        # provider/launches.py): a launch failure then still fails the open request.
        starting = [
            n.node_id
            for n in live
            if n.app.status == ApplicationStatus.STARTING and self._launches.is_launching(n.node_id)
        ]
        shown = self._launches.visible(starting)
        alive = []
        for node in live:
            if node.node_id in starting and node.node_id not in shown:
                continue
            self._launches.mark_shown(node.node_id)
            if self._matches(node, tag_filters):
                alive.append(node.node_id)
        return alive

    def _reap_stuck(self, stuck: list[Node]) -> list[Node]:
        """Delete the applications STARTING past ``launch_timeout_s`` that never joined Ray
        (over quota, no GPU node); return the ones Ray knows, which are kept (CML's status
        can lag behind a node that works). Only the head's autoscaler reaps: it can ask its
        GCS, and the cluster's lifecycle is its job, not that of a laptop's ``ray exec``."""
        if not stuck or not self._launches.can_ask_ray:
            return stuck
        joined = self._launches.joined_ray({node.node_id for node in stuck})
        for node in stuck:
            if node.node_id not in joined:
                self._delete_in_background(
                    node, f"still STARTING after {self.launch_timeout_s:.0f} s"
                )
        return [node for node in stuck if node.node_id in joined]

    def nodes_for_teardown(self, tag_filters: dict[str, str]) -> list[str]:
        """Every application of the cluster, stopped and failed ones included.

        Only ``ray down`` asks this. Ray then deletes the nodes and sleeps a fixed 5 s
        (``commands.POLL_INTERVAL``) before it looks again; a CML application is gone from
        the list once its delete has answered (``terminate_nodes`` returns after every
        answer), so that look can come at once (``TEARDOWN_LOOK_AGAIN_S``): a node still
        listed is asked again then, as before.
        """
        _shorten_teardown_poll()
        return [n.node_id for n in self._refresh().values() if self._matches(n, tag_filters)]

    def is_running(self, node_id: str) -> bool:
        return self._node(node_id).app.status == ApplicationStatus.RUNNING

    def is_terminated(self, node_id: str) -> bool:
        with self._lock:
            node = self._nodes.get(node_id)
        return node is None or node.app.status not in ApplicationStatus.LIVE

    def node_tags(self, node_id: str) -> dict[str, str]:
        return dict(self._node(node_id).tags)

    def internal_ip(self, node_id: str) -> str:
        """The engine's address, published by its launcher (CML's API does not have it)."""
        with self._lock:
            if node_id in self._ips:
                return self._ips[node_id]
        info = self._mailbox(node_id).wait_for_launcher(
            self.launch_timeout_s, poll_s=self.poll_interval_s
        )
        with self._lock:
            self._ips[node_id] = info.ip
        return info.ip

    def _mailbox(self, node_id: str) -> NodeMailbox:
        """The node's folder as the command runner sees it: its ``node.json`` is read there
        (progress while waiting goes to the debug log: this may be the head's autoscaler)."""
        return NodeMailbox(
            self.client, NodeFolder.of(self.cluster_name, node_id), progress=logger.debug
        )

    def external_ip(self, node_id: str) -> str:
        return self.internal_ip(node_id)

    # ------------------------------------------------------------------ launching

    def create_node(
        self, node_config: dict[str, Any], tags: dict[str, str], count: int
    ) -> dict[str, Any]:
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    @ends_command  # `ray up`'s head: HeadDidNotStart ends it in one sentence
    def create_node_with_resources_and_labels(
        self,
        node_config: dict[str, Any],
        tags: dict[str, str],
        count: int,
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> dict[str, Any]:
        """Create ``count`` applications concurrently and wait until they run.

        Waiting lets a failure reach Ray as a ``NodeLaunchException`` (shown under "Recent
        failures" in ``ray status``, and backing the node type off) instead of a node that
        silently never joins. Autoscaler v2 launches a request again when it has waited long
        for it; applications of that request still starting count towards it, so a slow
        start never becomes two applications.
        """
        kind = tags.get(TAG_RAY_NODE_KIND, NODE_KIND_WORKER)
        preparations: list[Callable[[], object]] = [self._upload_launcher, self.ship_code]
        if kind == NODE_KIND_HEAD:
            preparations += self._head_preparations()
        # Independent files: at CML's 100-300 ms a request, one after another they cost
        # `ray up` seconds (bench/api_latency_bench.py).
        with ThreadPoolExecutor(len(preparations)) as pool:
            for done in [pool.submit(step) for step in preparations]:
                done.result()
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, kind)
        request_id = tags.get(TAG_RAY_LAUNCH_REQUEST, "")
        in_flight = self._launches.in_flight(request_id, node_type)
        if in_flight:
            logger.info(
                "launch request %s: %d %s node(s) asked again, %d still starting",
                request_id,
                count,
                node_type,
                in_flight,
            )
            count -= in_flight
            if count <= 0:
                return {}
        tags = {**tags, TAG_RAY_CLUSTER_NAME: self.cluster_name}
        specs = [
            self._application_spec(secrets.token_hex(4), kind, node_config, tags, resources, labels)
            for _ in range(count)
        ]
        self._launches.add([Launch(node_id, node_type, request_id) for node_id, _ in specs])
        try:
            with ThreadPoolExecutor(min(count, MAX_PARALLEL_CALLS)) as pool:
                created = list(pool.map(self._create_one, specs))
            failures = [str(err) for node, err in created if err]
            started = [node for node, err in created if node]
            with self._lock:
                for node in started:
                    self._nodes[node.node_id] = node
            failures += self._wait_until_running(started, show_progress=kind == NODE_KIND_HEAD)
        finally:
            for node_id, _ in specs:
                self._launches.finish(node_id)
        if failures and kind == NODE_KIND_HEAD:
            # Only `ray up` launches a head: one sentence, not a traceback.
            if endpoint.bypasses_login(node_config):
                for _, err in created:
                    refused = err and endpoint.refused_bypass(err, node_type)
                    if refused:
                        raise HeadDidNotStart(refused)
            raise HeadDidNotStart(f"the head did not start: {'; '.join(failures)}")
        if failures:
            raise NodeLaunchException(
                "CMLLaunchFailed",
                f"{len(failures)} of {count} {node_type} node(s) failed: " + "; ".join(failures),
                None,
            )
        return {}

    def _head_preparations(self) -> list[Callable[[], object]]:
        """What a new head needs in the cluster's folder before it starts, each step on its
        own: the secrets it reads (the token exists before the head: its first `ray start`
        already asks for it), and no record of an earlier cluster of the same name (an
        autostop is history; the GCS state a head_recovery cluster kept is not this one's:
        only a head that CML restarts recovers from it)."""

        def created(what: str, ensure: Callable[[CMLClient, str], bool]) -> Callable[[], None]:
            def step() -> None:
                if ensure(self.client, self.cluster_name):
                    logger.info("created the %s of cluster %s", what, self.cluster_name)

            return step

        def deleted(path: str) -> Callable[[], None]:
            return lambda: self.client.delete_file(path, missing_ok=True)

        steps = [
            deleted(autostop_record_path(self.cluster_name)),
            deleted(gcs_state_path(self.cluster_name)),
            created("endpoint key", endpoint.ensure_endpoint_key),
            created("metrics key", metrics_key.ensure_metrics_key),
        ]
        if self.ray_auth_mode == TOKEN:
            steps.append(created("Ray token", ensure_token))
        return steps

    def _create_one(self, spec: tuple[str, dict[str, Any]]) -> tuple[Node | None, Exception | None]:
        node_id, body = spec
        try:
            app = self.client.create_application_once(body)
        except CMLError as exc:
            return None, exc
        logger.info("created application %s (%s) for node %s", app.name, app.id, node_id)
        return Node(node_id, app, decode_tags(app.description) or {}), None

    def _wait_until_running(self, nodes: list[Node], show_progress: bool = False) -> list[str]:
        """Poll (one list call per round) until each node runs; delete the ones that fail.

        Returns the launch failures: nodes that failed before Ray was shown them. A node
        that fails after it was shown is a lost node to Ray (its instance ends), not a
        failed launch, so it is deleted and logged but not reported against the request.
        ``ray up`` waits here for the head: it shows what it waits for, with elapsed time.
        """
        failures = []
        pending = {node.node_id: node for node in nodes}
        started = time.monotonic()
        deadline = started + self.launch_timeout_s
        progress = _Progress(started) if show_progress else None
        listed = time.monotonic()
        while pending:
            # One listing every poll_interval_s, start to start: at CML's 100-300 ms a
            # request, a pause after each answer would see RUNNING that much later.
            time.sleep(max(0.0, listed + self.poll_interval_s - time.monotonic()))
            listed = time.monotonic()
            try:
                current = self._refresh()
            except CMLError as exc:
                logger.warning("listing applications failed, will retry: %s", exc)
                continue
            for node_id, node in list(pending.items()):
                app = current.get(node_id, node).app
                if progress:
                    progress.report(f"head application {app.name}", app.status)
                if node_id not in current:
                    reason = f"{node.app.name} disappeared while starting"
                elif app.status == ApplicationStatus.RUNNING:
                    reason = ""
                elif app.status in ApplicationStatus.LIVE and time.monotonic() < deadline:
                    continue
                elif app.status == ApplicationStatus.STARTING and self._launches.joined_ray(
                    {node_id}
                ):
                    logger.info("%s runs Ray while CML still says STARTING", app.name)
                    reason = ""
                else:
                    reason = (
                        f"{app.name} is {app.status} after {self.launch_timeout_s:.0f} s "
                        "(over the workspace's quota?)"
                        if app.status == ApplicationStatus.STARTING
                        else f"{app.name} ended as {app.status} while starting"
                        + self._failure_of(node_id)
                    )
                    self._delete(current[node_id], reason)
                del pending[node_id]
                if reason and self._launches.was_shown(node_id):
                    logger.warning("node %s was lost while starting: %s", node_id, reason)
                elif reason:
                    failures.append(reason)
                self._launches.finish(node_id)
        return failures

    def _failure_of(self, node_id: str) -> str:
        """Why the node's launcher gave up, as it published it (pip's last lines...)."""
        try:
            text = self.client.download_file(NodeFolder.of(self.cluster_name, node_id).failure)
        except CMLError:
            return ""
        return ": " + text.decode("utf-8", "replace").strip()

    def _application_spec(
        self,
        node_id: str,
        kind: str,
        node_config: dict[str, Any],
        tags: dict[str, str],
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> tuple[str, dict[str, Any]]:
        name = application_name(self.cluster_name, kind, node_id)
        internal = node_config.get("_ray_cml", {})
        spec = NodeSpec(
            cluster=self.cluster_name,
            node_id=node_id,
            kind=kind,
            app_name=name,
            cluster_dir=self.dir,
            head_lost_timeout_s=self.head_lost_timeout_s,
            # What the bootstrap installs (once per project) before Ray can start.
            pip_packages=internal.get("pip_packages", []),
            runtime=node_config["runtime_identifier"],
            # The code the node's launcher runs (the bootstrap execs it).
            provider_zip=self.ship_code(),
            head_recovery=bool(self.provider_config.get("head_recovery")),
            # A worker's setup before Ray starts; what a restarted head runs again before
            # the `ray start` it recorded.
            setup_commands=internal.get("setup_commands", []),
            **ray_auth.node_spec_fields(self.cluster_name, self.ray_auth_mode),
        )
        spec.node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "")  # RAY_NODE_TYPE_NAME, Ray's too
        ray_env = {"RAY_CLOUD_INSTANCE_ID": node_id}  # Ray's own variables
        if kind == NODE_KIND_HEAD:
            spec.autostop_minutes = float(self.provider_config.get("autostop_minutes") or 0)
            spec.prometheus = str(self.provider_config.get("prometheus") or "auto")
            bypass = endpoint.bypasses_login(node_config)
            head_fields = {
                **endpoint.node_spec_fields(self.cluster_name, bypass),
                **metrics_key.node_spec_fields(self.cluster_name),
            }
            for key, value in head_fields.items():
                setattr(spec, key, value)
        if kind == NODE_KIND_WORKER:
            head = self._head_address()
            spec.head_node_id, spec.head_ip, spec.head_gcs_port, spec.head_app_port = head
            spec.start_commands = internal.get("start_commands", [])
            ray_env["RAY_OVERRIDE_RESOURCES"] = json.dumps(resources)
            ray_env["RAY_OVERRIDE_LABELS"] = json.dumps(labels)
        env = {**node_config.get("environment", {}), **spec.to_env(), **ray_env}
        body: dict[str, Any] = {
            "name": name,
            "subdomain": name,
            "description": encode_tags(tags),
            "script": f"{self.dir}/{BOOTSTRAP_SCRIPT}",
            "cpu": node_config["cpu"],
            "memory": node_config["memory"],
            "nvidia_gpu": 0 if kind == NODE_KIND_HEAD else node_config.get("nvidia_gpu", 0),
            "runtime_identifier": node_config["runtime_identifier"],
            "environment": env,
        }
        for key in ("accelerator_label_id", "resource_profile_id", "resource_group_id"):
            if key in node_config:
                body[key] = str(node_config[key])
        for key in ("runtime_addon_identifiers", "bypass_authentication", "kernel"):
            if key in node_config:
                body[key] = node_config[key]
        return node_id, body

    def _head_address(self) -> tuple[str, str, int, int]:
        """The head's node id, and where workers find its GCS and its application port: known
        directly inside the head, else from its launcher."""
        here = _here()
        if here.is_head and os.environ.get("CDSW_IP_ADDRESS"):
            port = int(os.environ.get(CommandVar.GCS_PORT) or 6379)
            app_port = int(os.environ.get("CDSW_APP_PORT") or 0)
            return here.node_id, os.environ["CDSW_IP_ADDRESS"], port, app_port
        heads = self.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
        if not heads:
            raise NodeLaunchException("NoHead", "the cluster has no running head", None)
        # A head that has just started publishes its address once its launcher runs (after
        # the bootstrap readied its environment): wait for it a little.
        deadline = time.monotonic() + HEAD_ADDRESS_WAIT_S
        while True:
            try:
                info = self._mailbox(heads[0]).node_info()  # a torn record is "not found"
                return heads[0], info.ip, info.gcs_port, info.app_port
            except CMLNotFoundError:
                if time.monotonic() > deadline:
                    raise NodeLaunchException(
                        "NoHead",
                        f"the head {heads[0]} has not published its address "
                        f"after {HEAD_ADDRESS_WAIT_S:.0f} s",
                        None,
                    ) from None
                time.sleep(0.5)

    def _upload_launcher(self) -> None:
        """The node launcher and its environment builder: every application's script."""
        with self._launcher_lock:
            if self._launcher_uploaded:
                return
            files = launcher_files()
            with ThreadPoolExecutor(len(files)) as pool:
                uploads = [
                    pool.submit(self.client.upload_file, f"{self.dir}/{name}", data, True)
                    for name, data in files.items()
                ]
                for upload in uploads:
                    upload.result()
            self._launcher_uploaded = True

    def ship_code(self) -> str:
        """Put this provider's code in the cluster's folder (once; the name is its digest)
        and return its path there: the head's autoscaler imports it from that zip."""
        with self._shipping_lock:
            if self._shipped_zip:
                return self._shipped_zip
            name, data = provider_zip()
            path = f"{self.dir}/lib/{name}"
            try:
                present = any(
                    f.path.endswith(f"/{name}") for f in self.client.list_files(f"{self.dir}/lib")
                )
            except CMLNotFoundError:
                present = False
            if not present:
                self.client.upload_file(path, data)
            self._shipped_zip = path
            return path

    # ------------------------------------------------------------------ tags, termination

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        """Kept here at once, written to CML by the tag writer (``provider/tag_writer.py``)."""
        with self._tags_lock:
            node = self._node(node_id)
            merged = {**node.tags, **tags}
            with self._lock:
                self._nodes[node_id] = Node(node_id, node.app, merged)
            self._tag_writer.put(node_id, node.app.id, merged)

    def _write_tags(self, node_id: str, app_id: str, tags: dict[str, str]) -> None:
        self.client.update_application(app_id, {"description": encode_tags(tags)})

    def terminate_node(self, node_id: str) -> dict[str, Any] | None:
        if _is_own_head(node_id):
            self._refuse_own_head_termination(node_id)
            return None
        try:
            node = self._node(node_id)
        except KeyError:
            return None
        self._delete(node, "terminated by Ray")
        return None

    def _refuse_own_head_termination(self, node_id: str) -> None:
        """The head's autoscaler never deletes its own head (``ray down`` does, from outside).

        Autoscaler v2 asks for it after Ray restarts on a head whose GCS kept its state (a
        recovered head, a ``ray up`` again): the GCS still lists the head's earlier Ray node,
        DEAD, under the same cloud instance id, and when v2 looks before the new raylet has
        registered it takes the instance for one whose Ray stopped. Said once per process.
        """
        with self._lock:
            if self._refused_head:
                return
            self._refused_head = True
        logger.warning(
            "not deleting head %s: its own autoscaler asked (a dead Ray node of an earlier "
            "start of this head, kept in the GCS state); `ray down` deletes the head",
            node_id,
        )

    def terminate_nodes(self, node_ids: list[str]) -> dict[str, Any] | None:
        if node_ids:
            with ThreadPoolExecutor(min(len(node_ids), MAX_PARALLEL_CALLS)) as pool:
                list(pool.map(self.terminate_node, node_ids))
        return None

    def _delete(self, node: Node, reason: str) -> None:
        logger.info("deleting application %s (%s): %s", node.app.name, node.app.id, reason)
        self._tag_writer.forget(node.node_id)
        if self.client.delete_application(node.app.id, missing_ok=True):
            self._record_gpu_time(node)  # once: a node deleted before has its entry
        folder = NodeFolder.of(self.cluster_name, node.node_id)
        self.client.delete_file(folder.path, missing_ok=True)
        with self._lock:
            self._nodes.pop(node.node_id, None)
            self._ips.pop(node.node_id, None)

    def _record_gpu_time(self, node: Node) -> None:
        """A GPU node's time goes to the cluster's ledger, so ``ray-cml status`` can total
        GPU-hours since the cluster started after its workers are gone. Best effort: an
        entry lost here undercounts a report, it never blocks a delete."""
        start = parse_timestamp(node.app.running_at) or parse_timestamp(node.app.created_at)
        if not node.app.nvidia_gpu or start is None:
            return
        node_type = node.tags.get(TAG_RAY_USER_NODE_TYPE, "")
        entry = LedgerEntry(node.node_id, node.app.nvidia_gpu, start, time.time(), node_type)
        try:
            self.client.upload_file(f"{ledger_dir(self.cluster_name)}/{entry.file_name}", b"")
        except CMLError as exc:
            logger.warning("could not record GPU time of %s: %s", node.app.name, exc)

    def _delete_in_background(self, node: Node, reason: str, with_failure: bool = False) -> None:
        def run() -> None:
            try:
                why = reason + (self._failure_of(node.node_id) if with_failure else "")
                self._delete(node, why)
            except CMLError as exc:
                logger.warning("could not delete %s yet: %s", node.app.name, exc)

        threading.Thread(target=run, name=f"delete-{node.node_id}", daemon=True).start()

    def cleanup_cluster_resources(self) -> None:
        """``ray down``: remove the cluster's folder (launcher, bootstrap config, mailboxes)."""
        self.client.delete_file(self.dir, missing_ok=True)

    # ------------------------------------------------------------------ ray up plumbing

    def get_command_runner(
        self,
        log_prefix,
        node_id,
        auth_config,
        cluster_name,
        process_runner,
        use_internal_ip,
        docker_config=None,
    ):
        from ray_cml_provider.provider.command_runner import CMLCommandRunner

        return CMLCommandRunner(self, node_id, log_prefix)

    @staticmethod
    @ends_command
    def fillout_available_node_types_resources(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Fill each type's Ray resources from its node_config (after validating it).

        This is the first hook ``ray up``/``down``/``exec`` call, before Ray's own schema
        check and before any API call. Ray turns exceptions raised here into a warning, so a
        broken config ends the command here, with one sentence naming the field.
        """
        try:
            validate_cluster_config(cluster_config)
        except ClusterConfigError as exc:
            raise ClusterConfigError(f"invalid cluster config: {exc}") from None
        config = copy.deepcopy(cluster_config)
        head = config.get("head_node_type")
        for name, node_type in (config.get("available_node_types") or {}).items():
            if isinstance(node_type, dict):
                node_type["resources"] = node_type_resources(node_type, is_head=name == head)
        return config

    @staticmethod
    @ends_command
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Validate, check the workspace, then wire workers to start Ray by themselves."""
        validate_cluster_config(cluster_config)
        check_workspace(cluster_config)
        config = copy.deepcopy(cluster_config)
        provider = config["provider"]
        provider["disable_node_updaters"] = True  # workers' launchers start Ray themselves
        provider["use_internal_ips"] = True
        setup = list(config.get("setup_commands") or []) + list(
            config.get("worker_setup_commands") or []
        )
        start = list(config.get("worker_start_ray_commands") or [])
        head_setup = list(config.get("setup_commands") or []) + list(
            config.get("head_setup_commands") or []
        )
        for name, node_type in config["available_node_types"].items():
            internal = {"pip_packages": node_type_packages(cluster_config, name)}
            if name != config["head_node_type"]:
                internal.update(setup_commands=setup, start_commands=start)
            else:  # for a restarted head (head_recovery): its Ray start is recorded
                internal.update(setup_commands=head_setup)
            node_type["node_config"]["_ray_cml"] = internal
        return config

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """The config copied to the head carries no secrets and no laptop paths."""
        config = copy.deepcopy(cluster_config)
        config.get("auth", {}).pop("ssh_private_key", None)
        config["provider"].pop("_config_cache_path", None)
        return config


class _WithoutLegacyFieldWarnings(logging.Filter):
    """Ray fills every external provider's config with its ``MINIMAL_EXTERNAL_CONFIG``, whose
    ``head_node`` and ``worker_nodes`` are empty legacy fields, then warns that it drops them:
    in the head's autoscaler that is two warnings every loop (it reads its config each time),
    burying monitor.log's real events. Nothing in a cluster YAML can avoid it; only that
    message is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Dropping the empty legacy field")


logging.getLogger("ray.autoscaler._private.util").addFilter(_WithoutLegacyFieldWarnings())
