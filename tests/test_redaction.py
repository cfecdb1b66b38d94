"""The history's redaction against the forms a log gives a secret: each form was written as
it came before (``literal_only`` is what ``history.redact`` did, a whole-value match) and is
``[redacted]`` now; ordinary text, other hashes and short ids are left as they are; and a
megabyte takes well under a second, whatever it holds."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid

import pytest

from ray_cml_provider.node.redaction import REDACTED, Redactor

TOKEN = secrets.token_hex(32)  # Ray's token: 64 hex characters
KEY = secrets.token_urlsafe(32)  # an endpoint key or CML's API key: 43 of base64url


def literal_only(text: str, values: list[str]) -> str:
    """``history.redact`` before: only the whole value, as it is."""
    for value in values:
        text = text.replace(value, REDACTED)
    return text


def redacted(text: str, secret: str) -> str:
    """The new redaction, having checked that the old one let ``text`` through whole."""
    assert literal_only(text, [secret]) == text
    return Redactor([secret]).redact(text)


def no_run_of(form: str, text: str, size: int = 16) -> bool:
    """Whether ``text`` holds no run of ``size`` consecutive characters of ``form``."""
    return not any(form[i : i + size] in text for i in range(len(form) - size + 1))


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


@pytest.fixture(params=[TOKEN, KEY], ids=["hex-token", "urlsafe-key"])
def secret(request) -> str:
    return request.param


# -------------------------------------------------------------- each form a secret takes


def test_base64_standard_and_urlsafe_with_or_without_padding(secret):
    for data in (secret, f"{secret}!", f"{secret}!?"):  # each padding: none, one, two
        encoded = base64.b64encode(data.encode()).decode()
        urlsafe = base64.urlsafe_b64encode(data.encode()).decode()
        for form in (encoded, encoded.rstrip("="), urlsafe, urlsafe.rstrip("=")):
            out = redacted(f"value={form};", secret)
            assert out.startswith(f"value={REDACTED}") and no_run_of(form, out, 8), out


def test_base64_of_the_secret_inside_a_longer_string_at_any_alignment(secret):
    # `curl -v -u "$CDSW_APIV2_KEY:"` prints its header; "user:KEY" and other prefixes
    # put the secret's first byte at each place of a group of three.
    header = f"> Authorization: Basic {b64(f'{secret}:')}\r\n> Accept: */*"
    out = redacted(header, secret)
    assert out.startswith(f"> Authorization: Basic {REDACTED}") and out.endswith("*/*")
    for prefix in ("", "u", "us", "user:", "Bearer ", "x" * 100):
        encoded = b64(f"{prefix}{secret} and what follows")
        # The characters whose six bits are all the secret's: the ones at its edges are
        # its neighbours' too.
        start, end = -(-8 * len(prefix) // 6), 8 * (len(prefix) + len(secret)) // 6
        out = redacted(f"blob {encoded} end", secret)
        assert out == f"blob {encoded[:start]}{REDACTED}{encoded[end:]} end", prefix


def test_base64_wrapped_in_76_character_lines(secret):
    wrapped = base64.encodebytes(f"config: key={secret}\nother=1\n".encode()).decode()
    assert "\n" in wrapped.strip()  # the encoding itself is cut across lines
    out = redacted(f"-----BEGIN-----\n{wrapped}-----END-----", secret)
    assert REDACTED in out and no_run_of(wrapped.replace("\n", ""), out.replace("\n", ""), 22)


def test_hex_of_the_secret_lower_and_upper_case(secret):
    lower = secret.encode().hex()
    for form in (lower, lower.upper(), f"{lower[:50]}{lower[50:].upper()}"):
        assert redacted(f"dump: {form} (64 bytes)", secret) == f"dump: {REDACTED} (64 bytes)"
    spaced = " ".join(lower[i : i + 2] for i in range(0, len(lower), 2))  # as `xxd -p` or od
    assert redacted(f"dump: {spaced}\n", secret) == f"dump: {REDACTED}\n"


def test_percent_encoded_in_any_mix_and_case(secret):
    every = "".join(f"%{ord(c):02X}" for c in secret)
    mixed = "".join(f"%{ord(c):02x}" if i % 3 else c for i, c in enumerate(secret))
    for form in (every, every.lower(), mixed):
        url = f"https://host/api?key={form}&page=2"
        assert redacted(url, secret) == f"https://host/api?key={REDACTED}&page=2"


def test_line_wrapped_at_any_points(secret):
    broken = f"{secret[:7]}\n{secret[7:30]}\r\n  {secret[30:31]}\t{secret[31:]}"
    assert redacted(f"token: {broken}\nnext line", secret) == f"token: {REDACTED}\nnext line"
    one_per_line = "\n".join(secret)  # a narrow terminal, a character a line
    assert redacted(f"[{one_per_line}]", secret) == f"[{REDACTED}]"


def test_split_by_terminal_escape_sequences(secret):
    # A colour between every two characters, as a highlighter that colours by character.
    marks = [f"\x1b[{31 + i % 7};1m" if i % 2 else "\x1b[0m" for i in range(len(secret) - 1)]
    coloured = "".join(c + mark for c, mark in zip(secret[:-1], marks, strict=True))
    coloured += secret[-1]
    text = f"\x1b[1mkey\x1b[0m: {coloured}\x1b[0m\n"
    assert redacted(text, secret) == f"\x1b[1mkey\x1b[0m: {REDACTED}\x1b[0m\n"
    two = f"{secret[:32]}\x1b[0m\x1b[K\x1bM{secret[32:]}"  # a reset, a line cleared, a move
    assert redacted(two, secret) == REDACTED


def test_unicode_escaped_some_or_all_characters_also_as_json_writes_them(secret):
    every = "".join(f"\\u{ord(c):04x}" for c in secret)
    some = "".join(f"\\u{ord(c):04X}" if i % 2 else c for i, c in enumerate(secret))
    for form in (every, some):
        text = f'{{"api_key": "{form}"}}'
        assert redacted(text, secret) == f'{{"api_key": "{REDACTED}"}}'
        # The record is JSON with ensure_ascii=False: the backslash is written again.
        dumped = json.dumps({"log_tail": text}, ensure_ascii=False)
        out = redacted(dumped, secret)
        assert json.loads(out) == {"log_tail": f'{{"api_key": "{REDACTED}"}}'}


def test_json_escaped_colours_and_line_breaks_in_the_whole_record(secret):
    text = f"{secret[:20]}\x1b[31m{secret[20:40]}\n{secret[40:]}"
    dumped = json.dumps({"log_tail": f"key {text} done"}, ensure_ascii=False)
    assert "\\u001b[31m" in dumped and "\\n" in dumped  # as the record is written
    out = redacted(dumped, secret)
    assert json.loads(out) == {"log_tail": f"key {REDACTED} done"}


def test_a_secret_cut_by_someone_else_leaves_no_run_of_16(secret):
    for kept in (secret[:16], secret[:40], secret[-16:], secret[-30:], secret[10:26]):
        assert redacted(f"<{kept}>", secret) == f"<{REDACTED}>"
    assert redacted(f"<{secret[:15]}>", secret) == f"<{secret[:15]}>"  # under 16: too short
    cut_b64 = b64(secret)[:30]  # base64 of a prefix, cut again
    assert redacted(f"<{cut_b64}>", secret) == f"<{REDACTED}>"
    cut_hex = secret.encode().hex()[6:40]  # 17 bytes of the middle
    assert redacted(f"<{cut_hex}>", secret) == f"<{REDACTED}>"


def test_a_secret_in_another_letter_case(secret):
    assert redacted(f"KEY={secret.upper()}", secret) == f"KEY={REDACTED}"


def test_a_short_secret_only_whole():
    short = secrets.token_hex(5)  # 10 characters: the whole of it, or nothing
    redactor = Redactor([short])
    assert redactor.redact(f"a {short} b") == f"a {REDACTED} b"
    assert redactor.redact(f"a {short[:9]}.") == f"a {short[:9]}."
    encoded = b64(f"{short}:")  # its 13 first characters are the secret's alone
    assert redactor.redact(f"a {encoded} b") == f"a {REDACTED}{encoded[13:]} b"
    assert Redactor(["seven77"]).redact("seven77") == "seven77"  # not a secret: too short


def test_several_secrets_and_forms_in_one_text():
    text = (
        f"curl -H 'Authorization: Bearer {TOKEN}' https://h/?k={KEY[:20]}%{ord(KEY[20]):02X}"
        f"{KEY[21:]}\n> Authorization: Basic {b64(f'{KEY}:')}\n{TOKEN.encode().hex().upper()}\n"
    )
    out = Redactor([TOKEN, KEY]).redact(text)
    assert out == (
        f"curl -H 'Authorization: Bearer {REDACTED}' https://h/?k={REDACTED}\n"
        f"> Authorization: Basic {REDACTED}{b64(f'{KEY}:')[8 * len(KEY) // 6 :]}\n{REDACTED}\n"
    )


# -------------------------------------------------------------- nothing else


def test_ordinary_text_hashes_and_short_ids_are_left_alone():
    redactor = Redactor([TOKEN, KEY, secrets.token_hex(32), secrets.token_urlsafe(32)])
    other = secrets.token_hex(32)
    texts = [
        "2026-12-03 10:57:52 Adding 2 node(s) of type gpu_worker.\n" * 20,
        'Traceback (most recent call last):\n  File "train.py", line 12, in <module>\n',
        f"sha256 {hashlib.sha256(b'model.bin').hexdigest()} git {hashlib.sha1(b'x').hexdigest()}",
        f"node 0123abcd app {uuid.uuid4()} job raysubmit_{secrets.token_hex(4)} pid 4242",
        f"other key {other} {b64(other)} {other.encode().hex()}",
        "progress 100%|██████████| 50/50 [00:12<00:00, 4.01it/s] %20 %zz \\u00 \\n \x1b[0m",
        "\x1b[32mINFO\x1b[0m ok\t\tdone\r\n" + "ä ö ü 日本語 " * 10 + "\\\\server\\share\\new",
        json.dumps({"status": "RUNNING", "message": "Deployment 'Echo' is healthy."}),
    ]
    for text in texts:
        assert redactor.redact(text) == text


def test_no_secrets_no_change():
    assert Redactor([]).redact(f"{TOKEN} {b64(TOKEN)}") == f"{TOKEN} {b64(TOKEN)}"


# -------------------------------------------------------------- fast enough, whatever the text


def test_a_megabyte_takes_well_under_a_second():
    keys = [secrets.token_hex(32), secrets.token_hex(32), secrets.token_urlsafe(48)]
    keys.append(secrets.token_urlsafe(48))
    redactor = Redactor(keys)  # four secrets of 64 characters
    assert all(len(k) == 64 for k in keys)
    line = "2026-12-03 10:57:52,850\tINFO worker.py:77 -- step 412: loss 0.0312 (0123abcd)\n"
    ordinary = (line * (1_000_000 // len(line)))[:1_000_000]
    hiding = (f"> Authorization: Basic {b64(keys[2] + ':')}\n" * 10_000)[:1_000_000]
    adversarial = ["\\" * 1_000_000, "\x1b[" + "1" * 999_998, "%41" * 333_333, " \n" * 500_000]
    for text in [ordinary, hiding, *adversarial]:
        started = time.perf_counter()
        out = redactor.redact(text)
        assert time.perf_counter() - started < 1.0
        assert (out == text) == (text is not hiding)
