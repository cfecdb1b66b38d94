"""The contract between the provider side and the node side, written down once.

The laptop's provider, the head's provider, ``ray-cml status``/``gc``/``doctor`` and every
node's launcher are different processes, often on different machines; what they share is
CML itself: application names and descriptions, variables on the application, and files in
the project. This module is everything they must agree on, and nothing else spells it:

- **applications**: the name ``ray-<cluster>-<head|worker>-<node id>`` (node id: 8 hex
  digits) and Ray's tags as JSON in the description (``encode_tags``/``parse_application``);
- **the cluster's folder** in the project, ``.ray-cml/<cluster>``: Ray's token and the
  endpoint key (``auth/``), the GCS state of a recovering head (``gcs/``), the GPU ledger,
  the autostop record, and each node's folder (``NodeFolder``): the address its launcher
  publishes (``node.json``), why it gave up (``failure.txt``), its mailbox (``inbox/``,
  ``outbox/``), its recovery record and its autoscaler watchdog's record;
- **the clusters' history**, ``.ray-cml/_history/<cluster>/<run>.json``: outside the
  cluster's folder, so it outlives ``ray down`` (``HistoryRecord``);
- **variables**: what the provider sets on a node's application (``NodeSpec``), what the
  bootstrap hands the launcher (``Handoff``), what every command of a node sees
  (``CommandVar``);
- **records**, each a dataclass with one JSON round-trip (``to_json``/``from_json``, the
  latter raising ``ValueError`` for anything else): ``NodeInfo``, ``Request`` and ``Result``
  (the mailbox), ``RecoveryRecord``, ``AutostopRecord``, ``AutoscalerRecord``,
  ``HistoryRecord``;
- the ``ray start --head`` pattern a head's recovery and ``ray up``'s runner both look for.

Standard library only: the node's bootstrap imports it before anything is installed (it is
uploaded next to ``bootstrap.py``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

# ---------------------------------------------------------------------- applications

# Ray's tag keys (ray.autoscaler.tags), spelled out so readers of the names need no Ray.
TAG_CLUSTER_NAME = "ray-cluster-name"
TAG_USER_NODE_TYPE = "ray-user-node-type"
HEAD, WORKER = "head", "worker"

TAGS_PREFIX = "ray-cml node "
NODE_NAME = re.compile(
    r"ray-(?P<cluster>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<kind>head|worker)-(?P<id>[0-9a-f]{8})"
)


def application_prefix(cluster_name: str = "", kind: str = "") -> str:
    """What the names of the cluster's applications (of ``kind``) start with: the name
    filter of a list call. CML's filter matches substrings, so a match is re-checked with
    ``parse_application``. Without a cluster: every application of this project's."""
    if not cluster_name:
        return "ray-"
    return f"ray-{cluster_name}-" + (f"{kind}-" if kind else "")


def application_name(cluster_name: str, kind: str, node_id: str) -> str:
    return f"{application_prefix(cluster_name, kind)}{node_id}"


def encode_tags(tags: dict[str, str]) -> str:
    return TAGS_PREFIX + json.dumps(tags, sort_keys=True, separators=(",", ":"))


def decode_tags(description: str) -> dict[str, str] | None:
    if not description.startswith(TAGS_PREFIX):
        return None
    try:
        tags = json.loads(description[len(TAGS_PREFIX) :])
    except ValueError:
        return None
    return tags if isinstance(tags, dict) else None


@dataclass(frozen=True)
class NodeName:
    cluster: str
    kind: str  # HEAD or WORKER
    node_id: str


def parse_application(name: str, description: str) -> tuple[NodeName, dict[str, str]] | None:
    """This project's node, or None for any other application.

    A name can be read two ways when cluster names contain hyphens, so the cluster is the
    one the tags name, and the name must be exactly what the provider would have written.
    """
    match = NODE_NAME.fullmatch(name)
    tags = decode_tags(description)
    if not match or tags is None:
        return None
    cluster = tags.get(TAG_CLUSTER_NAME, "")
    if name != application_name(cluster, match["kind"], match["id"]):
        return None
    return NodeName(cluster, match["kind"], match["id"]), tags


