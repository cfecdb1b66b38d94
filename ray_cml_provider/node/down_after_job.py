"""``ray-cml job submit --down``: the head deletes its cluster once the job has ended.

The submitter asks through the head's mailbox (``Request.DOWN_AFTER_JOB``) right after the
job was accepted, so the cluster goes whatever becomes of the submitter: a laptop closed, a
CML session or job that ended, a Ctrl-C. The head asks its own dashboard for the job's
status every ``POLL_S``; once it ended (succeeded, failed, stopped) or Ray no longer knows
it, the head deletes the cluster as autostop does (``teardown.py``), its history's run
ending with the job's outcome.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable

from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.dashboard import Dashboard
from ray_cml_provider.node.teardown import delete_the_cluster

POLL_S = 3.0
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
GONE = "GONE"  # Ray does not know the job (its head's Ray started again without it)


class DownAfterJob:
    def __init__(
        self,
        ctx: NodeContext,
        dashboard_url: str,
        before_stop: Callable[[str], None] = lambda why: None,
        delete: Callable[..., None] = delete_the_cluster,
    ):
        self.ctx = ctx
        self.dashboard = Dashboard(dashboard_url, ctx.token_path)
        self.before_stop = before_stop  # the history's last snapshot
        self.delete = delete
        self.watched: set[str] = set()
        self.lock = threading.Lock()

    def watch(self, job_id: str) -> str:
        """Start watching ``job_id`` (once); the line the submitter prints."""
        with self.lock:
            if job_id not in self.watched:
                self.watched.add(job_id)
                threading.Thread(
                    target=self.wait_then_delete, args=(job_id,), name="down-after-job", daemon=True
                ).start()
        log(f"the cluster is deleted once Ray job {job_id} ends (job submit --down)")
        return f"the head deletes the cluster once job {job_id} ends"

    def wait_then_delete(self, job_id: str) -> None:
        while True:
            status = self.status(job_id)
            if status in ENDED or status == GONE:
                why = f"job {job_id} {status.lower()} (job submit --down)"
                self.delete(self.ctx, why, self.before_stop)
                return
            time.sleep(POLL_S)

    def status(self, job_id: str) -> str | None:
        """The job's status; ``GONE`` when Ray does not know it; None when the dashboard
        does not answer (asked again later)."""
        try:
            info = self.dashboard.get(f"/api/jobs/{urllib.parse.quote(job_id)}")
            return str(info.get("status", "")) or None
        except urllib.error.HTTPError as exc:
            return GONE if exc.code == 404 else None
        except (OSError, ValueError, AttributeError):
            return None
