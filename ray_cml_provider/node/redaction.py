r"""Secrets kept out of text that others will read (the head's history), in every form a log
gives them, not only as themselves.

A log seldom prints a secret as it is: ``curl -v -u "$CDSW_APIV2_KEY:"`` prints
``Authorization: Basic <base64 of "KEY:">``, a dump prints its bytes in hex, a URL
percent-encodes it, a terminal's colours or a wrapped line split it, JSON escapes it, and a
cut (a log's tail, a message kept to 300 characters) leaves most of it. A literal match
misses all of these. So a ``Redactor`` looks for each secret's *needles*:

- the secret itself, in any letter case;
- the hex of its bytes, in any letter case;
- its base64, standard or URL-safe, at each of the three alignments a secret takes inside a
  longer encoded string (``user:KEY``, ``KEY:``): the characters that depend only on the
  secret's bytes (the ones at its edges mix in its neighbours' bits);

and redacts any run of a needle that stands for at least ``MIN_RUN`` (16) consecutive
characters of the secret (the whole secret when it is shorter): a secret cut by someone else
still gives most of itself away. It looks in the text as it reads once whitespace (a wrapped
line, base64's 76-character lines), terminal escape sequences and JSON's escaped line breaks
are dropped, and percent (``%41``) and ``\u0041`` escapes (also as JSON writes them,
``\\u0041``) decoded; what matched is replaced in the original text, with the noise and
escapes inside it, by ``[redacted]``.

How, and why it is fast: each needle is cut in aligned blocks of half its shortest run, so
that any run long enough holds a whole block; ``str.find`` looks for the blocks (C speed, and
no regular expression over the text for each secret) and each hit is extended both ways
along the needle, never further than the needle's length. The text's transformations are
``re.sub`` and ``str.translate``, a stage skipped when the text lacks the characters it
needs (``\x1b``, ``\\``, ``%``); their patterns backtrack at most over one token (the
lookbehinds keep a run of backslashes from being tried again at each of its characters).
Positions are worked back to the original text only when something matched, with
``re.split`` and sums rather than a loop over every match. A megabyte of ordinary text with
four 64-character secrets takes about 0.1 s; one that hides thousands of encoded secrets,
about 0.3 s.

Standard library only: the head's launcher imports it.
"""

from __future__ import annotations

import base64
import bisect
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

REDACTED = "[redacted]"
MIN_RUN = 16  # consecutive characters of a secret that give it away
MIN_SECRET = 8  # shorter values are not secrets the head holds: looked for, they'd hit words

# An ESC, or ESC as JSON writes it (\u001b). A run of backslashes matches only from its first
# one (the lookbehinds): otherwise each backslash of a long run would start a match that
# backtracks over the rest of the run, quadratic in its length.
_ESC = r"(?:\x1b|(?<!\\)\\+u001[bB])"
# What the text goes through before it is looked at, in turn: each pattern has one group (what
# ``split`` keeps), each match becomes ``width`` characters (none: dropped; one: decoded), and
# a text without any of ``marks`` has no match (the stage is skipped: most text has none).
WHITESPACE = re.compile(r"([\s\u200b-\u200d\u2060\ufeff]+)")  # wrapped lines, zero-width
# Terminal escape sequences (CSI such as ESC[31m; ESC and one more character), and line
# breaks and tabs as JSON writes them.
MARKS = re.compile(rf"((?:{_ESC}\[[0-?]*[ -/]*[@-~]|{_ESC}[@-Z\\-_]|(?<!\\)\\+[nrt])+)")
# %41 (ASCII only) and \u0041 (\\u0041 as JSON writes it), each decoded into its character.
ESCAPES = re.compile(r"(%[0-7][0-9A-Fa-f]|(?<!\\)\\+u[0-9A-Fa-f]{4})")
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # keeps the length
_URLSAFE = str.maketrans("-_", "+/")  # URL-safe base64 looked for as standard base64


def _decoded(match: re.Match) -> str:
    escape = match[0]
    return chr(int(escape[1:] if escape[0] == "%" else escape[-4:], 16))


STAGES: tuple[tuple[re.Pattern, Callable[[re.Match], str] | str, int, str], ...] = (
    (WHITESPACE, "", 0, ""),
    (MARKS, "", 0, "\x1b\\"),
    (ESCAPES, _decoded, 1, "%\\"),
)


def _normal(text: str) -> tuple[str, list[tuple[re.Pattern, int, str]]]:
    """The text as it is looked at, and each stage it went through with what it was before
    it (to find the way back, when something matched)."""
    went: list[tuple[re.Pattern, int, str]] = []
    for pattern, into, width, marks in STAGES:
        if not marks or any(mark in text for mark in marks):
            went.append((pattern, width, text))
            text = pattern.sub(into, text)
    return text, went


