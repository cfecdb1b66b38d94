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
import urllib.parse
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


def test_hex_with_a_separator_between_bytes(secret):
    data = secret.encode()
    for form in (data.hex(":"), data.hex(":").upper(), data.hex("-")):  # bytes.hex, a MAC's
        assert redacted(f"key {form} end", secret) == f"key {REDACTED} end"
    rows = [", ".join(f"0x{b:02x}" for b in data[i : i + 12]) for i in range(0, len(data), 12)]
    xxd = "unsigned char key[] = {\n  " + ",\n  ".join(rows) + "\n};"  # as `xxd -i` writes
    assert redacted(xxd, secret) == f"unsigned char key[] = {{\n  0x{REDACTED}\n}};"


def test_c_octal_and_percent_u_escapes_also_as_json_writes_them(secret):
    data = secret.encode()
    c_hex = "".join(f"\\x{b:02x}" for b in data)  # printf, a C string, Python's bytes repr
    octal = "".join(f"\\{b:03o}" for b in data)
    percent_u = "".join(f"%u{b:04X}" for b in data)  # JavaScript's escape()
    for form in (c_hex, octal, percent_u):
        assert redacted(f'printf "{form}"', secret) == f'printf "{REDACTED}"'
        dumped = json.dumps({"command": f'printf "{form}"'})
        assert json.loads(redacted(dumped, secret)) == {"command": f'printf "{REDACTED}"'}


def test_html_entities_decimal_hex_and_mixed(secret):
    data = secret.encode()
    decimal = "".join(f"&#{b};" for b in data)
    mixed = "".join(f"&#x{b:X};" if i % 2 else chr(b) for i, b in enumerate(data))
    page = f'<input name="key" value="{decimal}"><p>&lt;{mixed}&gt; &amp; more</p>'
    out = redacted(page, secret)
    assert out == f'<input name="key" value="{REDACTED}"><p>&lt;{REDACTED}&gt; &amp; more</p>'


def test_percent_encoded_twice_or_three_times(secret):
    once = "".join(f"%{b:02X}" for b in secret.encode())
    twice = urllib.parse.quote(once, safe="")  # %2541: a URL inside a URL's query
    thrice = urllib.parse.quote(twice, safe="")
    for form in (twice, twice.lower(), thrice):
        url = f"https://host/login?next=%2Fapi%3Fkey%3D{form}&page=2"
        assert redacted(url, secret) == f"https://host/login?next=%2Fapi%3Fkey%3D{REDACTED}&page=2"


def test_json_escaped_slashes_in_base64_as_php_writes_them():
    pairs = secrets.token_urlsafe(21)  # 28 characters
    key = "".join(f"{a}{b}?" for a, b in zip(pairs[::2], pairs[1::2], strict=True))
    encoded = b64(key)  # each group of three ends in "?": each fourth character is a slash
    assert encoded.count("/") == len(key) // 3
    escaped = encoded.replace("/", "\\/")
    assert redacted(f'{{"token": "{escaped}"}}', key) == f'{{"token": "{REDACTED}"}}'


