"""``ray-cml job``: a Ray job on a cluster, as a batch job: it brings its cluster, runs,
reports, and (with ``--down``) cleans up.

    ray-cml job submit CONFIG [--working-dir DIR] [--runtime-env FILE] [--down] [--no-wait]
                       -- ENTRYPOINT...
    ray-cml job list CONFIG
    ray-cml job logs CONFIG JOB_ID
    ray-cml job stop CONFIG JOB_ID

``submit`` uses the cluster when its head runs, else brings it up (``ray up``), submits
through Ray's Jobs API with the cluster's token (``cluster/jobs.py``: from a laptop through
the head's URL, from a CML session or job directly), prints the job's log as it comes, and
exits with the job's outcome: 0 when it succeeded, 1 when it failed or was stopped. Ctrl-C
asks whether to stop the job (without a terminal: the job goes on). ``--down`` deletes the
cluster once the job ended, whatever its outcome: the head does it (it knows which job it
waits for), so a submitter that dies, a laptop closed or a CML session ended, still leaves
nothing running; this command waits for it to be done. ``--working-dir`` (or a local
``working_dir`` in the runtime env) travels through the project's files, not Ray's GCS
(``cluster/job_package.py``): the job runs in it on every node.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ray_cml_provider.cluster.job_package import local_working_dir, ship_working_dir
from ray_cml_provider.cluster.jobs import (
    JobAPI,
    JobError,
    delete_after,
    end_after_down,
    job_api,
    wait_until_deleted,
)
from ray_cml_provider.cluster.status import ClusterStatus, collect_status
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLClient, CMLError
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config

# How often the submitter reads the job's status and log (a slow link may want less).
FOLLOW_EVERY_S = float(os.environ.get("RAY_CML_JOB_FOLLOW_S") or 1.0)


def say(line: str) -> None:
    print(f"ray-cml: {line}", file=sys.stderr, flush=True)


def running_head(config: dict, client: CMLClient) -> ClusterStatus | None:
    status = collect_status(config, client, ray_view="none")
    head = status.head
    return status if head is not None and head.cml_status == "RUNNING" else None


def bring_up(config_path: str, config: dict, client: CMLClient) -> ClusterStatus:
    """The running cluster, or ``ray up`` (its output shown) when its head is not running."""
    status = running_head(config, client)
    if status is not None:
        say(f"cluster {config['cluster_name']} is running: the job goes to it")
        return status
    say(f"cluster {config['cluster_name']} is not running: ray up")
    started = time.monotonic()
    up = subprocess.run(["ray", "up", "-y", "--no-config-cache", config_path], check=False)
    if up.returncode != 0:
        raise OperatorError(f"ray up failed (exit status {up.returncode})")
    status = running_head(config, client)
    if status is None:
        raise OperatorError("ray up finished but the cluster's head is not running")
    say(f"cluster {config['cluster_name']} is up after {time.monotonic() - started:.0f} s")
    return status


def runtime_env_of(path: str | None) -> dict:
    if not path:
        return {}
    try:
        value = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise OperatorError(f"--runtime-env {path}: {exc}") from None
    if not isinstance(value, dict):
        raise OperatorError(f"--runtime-env {path}: not a mapping (Ray's runtime_env)")
    return value


def follow(api: JobAPI, job_id: str, printed: list[str] | None = None) -> str:
    """Print the job's log as it comes (kept in ``printed``); its final status. Ctrl-C asks
    whether to stop it."""
    printed = [] if printed is None else printed
    while True:
        try:
            for part in api.follow(job_id, FOLLOW_EVERY_S, lambda s: say(f"job {job_id}: {s}")):
                sys.stdout.write(part)
                sys.stdout.flush()
                printed.append(part)
            return str(api.info(job_id).get("status"))
        except KeyboardInterrupt:
            if sys.stdin.isatty():
                answer = input(f"\nstop job {job_id}? [y/N] ").strip().lower()
            else:
                answer = "n"
            if answer in ("y", "yes"):
                api.stop(job_id)
                say(f"asked Ray to stop job {job_id}")
                continue  # follow it to its end
            say(f"job {job_id} goes on: ray-cml job logs CONFIG {job_id} follows it")
            raise


def unseen_part(printed: str, tail: str) -> str:
    """What of ``tail`` (the end of the job's log) was not printed yet."""
    for overlap in range(min(len(printed), len(tail)), 0, -1):
        if printed.endswith(tail[:overlap]):
            return tail[overlap:]
    return tail if tail not in printed else ""


def submit(args: argparse.Namespace, config: dict, client: CMLClient) -> int:
    if not args.entrypoint:
        raise OperatorError("nothing to run: ray-cml job submit CONFIG -- python my_job.py")
    runtime_env = runtime_env_of(args.runtime_env)
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    local_working_dir(runtime_env)  # a wrong directory fails before the cluster comes up
    status = bring_up(args.config, config, client)
    api = job_api(status, config, client)
    runtime_env = ship_working_dir(
        runtime_env, client, config["cluster_name"], status.head.node_id, say
    )
    entrypoint = shlex.join(args.entrypoint)
    job_id = api.submit(entrypoint, runtime_env, args.submission_id)
    say(f"job {job_id} submitted: {entrypoint}")
    if args.down:
        say(delete_after(client, config["cluster_name"], status.head.node_id, job_id))
    if args.no_wait:
        say(f"ray-cml job logs {args.config} {job_id} follows it")
        return 0
    printed: list[str] = []
    try:
        final = follow(api, job_id, printed)
    except KeyboardInterrupt:
        return 130
    except JobError as exc:
        if not args.down:
            raise
        # The head deletes the cluster once the job ended, and may be quicker than this
        # follower's last look: the job's end is in the run's history, written first.
        say(f"the head's Jobs API went away ({exc}): the job's end from the cluster's history")
        kept = end_after_down(client, config["cluster_name"], status.head.node_id, job_id)
        if kept is None:
            unknown = f"job {job_id}: its end is not known (ray-cml history shows it)"
            raise JobError(unknown) from exc
        sys.stdout.write(unseen_part("".join(printed), kept.get("log_tail", "")))
        final = str(kept.get("status"))
    say(f"job {job_id} {final.lower()}")
    if args.down:
        say(f"waiting for the head to delete cluster {config['cluster_name']}")
        if wait_until_deleted(client, config["cluster_name"]):
            say(f"cluster {config['cluster_name']} deleted")
        else:  # the head could not: do it from here
            say("the head did not delete the cluster: ray down")
            subprocess.run(["ray", "down", "-y", args.config], check=False)
    return 0 if final == "SUCCEEDED" else 1


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; what follows the first ``--`` is the job's entrypoint, so the
    options may come before or after the cluster YAML."""
    entrypoint: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, entrypoint = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="ray-cml job", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub = verbs.add_parser("submit", help="run a Ray job on the cluster (brought up if needed)")
    sub.add_argument("config", help="the cluster YAML")
    sub.add_argument(
        "--working-dir", help="a directory the job runs in, on every node (via the project)"
    )
    sub.add_argument("--runtime-env", help="a YAML or JSON file: Ray's runtime_env for the job")
    sub.add_argument("--submission-id", help="the job's id (default: a new one)")
    sub.add_argument("--down", action="store_true", help="delete the cluster once the job ended")
    sub.add_argument("--no-wait", action="store_true", help="submit, then return")
    listing = verbs.add_parser("list", help="the cluster's Ray jobs")
    listing.add_argument("config", help="the cluster YAML")
    listing.add_argument("--json", action="store_true", help="as JSON")
    for verb, what in (
        ("logs", "print a job's log (following it while it runs)"),
        ("stop", "stop a job"),
    ):
        one = verbs.add_parser(verb, help=what)
        one.add_argument("config", help="the cluster YAML")
        one.add_argument("job_id", help="the job's submission id")
    args = parser.parse_args(argv)
    args.entrypoint = entrypoint
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    config: dict[str, Any] = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            if args.verb == "submit":
                return submit(args, config, client)
            status = running_head(config, client)
            if status is None:
                raise OperatorError(f"cluster {config['cluster_name']} is not running")
            api = job_api(status, config, client)
            if args.verb == "list":
                jobs = api.list()
                if args.json:
                    print(json.dumps(jobs))
                for job in [] if args.json else jobs:
                    ident = job.get("submission_id") or job.get("job_id")
                    print(f"{ident}  {job.get('status')}  {job.get('entrypoint', '')}")
            elif args.verb == "logs":
                final = follow(api, args.job_id)
                return 0 if final == "SUCCEEDED" else 1
            else:
                stopped = api.stop(args.job_id)
                say(f"job {args.job_id}: " + ("stopping" if stopped else "had already ended"))
            return 0
    except KeyboardInterrupt:
        return 130
    except (ClusterConfigError, OperatorError, CMLError, JobError) as exc:
        return report_failure(exc, config["provider"])
