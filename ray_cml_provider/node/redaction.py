r"""Secrets kept out of text that others will read (the head's history), in every form a log
gives them, not only as themselves.

A log seldom prints a secret as it is: ``curl -v -u "$CDSW_APIV2_KEY:"`` prints
``Authorization: Basic <base64 of "KEY:">``, a dump prints its bytes in hex, a URL
percent-encodes it, a terminal's colours or a wrapped line split it, JSON escapes it, and a
cut (a log's tail, a message kept to 300 characters) leaves most of it. A literal match
misses all of these. So a ``Redactor`` looks for each secret's *needles*:

- the secret itself, in any letter case (as it reads, below);
- the hex of its bytes, in any letter case, bare or with a separator between bytes
  (``bytes.hex(':')``, ``-``, ``xxd -i``'s ``0x33, 0x66``; spaces and ``\x33`` escapes are
  taken care of by the reading below);
- its base64, standard or URL-safe, at each of the three alignments a secret takes inside a
  longer encoded string (``user:KEY``, ``KEY:``): the characters that depend only on the
  secret's bytes (the ones at its edges mix in its neighbours' bits);
- its base32, in any letter case, the same way at each of its five alignments;
- its base64 encoded again (a Kubernetes secret's ``.dockerconfigjson``, whose ``auth`` is
  ``base64("user:KEY")``): each of the three inner forms at each of three outer alignments;

and redacts any run of a needle that stands for at least ``MIN_RUN`` (16) consecutive
characters of the secret (the whole secret when it is shorter): a secret cut by someone else
still gives most of itself away. It looks in the text as it reads, which is the text

- with a backspace's overstrike (``a\ba``, ``_\ba``: man's bold and underline) as it shows;
- with each character beyond ASCII in NFKC (fullwidth ``ａ`` is ``a``), one at a time, and
  the ones that show nothing or only mark another dropped: format characters (Unicode's Cf:
  the soft hyphen, U+2062, zero-width ones), combining marks (U+034F, the variation selector
  U+FE0F), C1 controls and Hangul fillers;
- with whitespace (a wrapped line, base64's 76-character lines), terminal escape sequences
  (``ESC[31m``, ``tput sgr0``'s ``ESC(B``, also as ``cat -v`` shows them, ``^[[31m``) and
  JSON's escaped line breaks dropped;
- with escapes decoded: percent (``%41``, ``%u0041``), ``\u0041`` (also as JSON writes it,
  ``\\u0041``), ``\x41``, ``\101``, JSON's ``\/`` and HTML's ``&#65;``, ``&#x41;``,
  ``&amp;``; an escape escaped again (``%2541``) too, up to three rounds;

and what matched is replaced in the original text, with the noise and escapes inside it, by
``[redacted]``.

Not caught, and out of scope: a secret cut into pieces shorter than ``MIN_RUN`` that stand
apart, such as two separate fields of a record, or a ``.`` every 12 characters (each piece
alone is what chance gives too; this is a limit of the design, not a gap to close); encodings
and transformations other than the ones above (base85, UTF-16, octal or decimal dumps, base64
of the hex and other pairings, a URL-safe base64 inside a double base64, quoted-printable's
soft line breaks, reversal, ROT13, upper-casing before encoding); escapes nested more than
three deep, and percent or ``\x`` escapes of bytes beyond ASCII; look-alike letters of other
scripts (Cyrillic ``а``), which NFKC leaves as they are; a precomposed letter (``é``) where
the secret has a plain one.

How, and why it is fast: each needle is cut in aligned blocks of half its shortest run, so
that any run long enough holds a whole block; ``str.find`` looks for the blocks (C speed, and
no regular expression over the text for each secret) and each hit is extended both ways
along the needle, never further than the needle's length. A needle spelt in an alphabet (hex,
hex with its separators, base32, base64) is looked for only when the text holds a run of that
alphabet as long as the needle's run (``bytes.translate`` and one ``find``): most logs hold
none, and of a secret's 22 needles, only the ones no alphabet spells are looked for. The text's
transformations are ``re.sub`` and ``str.translate``, a stage skipped when the text lacks the
characters it needs (``\b``, anything beyond ASCII, ``\x1b``, ``^``, ``\\``, ``%``,
``&``); their patterns backtrack at most over one token (the lookbehinds keep a run of
backslashes from being tried again at each of its characters). What each character beyond
ASCII reads as is one table for ``str.translate``, made once a process (0.1 s), at the first
text that has one. Positions are worked back to the original text only when something
matched, with ``re.split`` and sums rather than a loop over every match (a stage that makes
a character or an escape into some other number of characters counts each one's). A
megabyte of ordinary log with four 64-character secrets takes about 0.04 s, 0.2 s when every
line holds hashes and ids; one that hides thousands of encoded secrets, about 0.2 s; the
slowest we could make, about 0.5 s.

Standard library only: the head's launcher imports it.
"""