# ---------------------------------------------------------------------- the cluster's folder

CLUSTERS_DIR = ".ray-cml"
SAFE_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
LEDGER_ENTRY = re.compile(
    r"(?P<id>[0-9a-f]+)_(?P<gpus>\d+)_(?P<start>\d+)_(?P<end>\d+)(?:_(?P<type>.+))?"
)


def cluster_dir(cluster_name: str) -> str:
    """The cluster's folder in the project filesystem, relative to the project root."""
    return f"{CLUSTERS_DIR}/{cluster_name}"


def auth_token_path(cluster_name: str) -> str:
    """The cluster's Ray token, relative to the project root (``provider/ray_auth.py``)."""
    return f"{cluster_dir(cluster_name)}/auth/token"


def endpoint_key_path(cluster_name: str) -> str:
    """The key callers of the head's ``/v1`` send (``provider/endpoint.py``)."""
    return f"{cluster_dir(cluster_name)}/auth/endpoint_key"


def metrics_key_path(cluster_name: str) -> str:
    """The key a scraper of the head's ``/metrics`` sends (``provider/metrics_key.py``): it
    reads figures only, never runs code or calls a model."""
    return f"{cluster_dir(cluster_name)}/auth/metrics_key"


def gcs_state_path(cluster_name: str) -> str:
    """Where a head with ``provider.head_recovery`` keeps its GCS state (RocksDB), so that
    a restarted head starts Ray again from it (``node/recovery.py``)."""
    return f"{cluster_dir(cluster_name)}/gcs"


def autostop_record_path(cluster_name: str) -> str:
    """What a head that stopped its idle cluster leaves behind (``node/autostop.py``)."""
    return f"{cluster_dir(cluster_name)}/autostopped.json"


JOB_PACKAGE_NAME = re.compile(r"_ray_pkg_[0-9a-f]{16,64}\.zip")


def job_package_path(cluster_name: str, package: str) -> str:
    """A job's working directory as Ray's zip (``ray-cml job submit --working-dir``), named
    by its content (``_ray_pkg_<hash>.zip``), in the cluster's folder: ``ray down`` takes it
    too. Ray's runtime env reads it on each node as ``file://<project>/<this path>``."""
    if not JOB_PACKAGE_NAME.fullmatch(package):
        raise ValueError(f"not a job package name: {package!r}")
    return f"{cluster_dir(cluster_name)}/jobs/{package}"


HISTORY_DIR = f"{CLUSTERS_DIR}/_history"  # "_" cannot begin a cluster's name
HISTORY_RUN = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")


def history_dir(cluster_name: str = "") -> str:
    """Where the head keeps its cluster's runs (``node/history.py``); ``ray down`` and
    ``ray-cml gc`` delete the cluster's folder but not this one."""
    return f"{HISTORY_DIR}/{cluster_name}" if cluster_name else HISTORY_DIR


