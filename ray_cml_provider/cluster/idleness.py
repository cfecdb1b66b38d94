"""Is the cluster idle? What the head's autostop (``node/autostop.py``) asks every few seconds.

Run on the head as ``python -m ray_cml_provider.cluster.idleness --dashboard URL``; prints one
JSON line ``{"idle": bool, "busy": [reasons]}``. A cluster is idle when nothing of a user's
runs on it:

- no Ray job is pending or running: jobs submitted with ``ray job submit``/``ray submit``
  and drivers connected with ``ray.init`` (a Ray Client connection is a driver too);
- no actor is alive outside Serve's own (a detached actor of a finished job is still work);
- no Serve application is deployed (a deployed app, even scaled to zero, is a service
  someone may call).

Tasks belong to a job or an actor, so they are covered by both. Ray's own processes (the
autoscaler, Serve's controller and proxies with no application) do not count.
"""

from __future__ import annotations

import argparse
import json
import sys

import requests

SERVE_NAMESPACE = "serve"


def busy_reasons(dashboard: str) -> list[str]:
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )
    from ray.util.state import list_actors, list_jobs

    reasons = []
    jobs = [
        job
        for job in list_jobs(address=dashboard, raise_on_missing_output=False)
        if str(job.status).rsplit(".", 1)[-1] in ("PENDING", "RUNNING")
    ]
    if jobs:
        reasons.append(f"{len(jobs)} Ray job(s) or driver(s) running")
    actors = [
        actor
        for actor in list_actors(
            address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        )
        if actor.ray_namespace != SERVE_NAMESPACE
    ]
    if actors:
        reasons.append(f"{len(actors)} actor(s) alive")
    answer = requests.get(
        f"{dashboard}/api/serve/applications/",
        headers=get_auth_headers_if_auth_enabled({}),
        timeout=10,
    )
    if answer.ok and (answer.json().get("applications") or {}):
        reasons.append(f"{len(answer.json()['applications'])} Serve application(s) deployed")
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dashboard", required=True, help="the head's dashboard, http://IP:PORT")
    args = parser.parse_args(argv)
    try:
        busy = busy_reasons(args.dashboard)
    except Exception as exc:  # Ray not (yet) answering: not known to be idle
        print(json.dumps({"idle": False, "busy": [f"cannot tell: {exc}"[:300]]}))
        return 1
    print(json.dumps({"idle": not busy, "busy": busy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