from __future__ import annotations

import base64
import bisect
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

REDACTED = "[redacted]"
MIN_RUN = 16  # consecutive characters of a secret that give it away
MIN_SECRET = 8  # shorter values are not secrets the head holds: looked for, they'd hit words
ROUNDS = 3  # escapes decoded again as long as they come out as escapes, at most this often

# Backspace's overstrike: a cell (characters, each but the last followed by a backspace)
# reads as its last character, the one that shows (man's bold a\ba, its underline _\ba).
OVERSTRIKE = re.compile(r"((?:[^\x08]?\x08)+[^\x08]?)")
# Characters beyond ASCII: in runs, to be read; one at a time, to be worked back.
BEYOND_ASCII = re.compile(r"[^\x00-\x7f]+")
NON_ASCII = re.compile(r"([^\x00-\x7f])")
# What shows nothing or only marks another: format characters, combining marks, C1 controls,
# and the Hangul fillers (letters that show as nothing).
_NOISE = {"Cf", "Mn", "Me", "Cc"}
_FILLERS = set("\u115f\u1160\u3164\uffa0")
# An ESC, as ``cat -v`` shows it (^[), or as JSON writes it (\u001b). A run of backslashes
# matches only from its first one (the lookbehinds): otherwise each backslash of a long run
# would start a match that backtracks over the rest of the run, quadratic in its length.
_ESC = r"(?:\x1b|\^\[|(?<!\\)\\+u001[bB])"
# What the text goes through next, in turn: each pattern has one group (what ``split``
# keeps), each match is dropped or becomes what it decodes to, and a text without any of
# the stage's marks has no match (the stage is skipped: most text has none).
WHITESPACE = re.compile(r"([\s\u200b-\u200d\u2060\ufeff]+)")  # wrapped lines, zero-width
# Terminal escape sequences (CSI such as ESC[31m; ESC, at most three intermediates and a
# final, such as ESC(B), and line breaks and tabs as JSON writes them.
MARKS = re.compile(rf"((?:{_ESC}\[[0-?]*[ -/]*[@-~]|{_ESC}[ -/]{{0,3}}[0-~]|(?<!\\)\\+[nrt])+)")
# %41 and \x41 (ASCII only), %u0041 and \u0041 (\\u0041 as JSON writes it), \101 (octal,
# ASCII only), JSON's \/ (PHP writes base64 so), &#65; &#x41; and the named entities of the
# characters HTML escapes.
ESCAPES = re.compile(
    r"(%[0-7][0-9A-Fa-f]|%[uU][0-9A-Fa-f]{4}"
    r"|(?<!\\)\\+(?:u[0-9A-Fa-f]{4}|x[0-7][0-9A-Fa-f]|[01][0-7]{2}|/)"
    r"|&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|amp|lt|gt|quot|apos);)"
)
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'"}
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # keeps the length
_URLSAFE = str.maketrans("-_", "+/")  # URL-safe base64 looked for as standard base64
_SEPARATORS = (":", "-", ",0x")  # between a hex dump's bytes (whitespace is dropped first)
# The alphabets of the needles, in the text they are looked for in (case-folded or not), as
# letters and marks (a hex dump's separators): a needle is looked for only where the text,
# each letter made ``#``, holds what any run of the needle shows so (see ``_gate``).
_HEX = string.digits + "abcdef"
_ALPHABETS = {
    True: [
        (_HEX, ""),
        (_HEX, ":"),
        (_HEX, "-"),
        (_HEX, ",x"),
        (string.ascii_lowercase + "234567", ""),
    ],
    False: [(string.ascii_letters + string.digits + "+/", "")],
}
_MASKS = {  # bytes.translate's tables: a letter as #, a mark as itself, the rest as a space
    alphabet: bytes(
        ord("#") if chr(byte) in alphabet[0] else byte if chr(byte) in alphabet[1] else ord(" ")
        for byte in range(256)
    )
    for alphabets in _ALPHABETS.values()
    for alphabet in alphabets
}


def _dropped(char: str) -> bool:
    return char.isspace() or char in _FILLERS or unicodedata.category(char) in _NOISE


_READS: dict[int, str] = {}


