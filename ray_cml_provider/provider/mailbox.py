"""A node's mailbox, from outside the node: post a ``Request``, wait for its ``Result``.

CML engines have no SSH, but every engine of a project mounts the same filesystem, which the
API can write and read from anywhere. So a request is a JSON file posted to the node's
``inbox/``; the node's launcher (``node/mailbox.py``) runs it and publishes its result in
``outbox/<name>.result``, which this side polls for. ``ray up``'s command runner and
``ray-cml status`` both talk to nodes this way (``contract`` says what the files are).

CML's API takes 100 to 300 ms a request, and a ``ray up`` asks a dozen things in turn, so a
question costs as few round trips as it can: one upload, then the polls, each a download of
the result that is not found until the node publishes it. The node clears its mailbox itself
(``node/mailbox.py``).
"""

from __future__ import annotations

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
# The longest wait between two polls, by how long the command has run: `ray up`'s commands
# take seconds, and each poll's wait is time it waits on the answer after it came; a long
# command costs a poll every 2 s (at CML's 100-300 ms a poll).
POLL_CAPS = ((10.0, 0.5), (60.0, 1.0))
LONG_POLL_S = 2.0
MAX_FIRST_POLL_WAIT_S = 2.0


def poll_cap(running_s: float) -> float:
    return next((cap for until, cap in POLL_CAPS if running_s < until), LONG_POLL_S)


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
        # By request: when its answer can first be there (its upload's end plus one more
        # upload's time: the node's answer is an upload too).
        self._answer_not_before: dict[str, float] = {}

    def ask(self, request: Request, timeout_s: float = MAX_COMMAND_WAIT_S) -> Result:
        """Post ``request`` and wait for its result. Raises ``NodeGone`` or
        ``CommandTimedOut``."""
        return self.wait_for_result(self.post(request), timeout_s)

    def post(self, request: Request) -> str:
        """Post ``request`` without waiting (the node runs each request in its own thread);
        its name, for ``wait_for_result``."""
        name = f"{time.time_ns()}-{secrets.token_hex(3)}"
        sent = time.monotonic()
        self.client.upload_file(self.folder.request(name), request.to_json())
        done = time.monotonic()
        self._answer_not_before[name] = done + min(done - sent, MAX_FIRST_POLL_WAIT_S)
        return name

    def wait_for_result(self, name: str, timeout_s: float = MAX_COMMAND_WAIT_S) -> Result:
        """Poll for the result (one download per poll, backing off to ``poll_cap``, start to
        start)."""
        delay, started = 0.2, time.monotonic()
        next_liveness_check = started + LIVENESS_CHECK_S
        next_note = started + NOTE_EVERY_S
        target = self.folder.result(name)
        # The node answers with an upload of its own: no answer is there sooner than one
        # more round trip after the request's, and a poll sent before is one wasted.
        time.sleep(max(0.0, self._answer_not_before.pop(name, 0.0) - time.monotonic()))
        while time.monotonic() - started < timeout_s:
            polled = time.monotonic()
            try:
                result = Result.from_bytes(self.client.download_file(target))
                if result is not None:  # else: still being written
                    return result
            except CMLNotFoundError:
                pass  # not published yet
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
            # Polls `delay` apart, start to start: at CML's 300 ms a poll, a pause after each
            # answer would see the result up to that much later (a poll slower than `delay`,
            # retried say, is followed at once: at most one request in flight all the same).
            time.sleep(max(0.0, polled + delay - time.monotonic()))
            delay = min(delay * 1.5, poll_cap(now - started))
        raise CommandTimedOut(f"no answer from node {self.folder.node_id} in {timeout_s:.0f} s")

    def node_info(self) -> NodeInfo:
        """What the node's launcher published (``CMLError`` while there is none)."""
        try:
            return NodeInfo.from_json(self.client.download_file(self.folder.info))
        except ValueError as exc:
            message = f"not a node record: {exc}"
            raise CMLNotFoundError("GET", self.folder.info, 404, message) from None

    def wait_for_launcher(self, timeout_s: float, poll_s: float = 1.0) -> NodeInfo:
        """Until the node's launcher has published itself (like waiting for SSH); what it
        published. Raises the last ``CMLError`` past ``timeout_s``."""
        started = time.monotonic()
        next_note = started + 5
        while True:
            try:
                return self.node_info()
            except CMLError:
                if time.monotonic() - started > timeout_s:
                    raise
            if time.monotonic() > next_note:
                next_note = time.monotonic() + NOTE_EVERY_S
                self.progress(
                    f"waiting for the node launcher of {self.folder.node_id} to start "
                    f"({time.monotonic() - started:.0f} s)"
                )
            time.sleep(poll_s)