def history_run_name(started_at: float, head_id: str) -> str:
    """A run's name: when its head's Ray started (UTC), then the head; sorts by time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at)) + f"-{head_id}"


def ledger_dir(cluster_name: str) -> str:
    """The GPU ledger: one empty file per deleted GPU node, ``<id>_<gpus>_<start>_<end>``
    and ``_<node type>`` when the type's name is safe in a file name, so GPU-hours since
    the cluster started survive scale-down with one list call."""
    return f"{cluster_dir(cluster_name)}/ledger"


@dataclass(frozen=True)
class LedgerEntry:
    node_id: str
    gpus: int
    start_s: float
    end_s: float
    node_type: str = ""

    @property
    def file_name(self) -> str:
        name = f"{self.node_id}_{self.gpus}_{int(self.start_s)}_{int(self.end_s)}"
        return name + (f"_{self.node_type}" if SAFE_TYPE.fullmatch(self.node_type) else "")

    @classmethod
    def parse(cls, file_name: str) -> LedgerEntry | None:
        match = LEDGER_ENTRY.fullmatch(file_name)
        if not match:
            return None
        return cls(
            match["id"],
            int(match["gpus"]),
            float(match["start"]),
            float(match["end"]),
            match["type"] or "",
        )


@dataclass(frozen=True)
class NodeFolder:
    """One node's folder in the cluster's, as paths relative to the project root (what the
    files API takes; a node joins them to its mount's root)."""

    cluster_dir: str
    node_id: str

    REQUEST_SUFFIX: ClassVar[str] = ".json"
    RESULT_SUFFIX: ClassVar[str] = ".result"
    RESULT_KEPT_S: ClassVar[float] = 600.0

    @classmethod
    def of(cls, cluster_name: str, node_id: str) -> NodeFolder:
        return cls(cluster_dir(cluster_name), node_id)

    @property
    def path(self) -> str:
        return f"{self.cluster_dir}/nodes/{self.node_id}"

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    info = property(lambda self: self._file("node.json"))  # NodeInfo
    failure = property(lambda self: self._file("failure.txt"))  # why its launcher gave up
    recovery = property(lambda self: self._file("recovery.json"))  # RecoveryRecord
    autoscaler = property(lambda self: self._file("autoscaler.json"))  # AutoscalerRecord
    setup_log = property(lambda self: self._file("setup.log"))  # a worker's setup and start
    recovery_log = property(lambda self: self._file("recovery.log"))
    bin = property(lambda self: self._file("bin"))  # the `ray` shim
    inbox = property(lambda self: self._file("inbox"))
    outbox = property(lambda self: self._file("outbox"))

    def request(self, name: str) -> str:
        """A posted ``Request``; the launcher runs each name once."""
        return f"{self.inbox}/{name}{self.REQUEST_SUFFIX}"

    def result(self, name: str) -> str:
        """The request's ``Result`` (exit status and output in one file): the runner polls
        for it. The node removes the request once this is published, and results it kept
        for ``RESULT_KEPT_S``: the runner deletes nothing (a round trip it would wait on)."""
        return f"{self.outbox}/{name}{self.RESULT_SUFFIX}"

    @classmethod
    def request_names(cls, file_names) -> set[str]:
        """The requests among the inbox's file names."""
        suffix = cls.REQUEST_SUFFIX
        return {n[: -len(suffix)] for n in file_names if n.endswith(suffix)}


# ---------------------------------------------------------------------- commands

# `ray up`'s head start: a recovering head records the request that ran it, and the laptop's
# runner prints how to connect after it.
HEAD_START = re.compile(r"\bray start\b.*--head\b", re.S)
# `ray stop` needs no node environment (the shim runs the bootstrap's stop-ray): `ray down`
# must stop a node whose environment failed.
RAY_STOP = re.compile(r"\s*ray stop(\s+-[-\w=]+)*\s*")  # with its flags (--force)


class CommandVar:
    """What every command a node runs sees besides its application's variables: the ports
    the node chose (the cluster YAML's start commands use them), where things are, and what
    the ``ray`` shim's ``ray stop`` stops."""

    GCS_PORT = "RAY_CML_GCS_PORT"
    CLIENT_PORT = "RAY_CML_CLIENT_PORT"
    AGENT_PORT = "RAY_CML_AGENT_PORT"
    DASHBOARD_PORT = "RAY_CML_DASHBOARD_PORT"  # head: the dashboard's (behind the gateway)
    PROJECT_DIR = "RAY_CML_PROJECT_DIR"
    PYTHON = "RAY_CML_PYTHON"  # the runtime's interpreter, the one `ray` runs with
    LAUNCHER_PGID = "RAY_CML_LAUNCHER_PGID"
    LAUNCHER_PID = "RAY_CML_LAUNCHER_PID"

    ALL: ClassVar[tuple[str, ...]] = (
        GCS_PORT,
        CLIENT_PORT,
        AGENT_PORT,
        DASHBOARD_PORT,
        PROJECT_DIR,
        PYTHON,
        LAUNCHER_PGID,
        LAUNCHER_PID,
    )


# ---------------------------------------------------------------------- variables as records

_Codec = tuple[Callable[[Any], str], Callable[[str], Any]]
_TEXT: _Codec = (str, str)
_INT: _Codec = (str, int)
_FLOAT: _Codec = (lambda v: f"{v:g}", float)
_FLAG: _Codec = (lambda v: "1" if v else "", lambda s: s == "1")
_JSON_LIST: _Codec = (json.dumps, lambda s: list(json.loads(s)))


def _var(name: str, default: Any = "", codec: _Codec = _TEXT) -> Any:
    """A field carried in the variable ``name``."""
    value: dict[str, Any] = {"default_factory": list} if default == [] else {"default": default}
    return field(metadata={"var": name, "codec": codec}, **value)


class _Variables:
    """A record carried in environment variables: ``to_env`` writes the fields that differ
    from their defaults, ``from_env`` reads them back (a missing variable: the default)."""

    def to_env(self) -> dict[str, str]:
        env = {}
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            if value != _default(spec):
                env[spec.metadata["var"]] = spec.metadata["codec"][0](value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]):
        values = {}
        for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
            raw = env.get(spec.metadata["var"], "")
            if raw != "":
                try:
                    values[spec.name] = spec.metadata["codec"][1](raw)
                except ValueError as exc:
                    raise ValueError(f"{spec.metadata['var']}={raw!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def var(cls, field_name: str) -> str:
        """The variable that carries ``field_name``."""
        return next(
            spec.metadata["var"]
            for spec in dataclasses.fields(cls)  # type: ignore[arg-type]
            if spec.name == field_name
        )

    @classmethod
    def variables(cls) -> tuple[str, ...]:
        return tuple(spec.metadata["var"] for spec in dataclasses.fields(cls))  # type: ignore[arg-type]


def _default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return spec.default


@dataclass
class NodeSpec(_Variables):
    """What the provider sets on a node's application and its launcher reads."""

    cluster: str = _var("RAY_CML_CLUSTER")
    node_id: str = _var("RAY_CML_NODE_ID")  # also RAY_CLOUD_INSTANCE_ID
    kind: str = _var("RAY_CML_NODE_KIND", WORKER)
    node_type: str = _var("RAY_NODE_TYPE_NAME")  # Ray's own variable: the node's type
    app_name: str = _var("RAY_CML_APP_NAME")  # a node deletes its own application by it
    cluster_dir: str = _var("RAY_CML_DIR")  # relative to the project
    head_lost_timeout_s: float = _var("RAY_CML_HEAD_LOST_TIMEOUT_S", 60.0, _FLOAT)
    pip_packages: list = _var("RAY_CML_PIP_PACKAGES", [], _JSON_LIST)
    runtime: str = _var("RAY_CML_RUNTIME")  # the runtime's image (part of the env's key)
    auth_token_file: str = _var("RAY_CML_AUTH_TOKEN_FILE")  # provider/ray_auth.py
    provider_zip: str = _var("RAY_CML_PROVIDER_ZIP")  # the code the launcher runs
    setup_commands: list = _var("RAY_CML_SETUP_COMMANDS", [], _JSON_LIST)
    start_commands: list = _var("RAY_CML_START_COMMANDS", [], _JSON_LIST)  # worker
    head_recovery: bool = _var("RAY_CML_HEAD_RECOVERY", False, _FLAG)  # both kinds
    # head only
    gcs_port_preferred: int = _var("RAY_CML_GCS_PORT_PREFERRED", 6379, _INT)
    endpoint_key_file: str = _var("RAY_CML_ENDPOINT_KEY_FILE")  # provider/endpoint.py
    metrics_key_file: str = _var("RAY_CML_METRICS_KEY_FILE")  # provider/metrics_key.py
    login_bypassed: bool = _var("RAY_CML_LOGIN_BYPASSED", False, _FLAG)
    gateway_idle_s: float = _var("RAY_CML_GATEWAY_IDLE_S", 60.0, _FLOAT)
    gateway_max_connections: int = _var("RAY_CML_GATEWAY_MAX_CONNECTIONS", 0, _INT)  # 0: auto
    autoscaler_stuck_s: float = _var("RAY_CML_AUTOSCALER_STUCK_S", 60.0, _FLOAT)
    serve_port: int = _var("RAY_CML_SERVE_PORT", 8000, _INT)
    autostop_minutes: float = _var("RAY_CML_AUTOSTOP_MINUTES", 0.0, _FLOAT)
    prometheus: str = _var("RAY_CML_HEAD_PROMETHEUS", "auto")  # node/prometheus.py
    history_every_s: float = _var("RAY_CML_HISTORY_EVERY_S", 60.0, _FLOAT)  # node/history.py
    # worker only: where its head is (the cluster YAML's start commands use the last two)
    head_node_id: str = _var("RAY_CML_HEAD_NODE_ID")
    head_ip: str = _var("RAY_HEAD_IP")
    head_gcs_port: int = _var("RAY_HEAD_GCS_PORT", 0, _INT)
    # The head's application port: bound to the head's own address only (Ray's GCS listens
    # on every address), so it tells this head from another on the same machine.
    head_app_port: int = _var("RAY_CML_HEAD_APP_PORT", 0, _INT)

    @property
    def is_head(self) -> bool:
        return self.kind == HEAD

    @property
    def folder(self) -> NodeFolder:
        return NodeFolder(self.cluster_dir, self.node_id)


@dataclass
class Handoff(_Variables):
    """What the bootstrap hands the launcher about the node's Python environment."""

    site: str = _var("RAY_CML_NODE_SITE")  # the environment's folder; empty: the runtime's
    summary: str = _var("RAY_CML_ENVIRONMENT_SUMMARY")  # what `ray up` prints
    error: str = _var("RAY_CML_ENVIRONMENT_ERROR")  # why it could not be made
    runtime_pythonpath: str = _var("RAY_CML_RUNTIME_PYTHONPATH")  # for the node's commands


# ---------------------------------------------------------------------- records as JSON


class _Record:
    """A dataclass with one JSON round-trip. ``from_json`` takes only a JSON object whose
    keys are fields (unknown keys, from a newer writer, are left out) and raises
    ``ValueError`` for anything else."""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: bytes | str):
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError(f"{cls.__name__}: not a JSON object")
        known = {spec.name for spec in dataclasses.fields(cls)}  # type: ignore[arg-type]
        try:
            record = cls(**{k: v for k, v in value.items() if k in known})
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"{cls.__name__}: {exc}") from None
        record._check()
        return record

    def _check(self) -> None:
        """Raise ValueError when a field has the wrong type."""
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            expected = _JSON_TYPES.get(str(spec.type))
            value = getattr(self, spec.name)
            if expected and not isinstance(value, expected):
                raise ValueError(f"{type(self).__name__}.{spec.name}: {value!r}")


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
    "dict[str, str]": (dict,),
}


