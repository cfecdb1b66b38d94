"""Command line of the CML emulator: ``ray-cml emulator`` / ``python -m ray_cml_provider.emulator``.

Its first line on stdout is always ``CML emulator listening on http://HOST:PORT``, so a
script can start it with ``--port 0`` and read the address back. It runs until killed; on
SIGTERM, SIGINT or SIGHUP it ends every application process group it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ray_cml_provider.emulator.project_files import ProjectFiles
from ray_cml_provider.emulator.server import EmulatorAPI, make_http_server
from ray_cml_provider.emulator.state import (
    DEFAULT_START_DELAY_S,
    EmulatorConfig,
    Quota,
    WorkspaceState,
)
from ray_cml_provider.emulator.traffic import Faults

API_KEY_ENV = "CML_EMULATOR_API_KEY"


def interpreter(python: str) -> str:
    """The ``--python`` interpreter as an absolute path, resolved once here: engines run in
    the project folder, where a relative path would name nothing. A bare name is looked up
    on PATH. Symlinks are kept (a venv's ``bin/python`` is one, and must stay the venv's)."""
    if os.sep in python:
        return os.path.abspath(python)
    return shutil.which(python) or python


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-cml emulator",
        description="A local CML API v2 server whose applications are local processes.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--project-dir",
        help="folder that plays the project filesystem /home/cdsw "
        "(default: a new temporary folder)",
    )
    parser.add_argument(
        "--log-dir", help="where each application's output goes (default: a new temporary folder)"
    )
    parser.add_argument(
        "--api-key",
        help=f"the bearer key the API accepts (default: ${API_KEY_ENV}, else a generated "
        "one, printed at start)",
    )
    parser.add_argument("--project-id", default="emul-ator-proj-0001")
    parser.add_argument("--project-name", default="ray-on-cml")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that runs application scripts"
    )
    parser.add_argument(
        "--runtime",
        action="append",
        default=[],
        metavar="IMAGE_ID=PYTHON",
        help="run the engines of runtime IMAGE_ID with interpreter PYTHON (repeatable). A "
        "CML runtime has Python and pip but no Ray: give a plain Python to play one. An id "
        "that is not a default runtime is added to the workspace's runtimes",
    )
    parser.add_argument(
        "--file-delay-s",
        type=float,
        default=0.0,
        help="seconds before a file written through the API is visible to running engines, "
        "and one an engine wrote is visible to the API: the project filesystem is NFS, whose "
        "clients cache directory attributes (Linux's acdirmin is 30 s). An engine that "
        "starts sees everything written before it (a fresh mount)",
    )
    parser.add_argument(
        "--start-delay-s",
        type=float,
        default=DEFAULT_START_DELAY_S,
        help="seconds an application's process runs while still STARTING before it is "
        f"RUNNING, as on CML, where it is never instant (default: {DEFAULT_START_DELAY_S:g})",
    )
    parser.add_argument(
        "--schedule-delay-s",
        type=float,
        default=0.0,
        help="seconds an application waits in STARTING before its process starts (CML "
        "scheduling it, adding a GPU node, pulling the runtime image)",
    )
    parser.add_argument(
        "--stop-grace-s",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL on stop or delete",
    )
    parser.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="share of API requests whose answer is lost after the work is done (0..1)",
    )
    parser.add_argument(
        "--restart-failed",
        type=int,
        default=0,
        help="restart a FAILED application up to N times, as CML does (CML's default: 3)",
    )
    parser.add_argument(
        "--restart-delay-s",
        type=float,
        default=300.0,
        help="seconds between a failure and the restart (CML's default: 300)",
    )
    parser.add_argument(
        "--ip-block",
        type=int,
        default=0,
        choices=range(0, 255),
        metavar="N",
        help="engines get loopback addresses 127.N.x.y (default 0: 127.0.0.2, .3, ...); "
        "emulators running side by side on one machine each take their own block, as "
        "engines of one workspace never share an address",
    )
    parser.add_argument(
        "--shared-memory-mb",
        type=int,
        default=None,
        help="the project's shared_memory_limit in MB. Default: the size of this machine's "
        "/dev/shm, which the emulator's applications really share (CML's default is 64)",
    )
    parser.add_argument(
        "--forbid-unauthenticated-apps",
        action="store_true",
        help="play a workspace whose administrator forbids applications that bypass CML's "
        "login (bypass_authentication is refused)",
    )
    parser.add_argument("--max-cpu", type=float, help="workspace quota of vCPUs")
    parser.add_argument("--max-memory", type=float, help="workspace quota of memory, GB")
    parser.add_argument("--max-gpus", type=int, help="workspace quota of GPUs")
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of API requests answered 429 or 503 (0..1)",
    )
    parser.add_argument("--fault-seed", type=int, help="seed for reproducible faults")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay added to every API request"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def machine_shared_memory_mb() -> int:
    """What the emulator's applications really get: this machine's /dev/shm (64 if none)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return 64
    return int(stats.f_frsize * stats.f_blocks / 1e6)


