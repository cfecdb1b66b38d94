"""The node's side of the mailbox: CML has no SSH, so the project's files are the channel.

The laptop's ``ray up``/``exec``/``submit``/``down`` post a ``Request`` into the node's
``inbox/``; the node runs each once, in a thread of its own (a ``ray submit`` waiting for a
GPU must not hold up a ``ray exec 'ray status'``), and publishes its result (exit status
and output, one file: ``contract.Result``) in ``outbox/``. The inbox is read on the mount
every round and, since NFS may show a new request late, through the API now and then: every
half second while commands come, more slowly when idle.

The node, not the caller, clears the mailbox: a request once answered, a result once it is
``RESULT_KEPT_S`` old. The caller waits on every request it makes; the node's own thread
does not keep anybody waiting.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ray_cml_provider.contract import NodeFolder, Request, Result
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.project_api import ProjectAPIError

API_POLL_BUSY_S = 0.5
API_POLL_IDLE_S = {"head": 5.0, "worker": 15.0}
BUSY_FOR_S = 60.0


class Mailbox:
    def __init__(
        self,
        ctx: NodeContext,
        answer: Callable[[Request, Path], int],
        answered: Callable[[Request, Result, float], None] = lambda request, result, at: None,
    ):
        self.ctx = ctx
        self.answer = answer  # the request's exit status; its output written to the path
        # Told of each request once it ran, with its result and start time (the head's
        # recovery and history).
        self.answered = answered
        self.inbox = ctx.mount(ctx.folder.inbox)
        self.running = Path(ctx.tmp_dir) / "commands"  # output while a request runs
        self.done: set[str] = set()  # requests already run (each runs once)
        self._next_api_poll = 0.0
        self._busy_until = time.monotonic() + BUSY_FOR_S  # `ray up` talks to a new node now

    def serve_once(self) -> None:
        """Start each new request in its own thread: what the mount shows at once, then what
        the API lists (a round trip, 100-300 ms on CML: the mount's requests do not wait)."""
        self._start(self.names_on_mount())
        now = time.monotonic()
        if self.ctx.api.available and now >= self._next_api_poll:
            idle_s = API_POLL_IDLE_S.get(self.ctx.spec.kind, 15.0)
            self._next_api_poll = now + (API_POLL_BUSY_S if now < self._busy_until else idle_s)
            try:
                self._start(self.names_through_api())
            except ProjectAPIError as exc:
                log(f"could not list the inbox through the API: {exc}")

    def _start(self, names: set[str]) -> None:
        for name in sorted(names - self.done):
            request = self.read(name)
            if request is None:
                continue  # still being written
            self.done.add(name)
            self._busy_until = time.monotonic() + BUSY_FOR_S
            threading.Thread(target=self.run, args=(name, request), daemon=True).start()

    def names_on_mount(self) -> set[str]:
        return NodeFolder.request_names(p.name for p in self.inbox.glob("*"))

    def names_through_api(self) -> set[str]:
        return NodeFolder.request_names(self.ctx.api.list_names(self.ctx.folder.inbox))

    def read(self, name: str) -> Request | None:
        """The request, from the mount or the API; None while it is not whole."""
        relative = self.ctx.folder.request(name)
        for read in (self.ctx.mount(relative).read_bytes, lambda: self.ctx.api.download(relative)):
            try:
                return Request.from_json(read())
            except (OSError, ValueError):
                continue
        return None

    def run(self, name: str, request: Request) -> None:
        """Run one request, publish its result, then clear the request and old results."""
        log(f"running command {name}")
        self.running.mkdir(parents=True, exist_ok=True)
        output = self.running / f"{name}.out"
        output.write_bytes(b"")
        code, started_at = 1, time.time()
        try:
            code = self.answer(request, output)
        except Exception as exc:  # the runner waits for an exit status: it must always get one
            with open(output, "a") as out:
                out.write(f"ray-cml launcher: the request failed: {exc!r}\n")
        finally:
            result = Result(code, output.read_bytes())
            try:
                self.answered(request, result, started_at)
            except Exception as exc:  # the caller still gets its answer
                log(f"after command {name}: {exc!r}")
            self.publish(name, result)
            output.unlink(missing_ok=True)
            log(f"command {name} exited with {code}")
            self.clear(name)

    def publish(self, name: str, result: Result) -> None:
        self.ctx.publish(self.ctx.folder.result(name), result.to_bytes())

    def clear(self, name: str) -> None:
        """Remove the answered request, and the results nobody fetched in
        ``RESULT_KEPT_S`` (their caller gave up or is gone): the mailbox stays small."""
        self.ctx.remove(self.ctx.folder.request(name))
        oldest, suffix = time.time() - NodeFolder.RESULT_KEPT_S, NodeFolder.RESULT_SUFFIX
        for path in self.ctx.mount(self.ctx.folder.outbox).glob(f"*{suffix}"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < oldest:
                    self.ctx.remove(self.ctx.folder.result(path.name[: -len(suffix)]))

    def answer_unanswered(self, message: str) -> None:
        """A restarted head: answer what the old life was running when it died (its caller
        waits for an answer; running it again could repeat a job), and never run it."""
        pending = self.names_on_mount()
        with contextlib.suppress(ProjectAPIError):
            pending |= self.names_through_api()
        outbox = self.ctx.mount(self.ctx.folder.outbox)
        answered = {p.stem for p in outbox.glob(f"*{NodeFolder.RESULT_SUFFIX}")}
        for name in sorted(pending - answered):
            self.publish(name, Result(1, f"ray-cml: {message}\n".encode()))
        self.done |= pending