@dataclass
class NodeInfo(_Record):
    """``node.json``: where a node's launcher can be reached, published at its start."""

    node_id: str
    kind: str
    ip: str
    gcs_port: int
    node_type: str = ""  # the cluster YAML's name of its type
    client_port: int = 0
    # The one port CML's proxy exposes (the application's URL): on the head, the gateway to
    # the dashboard and the OpenAI API (/v1) of Serve on serve_port.
    app_port: int = 0
    dashboard_port: int = 0
    serve_port: int = 0
    endpoint_locked: bool = False
    ray_auth: str = "disabled"  # whether Ray asks for the token ("token")
    auth_token_path: str = ""  # the token file a session of the project uses
    pid: int = 0
    started_at: float = 0.0
    life: int = 1  # which start of the node's application (CML restarts a failed one)
    prometheus_port: int = 0  # the head's Prometheus for the dashboard, on its loopback
    # The node's environment when it was ready at the launcher's start: what the first
    # contact would otherwise ask for (``Request.ENVIRONMENT_REPORT``); empty when it was
    # not (the report then tries to build it again and says why it fails).
    environment: str = ""
    ray_version: str = ""


@dataclass
class Request(_Record):
    """A mailbox request: files to write first (``ray up``'s file mounts), then a command
    run in bash with ``env`` added; or ``report: "environment"``, the node's environment
    report (``ray up``'s first contact)."""

    cmd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    files: list = field(default_factory=list)  # {"path", "data" (base64), "mode"?}
    report: str = ""
    # True for what a user asked for (ray up/exec/submit): the head's history keeps it; not
    # ray-cml's own questions (status, top, copying a file back).
    history: bool = False

    ENVIRONMENT_REPORT: ClassVar[str] = "environment"
    # ``ray-cml job submit --down``: the head deletes its cluster once the Ray job named in
    # ``env["job"]`` ended, whatever becomes of the submitter (node/down_after_job.py).
    DOWN_AFTER_JOB: ClassVar[str] = "down-after-job"
    # ``ray-cml job submit --working-dir``: the head makes sure the package at
    # ``env["package"]`` (``job_package_path``) is in the project as every node sees it (a
    # fresh upload may not be, through NFS, yet) and answers its ``file://`` URI.
    JOB_PACKAGE: ClassVar[str] = "job-package"

    @property
    def is_ray_stop(self) -> bool:
        return bool(RAY_STOP.fullmatch(self.cmd))

    @property
    def starts_head(self) -> bool:
        return bool(HEAD_START.search(self.cmd))