def _reads() -> dict[int, str]:
    """Each character beyond ASCII that reads as something else (its NFKC, without what shows
    nothing), for ``str.translate``: worked out for the first text that needs it (0.1 s).
    Planes 4 to 13 hold no characters, 15 and 16 only private ones."""
    if not _READS:
        chars = [chr(c) for c in (*range(0x80, 0xD800), *range(0xE000, 0x40000))]
        chars += map(chr, range(0xE0000, 0xE1000))
        normals = map(partial(unicodedata.normalize, "NFKC"), chars)
        categories = map(unicodedata.category, chars)
        reads = {
            ord(char): "".join(c for c in normal if not _dropped(c))
            for char, normal, category in zip(chars, normals, categories, strict=True)
            if normal != char or category in _NOISE or char.isspace() or char in _FILLERS
        }
        _READS.update(reads)  # at once: another thread sees it empty or whole
    return _READS


def _as_read(text: str) -> str:
    """Characters beyond ASCII as they read."""
    if text.isascii():
        return text
    if len(text) - len(text.encode("ascii", "ignore")) > len(text) // 16:  # many: all at once
        return text.translate(_reads())
    return BEYOND_ASCII.sub(_read_run, text)  # a few among ASCII: only their runs


def _read_run(match: re.Match) -> str:
    return match[0].translate(_reads())


def _decoded(escape: str) -> str:
    """What an escape (``ESCAPES``) reads as: whitespace and what shows nothing, as nothing."""
    if escape[0] == "&":
        if escape in _ENTITIES:
            return _ENTITIES[escape]
        value = int(escape[3:-1], 16) if escape[2] in "xX" else int(escape[2:-1])
    elif escape[0] == "%":
        value = int(escape[2:] if escape[1] in "uU" else escape[1:], 16)
    else:
        digits = escape.lstrip("\\")
        if digits == "/":
            return "/"
        value = int(digits[1:], 16) if digits[0] in "ux" else int(digits, 8)
    if value > 0x10FFFF:
        return escape  # not a character: left as it is
    char = chr(value)
    return ("" if char.isspace() else char) if char.isascii() else _as_read(char)


_DECODED: dict[str, str] = {}  # escape -> what it reads as; a text seldom has many kinds


def _decode(match: re.Match) -> str:
    escape = match[0]
    decoded = _DECODED.get(escape)
    if decoded is None:
        decoded = _decoded(escape)
        if len(_DECODED) < 65536:
            _DECODED[escape] = decoded
    return decoded


def _overstruck(match: re.Match) -> str:
    return match[0][-1].replace("\b", "")


def _overstruck_width(cell: str) -> int:
    return 0 if cell[-1] == "\b" else 1


def _read_width(char: str) -> int:
    return len(_reads().get(ord(char), char))


def _decoded_width(escape: str) -> int:
    return len(_DECODED.get(escape) or _decoded(escape))


Gate = tuple[tuple[str, str], bytes]  # an alphabet (letters, marks), what a run holds masked
# A stage the text went through: its pattern, what each match became (a number of characters,
# or how to count them for each match), and the text before it.
Stage = tuple[re.Pattern, int | Callable[[str], int], str]


def _normal(text: str) -> tuple[str, list[Stage]]:
    """The text as it is looked at, and each stage it went through with what it was before
    it (to find the way back, when something matched)."""
    went: list[Stage] = []
    if "\b" in text:
        went.append((OVERSTRIKE, _overstruck_width, text))
        text = OVERSTRIKE.sub(_overstruck, text)
    read = _as_read(text)
    if read != text:
        went.append((NON_ASCII, _read_width, text))
        text = read
    for pattern, marks in ((WHITESPACE, ""), (MARKS, "\x1b\\^")):
        if not marks or any(mark in text for mark in marks):
            went.append((pattern, 0, text))
            text = pattern.sub("", text)
    for _ in range(ROUNDS):
        if not any(mark in text for mark in "%\\&"):
            break
        decoded, count = ESCAPES.subn(_decode, text)
        if not count:
            break
        went.append((ESCAPES, _decoded_width, text))
        text = decoded
    return text, went


class _WayBack:
    """From a stage's text back to the text before it: where each part (kept, matched,
    kept, ...) starts in both."""

    def __init__(self, pattern: re.Pattern, width: int | Callable[[str], int], before: str):
        parts = pattern.split(before)  # C speed, however many matches
        lengths = list(map(len, parts))
        self.before_at = list(accumulate(lengths, initial=0))
        if callable(width):  # what a character beyond ASCII, or an escape, became
            lengths[1::2] = list(map(width, parts[1::2]))
        else:
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
    """One form of a secret, as looked for: in the case-folded text (the secret, its hex, its
    base32) or in the text with URL-safe base64 made standard (its base64)."""

    text: str
    min_run: int
    folded: bool


