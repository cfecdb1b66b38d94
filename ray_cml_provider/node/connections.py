"""Who holds a connection to the head's gateway, and what each may cost: the door's own
bookkeeping under aiohttp's HTTP server.

Any engine of the workspace can open the head's application port directly and send any bytes
at any rate, with no credential. aiohttp's server parses and frames every request; what it
does not bound is what many such callers cost together. This module does, per connection:

- **Heads.** The bytes of a request head are counted as they arrive, until aiohttp's parser
  has the head (blank lines before a request line are skipped by the parser, not a head's
  end), and so are the bytes of a pipelined head sent behind a request whose body was read
  (aiohttp queues one such request at most, then stops reading): past ``max_head_bytes`` on
  one connection, or past ``head_budget_bytes`` for all of them together (each connection's
  first ``free_head_bytes`` left out, so an ordinary caller is never the one refused), the
  connection is closed. aiohttp's own caps (line, field and header count) allow ~1.6 MB per
  head, ~3 MB in memory: 8,192 of those would be 24 GB.
- **The cap.** Past ``max_connections`` a new connection does not lock everyone out: a
  connection makes room for it, the least trusted first (``EVICTION_ORDER``): one waiting for
  a head that never sent a credential, then one kept alive by a model caller, then a busy one
  without a credential (a body that never comes keeps a connection busy), a busy model
  caller's, and last an owner's idle one. A busy owner's connection never makes room: when
  every connection is one, the newcomer is closed.
- **Idle.** A connection waiting for a head is closed after ``idle_s``; while the door is
  more than a quarter full, one that has never sent a complete head gets only
  ``crowded_idle_s`` (silent connections are the cheapest way to fill it).
- **The log.** One line per kind of event, at most ``per_minute`` a minute, never a
  traceback nor a caller's bytes: aiohttp's log, the event loop's unhandled errors and the
  gateway's own lines all go through ``OneLineLog``.

The gateway (``gateway.py``) tells the book when a request starts and ends, which credential
it carried, and when its body was read; the rest is seen here, in aiohttp's protocol
callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web, web_protocol

# How far each kind of caller is trusted: the cap evicts the least trusted first, and never
# a busy owner (Ray's token).
RANK = {None: 0, "public": 0, "api": 1, "scraper": 1, "owner": 2}
WAITING, BODY, ANSWERING, UPGRADED = "waiting", "body", "answering", "upgraded"
# Who makes room past the cap, in turn: (state is waiting?, rank). A busy owner never does.
EVICTION_ORDER = ((True, 0), (True, 1), (False, 0), (False, 1), (True, 2))


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    idle_s: float
    crowded_idle_s: float = 5.0
    max_head_bytes: int = 64 * 1024
    free_head_bytes: int = 8 * 1024
    head_budget_bytes: int = 64 * 1024 * 1024


class Caller:
    """One connection, as the book sees it.

    ``state``: ``waiting`` for a request head; ``body``: a request in flight whose body may
    still be arriving (aiohttp's payload reader bounds what it buffers); ``answering``: the
    body is read, so what arrives now is a next (pipelined) head, counted like any other;
    ``upgraded``: a websocket, framed by aiohttp's websocket reader."""

    __slots__ = ("handler", "state", "since", "head_bytes", "heads", "kind")

    def __init__(self, handler: GuardedHandler, now: float) -> None:
        self.handler = handler
        self.state = WAITING
        self.since = now  # when the state began
        self.head_bytes = 0  # of a head not yet parsed (or queued behind the request)
        self.heads = 0  # requests aiohttp parsed on this connection
        self.kind: str | None = None  # the most trusted credential it sent

    @property
    def tier(self) -> tuple[bool, int]:
        return self.state == WAITING, RANK[self.kind]


class ConnectionBook:
    """Every open connection of the gateway, its state, and the rules above."""

    def __init__(self, limits: ConnectionLimits, log: Callable[[str], None]) -> None:
        self.limits = limits
        self.log = log
        self.callers: dict[GuardedHandler, Caller] = {}
        # The connections by tier (``Caller.tier``), each oldest state first: who makes
        # room past the cap, and whose wait for a head the sweep looks at.
        self.tiers: dict[tuple[bool, int], OrderedDict[GuardedHandler, Caller]] = {
            (waiting, rank): OrderedDict() for waiting in (True, False) for rank in (0, 1, 2)
        }
        self.head_bytes_held = 0  # past each connection's free allowance, all together
        self.counts = {"evicted": 0, "refused_full": 0, "head_too_big": 0, "idle": 0}

    # ------------------------------------------------------------ aiohttp's side

    def opened(self, handler: GuardedHandler) -> None:
        caller = Caller(handler, time.monotonic())
        self.callers[handler] = caller
        self.tiers[caller.tier][handler] = caller
        if len(self.callers) > self.limits.max_connections:
            self.make_room(handler)

    def closed(self, handler: GuardedHandler) -> None:
        caller = self.callers.pop(handler, None)
        if caller is not None:
            self._set_head_bytes(caller, 0)
            self.tiers[caller.tier].pop(handler, None)

    def received(self, handler: GuardedHandler, size: int, parsed: bool) -> bool:
        """A read, after aiohttp's parser took it (``parsed``: it completed a request). The
        head's bytes are counted until aiohttp parses it, whatever they are (blank lines
        before a request line are not a head's end), and so are a pipelined head's behind a
        request whose body was read. False when the connection must close."""
        caller = self.callers.get(handler)
        if caller is None:
            return True
        if caller.state == WAITING and parsed:
            caller.heads += 1
            self._move(caller, BODY)  # the gateway takes it next (``serving``)
            self._set_head_bytes(caller, 0)
            return True
        if caller.state == BODY and parsed:
            caller.heads += 1
            self._move(caller, ANSWERING)  # the body ended and a next head came
        if caller.state in (BODY, UPGRADED):
            return True
        self._set_head_bytes(caller, caller.head_bytes + size)
        limits = self.limits
        if caller.head_bytes > limits.max_head_bytes:
            self._count("head_too_big", "request head(s) over the size limit")
            return False
        if self.head_bytes_held > limits.head_budget_bytes and self._held(caller):
            self._count("head_too_big", "request heads over the memory budget")
            return False
        return True

    # ------------------------------------------------------------ the gateway's side

    def serving(self, handler: object) -> None:
        """A request's head reached the gateway: what was queued is in flight now."""
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None:
            self._move(caller, BODY)
            self._set_head_bytes(caller, 0)

    def identified(self, handler: object, kind: str) -> None:
        """The gateway took a credential (or none) on this connection."""
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None and RANK[kind] > RANK[caller.kind]:
            self.tiers[caller.tier].pop(caller.handler, None)
            caller.kind = kind
            self.tiers[caller.tier][caller.handler] = caller

    def body_read(self, handler: object) -> None:
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None and caller.state == BODY:
            self._move(caller, ANSWERING)

    def upgraded(self, handler: object) -> None:
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None:
            self._move(caller, UPGRADED)

    def served(self, handler: object) -> None:
        """A request ended: the connection waits for the next head (if it stays open); bytes
        of that head already counted stay counted."""
        caller = self.callers.get(handler)  # type: ignore[arg-type]
        if caller is not None:
            self._move(caller, WAITING)

    # ------------------------------------------------------------ the rules

    def make_room(self, newcomer: GuardedHandler) -> None:
        for tier in EVICTION_ORDER:
            for handler in self.tiers[tier]:
                if handler is not newcomer:
                    self._count("evicted", "connection(s) closed to make room: over the cap")
                    handler.drop()
                    return
        self._count("refused_full", "connection(s) refused: over the cap, every one an owner's")
        newcomer.drop()

    def sweep(self, now: float | None = None) -> None:
        """Close the connections that waited too long for a head (run every second)."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        crowded = len(self.callers) > limits.max_connections / 4
        shortest = limits.crowded_idle_s if crowded else limits.idle_s
        for rank in (0, 1, 2):
            for caller in list(self.tiers[(True, rank)].values()):  # oldest wait first
                waited = now - caller.since
                if waited < shortest:
                    break  # the rest waited less still
                if waited >= limits.idle_s or (crowded and caller.heads == 0):
                    self._count("idle", "idle connection(s) closed")
                    caller.handler.drop()

    def _move(self, caller: Caller, state: str) -> None:
        self.tiers[caller.tier].pop(caller.handler, None)
        caller.state, caller.since = state, time.monotonic()
        self.tiers[caller.tier][caller.handler] = caller

    def _set_head_bytes(self, caller: Caller, size: int) -> None:
        before = self._held(caller)
        caller.head_bytes = size
        self.head_bytes_held += self._held(caller) - before

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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # aiohttp queues up to 32 pipelined requests; one is enough, and bounds what a
        # connection holds while a request is in flight (reading pauses until it is taken).
        if hasattr(self, "_max_msg_queue_size"):
            self._max_msg_queue_size, self._msg_queue_resume_size = 1, 0

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
        parsed_before = getattr(self, "_request_count", 0)
        super().data_received(data)
        parsed = getattr(self, "_request_count", 0) != parsed_before
        if not self.book.received(self, len(data), parsed):
            self.drop()

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
        # The exception's class only: aiohttp's parser errors quote the caller's bytes, and
        # those may be anything, a key included.
        reason = record.exc_info[1] if record.exc_info else None
        self.line(record.getMessage() + (f": {type(reason).__name__}" if reason else ""))

    def line(self, text: str, when: float | None = None) -> None:
        """Write ``text`` as one printable line, unless this minute had its lines."""
        when = time.time() if when is None else when
        if when - self.window_start >= 60:
            if self.dropped:
                self.write(f"gateway: {self.dropped} more line(s) of the last minute left out")
            self.window_start, self.in_window, self.dropped = when, 0, 0
        self.in_window += 1
        if self.in_window > self.per_minute:
            self.dropped += 1
            return
        self.write(f"gateway: {printable(text.removeprefix('gateway: '), 300)}")

    def loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's handler for errors nobody caught (a task's, a callback's):
        the same one line, never the stack the default handler prints."""
        reason = context.get("exception")
        text = str(context.get("message") or "unhandled error in the gateway's loop")
        self.line(text + (f": {type(reason).__name__}" if reason else ""))


def printable(text: object, most: int = 200) -> str:
    """``text`` safe for a log line: control characters escaped, cut to ``most``."""
    value = str(text)[:most]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