def runtime_pythons(specs: list[str]) -> dict[str, str]:
    """``IMAGE_ID=PYTHON`` pairs of ``--runtime``, interpreters resolved; ValueError if bad."""
    pythons = {}
    for spec in specs:
        image, sep, python = spec.partition("=")
        if not sep or not image.strip() or not python.strip():
            raise ValueError(f"--runtime {spec!r}: expected IMAGE_ID=PYTHON")
        resolved = interpreter(python.strip())
        if not os.access(resolved, os.X_OK):
            raise ValueError(f"--runtime {spec!r}: {python!r} is not an executable interpreter")
        pythons[image.strip()] = resolved
    return pythons


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pythons = runtime_pythons(args.runtime)
    except ValueError as exc:
        print(f"ray-cml emulator: {exc}", file=sys.stderr)
        return 2
    for flag, value in (("--fault-rate", args.fault_rate), ("--drop-rate", args.drop_rate)):
        if not 0.0 <= value <= 1.0:
            print(f"ray-cml emulator: {flag} must be between 0 and 1", file=sys.stderr)
            return 2
    project_dir = Path(args.project_dir or tempfile.mkdtemp(prefix="cml-project-")).resolve()
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="cml-emulator-logs-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    generated_key = not api_key
    api_key = api_key or secrets.token_urlsafe(24)

    config = EmulatorConfig(
        project_dir=project_dir,
        log_dir=log_dir,
        api_url="",  # known once the socket is bound
        project_id=args.project_id,
        project_name=args.project_name,
        python=interpreter(args.python),
        runtime_pythons=pythons,
        start_delay_s=args.start_delay_s,
        schedule_delay_s=args.schedule_delay_s,
        stop_grace_s=args.stop_grace_s,
        restart_failed=args.restart_failed,
        restart_delay_s=args.restart_delay_s,
        ip_block=args.ip_block,
        shared_memory_mb=args.shared_memory_mb or machine_shared_memory_mb(),
        quota=Quota(args.max_cpu, args.max_memory, args.max_gpus),
        forbid_unauthenticated_apps=args.forbid_unauthenticated_apps,
    )
    faults = Faults(
        rate=args.fault_rate,
        latency_ms=args.latency_ms,
        seed=args.fault_seed,
        drop_rate=args.drop_rate,
    )
    api: EmulatorAPI | None = None
    files = ProjectFiles(project_dir, visibility_delay_s=args.file_delay_s)
    state = WorkspaceState(
        config, on_engine_key=lambda key, ok: api.set_engine_key(key, ok), files=files
    )
    api = EmulatorAPI(state, files, api_key, faults)
    server = make_http_server(api, args.host, args.port, verbose=args.verbose)
    host, port = server.server_address[:2]
    config.api_url = f"http://{host}:{port}"

    print(f"CML emulator listening on {config.api_url}", flush=True)
    print(f"  project id:  {config.project_id}", flush=True)
    print(f"  project dir: {project_dir}", flush=True)
    print(f"  app logs:    {log_dir}", flush=True)
    print(f"  app URLs:    {config.api_url}/apps/<subdomain>/", flush=True)
    if generated_key:
        print(f"  API key (generated): {api_key}", flush=True)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    state.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except SystemExit:
        pass
    finally:
        state.shutdown()
        server.server_close()
    return 0