def needles(secret: str) -> list[Needle]:
    """The forms of ``secret`` a log may hold, each with the run of it that gives the secret
    away (``MIN_RUN`` characters of it, or all of it when shorter)."""
    data = secret.encode()
    run = min(MIN_RUN, len(data))
    itself = _normal(secret)[0].translate(_FOLD)  # as the text around it is read
    found = []  # shorter than a secret as it reads (escapes): only as it is (``redact``)
    if len(itself) >= MIN_SECRET:
        found.append(Needle(itself, min(MIN_RUN, len(itself)), folded=True))
    hexed = [f"{byte:02x}" for byte in data]
    found.append(Needle("".join(hexed), 2 * run, folded=True))
    for sep in _SEPARATORS:
        found.append(Needle(sep.join(hexed), 2 * run + len(sep) * (run - 1), folded=True))
    base64_run = _run(run, bits=6)
    for core in _cores(data, bits=6):
        found.append(Needle(core, min(len(core), base64_run), folded=False))
        inner_run = min(len(core), base64_run)  # and this one's own base64
        for outer in _cores(core.encode(), bits=6):
            found.append(Needle(outer, min(len(outer), _run(inner_run, bits=6)), folded=False))
    for core in _cores(data, bits=5):
        found.append(Needle(core.lower(), min(len(core), _run(run, bits=5)), folded=True))
    return found


def _cores(data: bytes, bits: int) -> list[str]:
    """The base64 (``bits`` 6) or base32 (5) of ``data`` at each place of its first byte in
    a group (of three, of five): the characters whose bits are all ``data``'s."""
    group, encode = (3, base64.b64encode) if bits == 6 else (5, base64.b32encode)
    cores = []
    for align in range(group):
        encoded = encode(bytes(align) + data).decode()
        cores.append(encoded[-(-8 * align // bits) : 8 * (align + len(data)) // bits])
    return cores


def _run(size: int, bits: int) -> int:
    """The fewest base64 (``bits`` 6) or base32 (5) characters that ``size`` bytes alone
    decide, over the alignments."""
    group = 3 if bits == 6 else 5
    return min(8 * (align + size) // bits - (-(-8 * align // bits)) for align in range(group))


def _gate(needle: Needle) -> Gate | None:
    """The first of the alphabets that spells the needle, if one does, and what a run of the
    needle always holds in it, masked (letters as ``#``): the masked needle repeats every
    ``period`` characters (one, or a hex dump's byte with its separator), so a run holds its
    first ``min_run - period + 1``."""
    chars = set(needle.text)
    for alphabet in _ALPHABETS[needle.folded]:
        if chars.issubset(alphabet[0] + alphabet[1]):
            masked = needle.text.encode().translate(_MASKS[alphabet])
            period = next(p for p in range(1, len(masked) + 1) if masked[p:] == masked[:-p])
            size = needle.min_run - period + 1
            return (alphabet, masked[:size]) if size > 0 else None
    return None


class Redactor:
    """Replaces every form of the given secrets in a text by ``REDACTED`` (see the module's
    docstring). Made once for a set of secrets: its needles and blocks are worked out here."""

    def __init__(self, secrets: list[str] | tuple[str, ...]):
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len)[::-1]
        unique = {n for s in self.secrets for n in needles(s)}
        self.needles = sorted(unique, key=lambda n: (n.folded, n.text))
        self.shortest = min((n.min_run for n in self.needles), default=0)
        # block -> the needles holding it, at which places: any run holds one whole block;
        # looked for only where the text holds the needles' gate (None: anywhere).
        self.blocks: dict[tuple[bool, Gate | None, str], list[tuple[Needle, int]]] = {}
        for needle in self.needles:
            gate = _gate(needle)
            size = max(1, needle.min_run // 2)
            for at in range(0, len(needle.text) - size + 1, size):
                key = (needle.folded, gate, needle.text[at : at + size])
                self.blocks.setdefault(key, []).append((needle, at))

    def redact(self, text: str) -> str:
        if not self.secrets or (len(text) < self.shortest and text.isascii()):
            return text  # (NFKC may lengthen a text: ``ﬀ`` is ``ff``)
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
        masked: dict[tuple[str, str], bytes] = {}  # bytes.translate and a find: C speed
        gates: dict[Gate | None, bool] = {None: True}
        for folded, gate, _ in self.blocks:
            if gate not in gates:
                alphabet, holds = gate
                if alphabet not in masked:
                    text = texts[folded].encode("ascii", "replace")
                    masked[alphabet] = text.translate(_MASKS[alphabet])
                gates[gate] = holds in masked[alphabet]
        found = []
        # The run last found on each diagonal (a needle's place against the text's): the
        # other blocks of the same occurrence hit inside it, and are passed over.
        seen: dict[tuple[Needle, int], tuple[int, int]] = {}
        for (folded, gate, block), places in self.blocks.items():
            if not gates[gate]:
                continue
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
