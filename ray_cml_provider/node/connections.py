"""Who holds a connection to the head's gateway, and what each may cost: the door's own
bookkeeping under aiohttp's HTTP server.

Any engine of the workspace can open the head's application port directly and send any bytes
at any rate, with no credential. aiohttp's server parses and frames every request; what it
does not bound is what many such callers cost together. This module does, per connection:

- **Heads.** The bytes of a request head that has not ended yet are counted as they arrive:
  past ``max_head_bytes`` on one connection, or past ``head_budget_bytes`` for all of them
  together (each connection's first ``free_head_bytes`` left out, so an ordinary caller is
  never the one refused), the connection is closed. aiohttp's own caps (line, field and
  header count) allow ~1.6 MB per head, ~3 MB in memory: 8,192 of those would be 24 GB.
- **The cap.** Past ``max_connections`` a new connection does not lock everyone out: the
  connection that has waited longest for a request head without ever sending a credential is
  closed to make room, then the longest-idle one that did; only when every connection is busy
  with a request is the newcomer closed.
- **Idle.** A connection waiting for a head is closed after ``idle_s``; while the door is
  more than a quarter full, one that has never sent a complete head gets only
  ``crowded_idle_s`` (silent connections are the cheapest way to fill it).
- **The log.** One line per kind of event, at most ``per_minute`` a minute, never a
  traceback: aiohttp's log and the event loop's unhandled errors both go through
  ``OneLineLog``.

The gateway (``gateway.py``) tells the book when a request starts and ends and whether it
carried a credential; the rest is seen here, in aiohttp's protocol callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web, web_protocol

HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    idle_s: float
    crowded_idle_s: float = 5.0
    max_head_bytes: int = 64 * 1024
    free_head_bytes: int = 8 * 1024
    head_budget_bytes: int = 64 * 1024 * 1024


class Caller:
    """One connection, as the book sees it."""

    __slots__ = ("handler", "waiting_since", "head_bytes", "heads", "credentialed", "tail")

    def __init__(self, handler: GuardedHandler, now: float) -> None:
        self.handler = handler
        self.waiting_since: float | None = now  # for a request head; None while one is served
        self.head_bytes = 0  # of the head now arriving
        self.heads = 0  # complete heads seen on this connection
        self.credentialed = False  # a request on it carried a key or token the door took
        self.tail = b""  # the last bytes of the previous read: a head's end may straddle two


class ConnectionBook:
    """Every open connection of the gateway, its state, and the rules above."""

    def __init__(self, limits: ConnectionLimits, log: Callable[[str], None]) -> None:
        self.limits = limits
        self.log = log
        self.callers: dict[GuardedHandler, Caller] = {}
        # Connections waiting for a request head, oldest wait first: those that never sent a
        # credential, and those that did (kept alive between requests).
        self.anonymous: OrderedDict[GuardedHandler, Caller] = OrderedDict()
        self.known: OrderedDict[GuardedHandler, Caller] = OrderedDict()
        self.head_bytes_held = 0  # past each connection's free allowance, all together
        self.counts = {"evicted": 0, "refused_full": 0, "head_too_big": 0, "idle": 0}

    # ------------------------------------------------------------ aiohttp's side

    def opened(self, handler: GuardedHandler) -> None:
        caller = Caller(handler, time.monotonic())
        self.callers[handler] = caller
        self.anonymous[handler] = caller
        if len(self.callers) > self.limits.max_connections:
            self.make_room(handler)

    def closed(self, handler: GuardedHandler) -> None:
        caller = self.callers.pop(handler, None)
        if caller is not None:
            self._stop_waiting(caller)

    def received(self, handler: GuardedHandler, data: bytes) -> bool:
        """Count a read while a head is arriving; False when the connection must close."""
        caller = self.callers.get(handler)
        if caller is None or caller.waiting_since is None or not data:
            return True
        seen = caller.tail + data
        end = seen.find(HEAD_END)
        if end >= 0:  # the head is whole: aiohttp hands it to the gateway next
            self._stop_waiting(caller)
            caller.heads += 1
            return True
        before = self._held(caller)
        caller.head_bytes += len(data)
        caller.tail = seen[-(len(HEAD_END) - 1) :]
        self.head_bytes_held += self._held(caller) - before
        limits = self.limits
        if caller.head_bytes > limits.max_head_bytes:
            self._count("head_too_big", "a request head over the size limit")
            return False
        if self.head_bytes_held > limits.head_budget_bytes and self._held(caller):
            self._count("head_too_big", "request heads over the memory budget")
            return False
        return True

    # ------------------------------------------------------------ the gateway's side

    def serving(self, handler: object) -> None:
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None:
            self._stop_waiting(caller)

    def served(self, handler: object, credentialed: bool) -> None:
        """A request ended: the connection waits for the next head (if it stays open)."""
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is None:
            return
        caller.credentialed = caller.credentialed or credentialed
        self._stop_waiting(caller)
        caller.waiting_since = time.monotonic()
        (self.known if caller.credentialed else self.anonymous)[handler] = caller  # type: ignore[index]

    # ------------------------------------------------------------ the rules

    def make_room(self, newcomer: GuardedHandler) -> None:
        for waiting in (self.anonymous, self.known):
            for handler in waiting:
                if handler is not newcomer:
                    self._count("evicted", "connection(s) closed to make room: over the cap")
                    handler.drop()
                    return
        self._count("refused_full", "connection(s) refused: over the cap, every one busy")
        newcomer.drop()

    def sweep(self, now: float | None = None) -> None:
        """Close the connections that waited too long for a head (run every second)."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        crowded = len(self.callers) > limits.max_connections / 4
        shortest = limits.crowded_idle_s if crowded else limits.idle_s
        for waiting in (self.anonymous, self.known):
            for caller in list(waiting.values()):  # oldest wait first
                waited = now - (caller.waiting_since or now)
                if waited < shortest:
                    break  # the rest waited less still
                never_sent_a_head = caller.heads == 0
                if waited >= limits.idle_s or (crowded and never_sent_a_head):
                    self._count("idle", "idle connection(s) closed")
                    caller.handler.drop()

    def _stop_waiting(self, caller: Caller) -> None:
        self.head_bytes_held -= self._held(caller)
        caller.head_bytes, caller.tail, caller.waiting_since = 0, b"", None
        self.anonymous.pop(caller.handler, None)
        self.known.pop(caller.handler, None)

    def _held(self, caller: Caller) -> int:
        return max(0, caller.head_bytes - self.limits.free_head_bytes)

    def _count(self, what: str, line: str) -> None:
        self.counts[what] += 1
        count = self.counts[what]
        if count in (1, 10, 100) or count % 1000 == 0:
            self.log(f"gateway: {count} {line}")


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol, telling the book what it sees."""

    book: ConnectionBook  # set by GuardedServer
    # aiohttp lets go of the transport when it closes a connection, even while the transport
    # still holds an answer the caller does not read: kept here, so ``drop`` can end it.
    own_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.own_transport = transport
        self.book.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.book.closed(self)
        self.own_transport = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.book.received(self, data):
            self.drop()
            return
        super().data_received(data)

    async def start(self) -> None:
        # A connection closed as it opened (the cap) is gone before this task first runs on
        # Python < 3.12; aiohttp would assert, and the loop would log a traceback.
        if self.transport is None:
            return
        await super().start()

    def drop(self) -> None:
        """Close now, without an answer: nothing it sent is waited for. The book forgets it
        at once (its transport says goodbye a loop turn later)."""
        self.book.closed(self)
        if self.own_transport is not None:
            self.own_transport.abort()
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, its connections kept in a ``ConnectionBook``."""

    def __init__(self, *args, book: ConnectionBook, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.book = book

    def __call__(self) -> GuardedHandler:
        handler = GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.book = self.book
        return handler


class OneLineLog(logging.Handler):
    """aiohttp's server log as one printable line per event, without tracebacks, and at most
    ``per_minute`` lines a minute: what callers send must not write raw bytes or stacks into
    the head's log, nor fill it."""

    def __init__(self, log: Callable[[str], None], per_minute: int = 30) -> None:
        super().__init__(logging.INFO)
        self.write = log
        self.per_minute = per_minute
        self.window_start = 0.0
        self.in_window = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        reason = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f": {type(reason).__name__}: {reason}" if reason else "")
        self.line(text, record.created)

    def line(self, text: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        if when - self.window_start >= 60:
            if self.dropped:
                self.write(f"gateway: {self.dropped} more line(s) of the last minute left out")
            self.window_start, self.in_window, self.dropped = when, 0, 0
        self.in_window += 1
        if self.in_window > self.per_minute:
            self.dropped += 1
            return
        self.write(f"gateway: {printable(text, 300)}")

    def loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's handler for errors nobody caught (a task's, a callback's):
        the same one line, never the stack the default handler prints."""
        reason = context.get("exception")
        text = str(context.get("message") or "unhandled error in the gateway's loop")
        self.line(text + (f": {type(reason).__name__}: {reason}" if reason else ""))


def printable(text: object, most: int = 200) -> str:
    """``text`` safe for a log line: control characters escaped, cut to ``most``."""
    value = str(text)[:most]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