@dataclass
class Result:
    """A request's answer, published as one file (``outbox/<name>.result``): a header line
    ``ray-cml-result <exit status> <output length>`` then the output. One file is one upload
    for the node and one download for the runner (an exit status and an output apart cost
    a round trip more each); the length tells a whole file from one still being written."""

    exit_status: int
    output: bytes = b""

    HEADER: ClassVar[bytes] = b"ray-cml-result"

    def to_bytes(self) -> bytes:
        return b"%s %d %d\n" % (self.HEADER, self.exit_status, len(self.output)) + self.output

    @classmethod
    def from_bytes(cls, data: bytes) -> Result | None:
        """The result; None while the file is not whole (or not a result)."""
        header, newline, output = data.partition(b"\n")
        fields = header.split()
        if not newline or len(fields) != 3 or fields[0] != cls.HEADER:
            return None
        try:
            code, length = int(fields[1]), int(fields[2])
        except ValueError:
            return None
        return cls(code, output) if len(output) == length else None


@dataclass
class RecoveryRecord(_Record):
    """The ``ray start --head`` request a head with recovery ran last: what its next life
    runs again, from the cluster's saved GCS state."""

    cmd: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class AutostopRecord(_Record):
    """What a head that stopped its idle cluster leaves in the cluster's folder."""

    stopped_at: str
    idle_minutes: float
    autostop_minutes: float
    head: str