class _WayBack:
    """From a stage's text back to the text before it: where each part (kept, matched,
    kept, ...) starts in both."""

    def __init__(self, pattern: re.Pattern, width: int, before: str):
        lengths = list(map(len, pattern.split(before)))  # C speed, however many matches
        self.before_at = list(accumulate(lengths, initial=0))
        lengths[1::2] = [width] * (len(lengths) // 2)
        self.after_at = list(accumulate(lengths, initial=0))

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Where the characters [start, end) came from, with whatever was dropped between."""
        part = bisect.bisect_right(self.after_at, start) - 1
        first = self.before_at[part] + (0 if part % 2 else start - self.after_at[part])
        part = bisect.bisect_right(self.after_at, end - 1) - 1
        if part % 2:
            return first, self.before_at[part + 1]
        return first, self.before_at[part] + end - self.after_at[part]


@dataclass(frozen=True)
class Needle:
    """One form of a secret, as looked for: in the case-folded text (the secret, its hex)
    or in the text with URL-safe base64 made standard (its base64)."""

    text: str
    min_run: int
    folded: bool


def needles(secret: str) -> list[Needle]:
    """The forms of ``secret`` a log may hold, each with the run of it that gives the secret
    away (``MIN_RUN`` characters of it, or all of it when shorter)."""
    data = secret.encode()
    run = min(MIN_RUN, len(data))
    found = [
        Needle(secret.translate(_FOLD), min(MIN_RUN, len(secret)), folded=True),
        Needle(data.hex(), 2 * run, folded=True),
    ]
    for align in range(3):  # the secret's first byte's place in a group of three
        encoded = base64.b64encode(bytes(align) + data).decode()
        # The characters whose six bits are all the secret's.
        core = encoded[-(-8 * align // 6) : 8 * (align + len(data)) // 6]
        found.append(Needle(core, min(len(core), _base64_run(run)), folded=False))
    return found


def _base64_run(size: int) -> int:
    """The fewest base64 characters that ``size`` bytes alone decide, over the alignments."""
    return min(8 * (align + size) // 6 - (-(-8 * align // 6)) for align in range(3))


class Redactor:
    """Replaces every form of the given secrets in a text by ``REDACTED`` (see the module's
    docstring). Made once for a set of secrets: its needles and blocks are worked out here."""

    def __init__(self, secrets: list[str] | tuple[str, ...]):
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len)[::-1]
        unique = {n for s in self.secrets for n in needles(s)}
        self.needles = sorted(unique, key=lambda n: (n.folded, n.text))
        self.shortest = min((n.min_run for n in self.needles), default=0)
        # block -> the needles holding it, at which places: any run holds one whole block.
        self.blocks: dict[tuple[bool, str], list[tuple[Needle, int]]] = {}
        for needle in self.needles:
            size = max(1, needle.min_run // 2)
            for at in range(0, len(needle.text) - size + 1, size):
                key = (needle.folded, needle.text[at : at + size])
                self.blocks.setdefault(key, []).append((needle, at))

    def redact(self, text: str) -> str:
        if not self.secrets or len(text) < self.shortest:
            return text
        for secret in self.secrets:  # as itself: whatever the looking below makes of it
            text = text.replace(secret, REDACTED)
        looked_at, went = _normal(text)
        runs = self.runs(looked_at)
        if not runs:
            return text
        ways = [_WayBack(*stage) for stage in reversed(went)]
        spans = []
        for span in runs:
            for way in ways:
                span = way.span(*span)
            spans.append(span)
        spans.sort()
        out, kept = [], 0
        for start, end in spans:
            if end <= kept:
                continue
            if start >= kept:
                out.append(text[kept:start])
                out.append(REDACTED)
            kept = end
        out.append(text[kept:])
        return "".join(out)

    def runs(self, decoded: str) -> list[tuple[int, int]]:
        """Where ``decoded`` holds a long enough run of a needle, as [start, end) in it."""
        texts = {True: decoded.translate(_FOLD), False: decoded.translate(_URLSAFE)}
        found = []
        # The run last found on each diagonal (a needle's place against the text's): the
        # other blocks of the same occurrence hit inside it, and are passed over.
        seen: dict[tuple[Needle, int], tuple[int, int]] = {}
        for (folded, block), places in self.blocks.items():
            hay = texts[folded]
            at = hay.find(block)
            while at != -1:
                for needle, offset in places:
                    start, end = seen.get((needle, at - offset), (0, 0))
                    if start <= at and at + len(block) <= end:
                        continue
                    start, end = _extend(hay, at, needle.text, offset, len(block))
                    seen[needle, at - offset] = start, end
                    if end - start >= needle.min_run:
                        found.append((start, end))
                at = hay.find(block, at + 1)
        return found


def _extend(hay: str, at: int, needle: str, offset: int, size: int) -> tuple[int, int]:
    """The longest run of ``needle`` in ``hay`` through its block at ``at`` (``offset`` in the
    needle): at most the needle's length, whatever the text; a whole needle at once."""
    if hay.endswith(needle[:offset], 0, at):
        start = at - offset
    else:
        start, place = at, offset
        while start > 0 and place > 0 and hay[start - 1] == needle[place - 1]:
            start, place = start - 1, place - 1
    if hay.startswith(needle[offset + size :], at + size):
        end = at + len(needle) - offset
    else:
        end, place = at + size, offset + size
        while end < len(hay) and place < len(needle) and hay[end] == needle[place]:
            end, place = end + 1, place + 1
    return start, end