def test_base32_at_any_alignment_in_either_case(secret):
    for prefix in ("", "u", "us", "use", "user", "user:"):  # each place in a group of five
        encoded = base64.b32encode(f"{prefix}{secret} and what follows".encode()).decode()
        start, end = -(-8 * len(prefix) // 5), 8 * (len(prefix) + len(secret)) // 5
        for form in (encoded, encoded.lower()):
            out = redacted(f"blob {form} end", secret)
            assert out == f"blob {form[:start]}{REDACTED}{form[end:]} end", prefix


def test_base64_of_base64_as_a_kubernetes_secret_holds_a_registry_login(secret):
    # `kubectl get secret -o yaml` of a .dockerconfigjson: its "auth" is base64("user:KEY"),
    # and the whole of it base64 again; each of three places in the inner base64, each of
    # three in the outer.
    for user in ("u", "us", "usr"):
        auth = b64(f"{user}:{secret}")
        inner = -(-8 * (len(user) + 1) // 6), 8 * (len(user) + 1 + len(secret)) // 6
        for registry in ("r.io", "re.io", "reg.io"):
            config = json.dumps({"auths": {registry: {"auth": auth}}})
            outer, at = b64(config), config.index(auth)
            start, end = -(-8 * (at + inner[0]) // 6), 8 * (at + inner[1]) // 6
            out = redacted(f"  .dockerconfigjson: {outer}\n", secret)
            assert out == f"  .dockerconfigjson: {outer[:start]}{REDACTED}{outer[end:]}\n"


@pytest.mark.parametrize(
    "mark",
    ["\u00ad", "\u2062", "\u2064", "\u034f", "\ufe0f", "\U000e0100", "\u3164", "\u0301"],
    ids=[
        "soft-hyphen",
        "invisible-times",
        "invisible-plus",
        "cgj",
        "vs16",
        "vs17",
        "filler",
        "acute",
    ],
)
def test_characters_that_show_nothing_between_every_two(secret, mark):
    assert redacted(f"key: {mark.join(secret)}{mark} end", secret) == f"key: {REDACTED}{mark} end"


def test_fullwidth_and_other_compatibility_letters(secret):
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in secret)  # ａ for a, ＿ for _
    assert redacted(f"「{fullwidth}」", secret) == f"「{REDACTED}」"
    assert redacted(f"key {fullwidth[:20]}{secret[20:]}.", secret) == f"key {REDACTED}."
    # Characters that read as several (ﷺ as 18) around it: worked back one at a time.
    assert redacted(f"ﬁ ① ﷺ{fullwidth}ﬀ ½", secret) == f"ﬁ ① ﷺ{REDACTED}ﬀ ½"

    def sans_bold(c: str) -> str:  # 𝗮 𝗔 𝟬: mathematical letters, as NFKC has them
        if c.isdigit():
            return chr(0x1D7EC + int(c))
        if c.isalpha():
            return chr((0x1D5EE if c.islower() else 0x1D5D4) + ord(c.lower()) - ord("a"))
        return c

    bold = "".join(map(sans_bold, secret))
    assert redacted(f"key {bold}\n", secret) == f"key {REDACTED}\n"


def test_backspace_overstrike_as_man_prints_bold_and_underline(secret):
    bold = "".join(f"{c}\b{c}" for c in secret)
    underline = "".join(f"_\b{c}" for c in secret)
    for form in (bold, underline):
        assert redacted(f"K\bKE\bEY\bY: {form}\n", secret) == f"K\bKE\bEY\bY: {REDACTED}\n"


def test_charset_escapes_and_colours_as_cat_v_shows_them(secret):
    pieces = [secret[i : i + 8] for i in range(0, len(secret), 8)]
    sgr0 = "\x1b(B\x1b[m"  # what `tput sgr0` prints for xterm
    text = f"{sgr0}key: {sgr0.join(pieces)}{sgr0}\n"
    assert redacted(text, secret) == f"{sgr0}key: {REDACTED}{sgr0}\n"
    caret = "^[[31m".join(pieces)  # a coloured log through `cat -v`
    assert redacted(f"key: {caret}^[[0m", secret) == f"key: {REDACTED}^[[0m"


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


def test_ordinary_text_in_other_scripts_emoji_html_and_dumps_is_left_alone():
    redactor = Redactor([TOKEN, KEY, secrets.token_hex(32), secrets.token_urlsafe(32)])
    other = secrets.token_urlsafe(32)
    texts = [
        "Grüße aus Köln — naïve café, Ærøskøbing, 東京都渋谷区，（株）テスト　ＡＢＣ１２３\n" * 50,
        "नमस्ते दुनिया, สวัสดีชาวโลก, مرحبا بالعالم, שלום עולם\u200f, Привет, мир\n" * 20,
        "done ✔️ ❤️ 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ☀︎ #️⃣ 1️⃣ ﬁle ﬀ ① ™ ½ ㎏ Å é\n" * 20,
        "<p>Tom &amp; Jerry &lt;3 &quot;caf&#233;&quot; &#x1F600; &#128512; &copy; 2026 &#8212;"
        ' <a href="/?a=1&amp;b=2">next</a> &#99999999;</p>',
        f"fingerprint {secrets.token_bytes(16).hex(':')} mac 00:1A:2B:3C:4D:5E 2026-12-03",
        f"{base64.b32encode(other.encode()).decode()} {b64(b64(other))} {other.encode().hex(':')}",
        "man: N\bNA\bAM\bME\bE _\bl_\bs; printf '\\x1b[0m\\101\\102\\/' %2520 %u00e9 &#10; \b",
        "\x1b(B\x1b[m\x1b)0\x1b7\x1b8 ^[[31mred^[[0m ^[a-z]+$",
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
    adversarial += ["%25" * 333_333, "&#97;" * 200_000, "a\b" * 500_000, "\u00ad" * 1_000_000]
    adversarial += ["\uff11" * 1_000_000]  # fullwidth 1: a megabyte of 1 as it reads
    beyond = [chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000]
    adversarial.append("".join(beyond)[:1_000_000])  # every character beyond ASCII, once
    redactor.redact("\u00e9")  # the table of characters beyond ASCII: once a process
    for text in [ordinary, hiding, *adversarial]:
        started = time.perf_counter()
        out = redactor.redact(text)
        assert time.perf_counter() - started < 1.0
        assert (out == text) == (text is not hiding)