@dataclass
class AutoscalerRecord(_Record):
    """What the head's watchdog publishes when it restarted a stuck autoscaler."""

    restarts: int
    last_restart_at: float
    stalled_s: float
    stacks: str = ""


@dataclass
class HistoryRecord(_Record):
    """One run of a cluster (a life of its head's Ray), kept after the cluster is gone:
    written by the head every ``NodeSpec.history_every_s`` and when its Ray stops
    (``node/history.py``), read by ``ray-cml history``. Bounded in size; no secret in it."""

    cluster: str
    run: str  # history_run_name
    head: str  # the head's node id
    started_at: float
    updated_at: float = 0.0
    ended_at: float = 0.0  # 0 while the run goes on (or its head was lost unseen)
    ended_by: str = ""  # "ray stop" | "autostop" | "head lost" | ...
    # {id, type, entrypoint, status, message, start_time, end_time, log_tail}
    jobs: list = field(default_factory=list)
    # {cmd, started_at, ended_at, exit_status, output_tail}: ray up/exec/submit's commands
    commands: list = field(default_factory=list)
    serve: dict = field(default_factory=dict)  # application -> {status, message, deployments}
    autoscaler: list = field(default_factory=list)  # monitor.log's decisions, with times
    # {node_id, kind, node_type, gpus, started_at, ended_at, gpu_hours}
    nodes: list = field(default_factory=list)
    gpu_hours: float = 0.0
    top: dict = field(default_factory=dict)  # the last figures (cluster/top.py's TopReport)
    notes: list = field(default_factory=list)  # what could not be read, and why

    @property
    def is_open(self) -> bool:
        return not self.ended_at
