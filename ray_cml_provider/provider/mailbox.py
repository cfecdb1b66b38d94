"""A node's mailbox, from outside the node: post a ``Request``, wait for its ``Result``.

CML engines have no SSH, but every engine of a project mounts the same filesystem, which the
API can write and read from anywhere. So a request is a JSON file posted to the node's
``inbox/``; the node's launcher (``node/mailbox.py``) runs it and publishes ``outbox/<name>
.out`` then ``.rc``, which this side polls for. ``ray up``'s command runner and ``ray-cml
status`` both talk to nodes this way (``contract`` says what the files are).
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Callable

from ray_cml_provider.cml import TRANSIENT_ERRORS, CMLClient, CMLError, CMLNotFoundError
from ray_cml_provider.contract import NodeFolder, NodeInfo, Request, Result
from ray_cml_provider.errors import CommandTimedOut, NodeGone

MAX_COMMAND_WAIT_S = 3600.0
LIVENESS_CHECK_S = 10.0
NOTE_EVERY_S = 15.0


def note(message: str) -> None:
    """Progress for a person waiting: on stderr, never mixed into a command's output."""
    print(f"ray-cml: {message}", file=sys.stderr, flush=True)


class NodeMailbox:
    def __init__(
        self,
        client: CMLClient,
        folder: NodeFolder,
        still_there: Callable[[], bool] = lambda: True,
        progress: Callable[[str], None] = note,
    ):
        self.client = client
        self.folder = folder
        self.still_there = still_there  # False once the node's application is gone
        self.progress = progress

    def ask(self, request: Request, timeout_s: float = MAX_COMMAND_WAIT_S) -> Result:
        """Post ``request`` and wait for its result; the files are removed after. Raises
        ``NodeGone`` or ``CommandTimedOut``."""
        name = f"{time.time_ns()}-{secrets.token_hex(3)}"
        self.client.upload_file(self.folder.request(name), request.to_json())
        try:
            code = self._wait_for_exit_status(name, timeout_s)
            try:
                output = self.client.download_file(self.folder.output(name))
            except CMLNotFoundError:
                output = b""  # the command printed nothing
            return Result(code, output)
        finally:
            for path in (
                self.folder.request(name),
                self.folder.output(name),
                self.folder.exit_status(name),
            ):
                self._remove(path)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(CMLError):  # the cluster's folder goes with `ray down`
            self.client.delete_file(path, missing_ok=True)

    def _wait_for_exit_status(self, name: str, timeout_s: float) -> int:
        """Poll the outbox (one list call per poll, backing off to 2 s) for the status."""
        delay, started = 0.2, time.monotonic()
        next_liveness_check = started + LIVENESS_CHECK_S
        next_note = started + NOTE_EVERY_S
        target = self.folder.exit_status(name)
        file_name = "/" + target.rsplit("/", 1)[-1]
        while time.monotonic() - started < timeout_s:
            try:
                listed = self.client.list_files(self.folder.outbox)
                if any(f.path.endswith(file_name) for f in listed):
                    return Result.parse_exit_status(self.client.download_file(target))
            except TRANSIENT_ERRORS:
                pass  # CML kept failing past the client's retries: this is a poll, poll again
            now = time.monotonic()
            if now > next_note:
                next_note = now + NOTE_EVERY_S
                self.progress(f"still running on {self.folder.node_id} ({now - started:.0f} s)")
            if now > next_liveness_check:
                next_liveness_check = now + LIVENESS_CHECK_S
                if not self.still_there():
                    raise NodeGone(f"node {self.folder.node_id} went away")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        raise CommandTimedOut(f"no answer from node {self.folder.node_id} in {timeout_s:.0f} s")

    def node_info(self) -> NodeInfo:
        """What the node's launcher published (``CMLError`` while there is none)."""
        try:
            return NodeInfo.from_json(self.client.download_file(self.folder.info))
        except ValueError as exc:
            message = f"not a node record: {exc}"
            raise CMLNotFoundError("GET", self.folder.info, 404, message) from None

    def wait_for_launcher(self, timeout_s: float) -> None:
        """Until the node's launcher has published itself (like waiting for SSH)."""
        started = time.monotonic()
        next_note = started + 5
        while True:
            try:
                self.client.list_files(self.folder.info)
                return
            except CMLError:
                if time.monotonic() - started > timeout_s:
                    raise
            if time.monotonic() > next_note:
                next_note = time.monotonic() + NOTE_EVERY_S
                self.progress(
                    f"waiting for the node launcher of {self.folder.node_id} to start "
                    f"({time.monotonic() - started:.0f} s)"
                )
            time.sleep(1.0)
