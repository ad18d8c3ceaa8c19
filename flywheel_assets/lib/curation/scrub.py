"""PII and secret scrubbing into typed placeholders.

Conversations become training data, so anything personal or secret in them is
replaced by a placeholder that names its kind (`<EMAIL>`, `<SECRET>`, ...). The
model still learns that an email went there, and never learns the email.

The rules run in a fixed order: secrets first (their digits must not be half-taken by
the phone or card rules), then emails, IPs, cards and phones. Each regex runs only when
cheap substring hints say it could match, and no repeat can split the same characters
two ways, so no text can make matching backtrack catastrophically.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "card": "<CARD>",
    "ip": "<IP>",
    "secret": "<SECRET>",
}

_PLACEHOLDER_VALUES = frozenset(PLACEHOLDERS.values())


def _after(excluded: str) -> str:
    """Look-behind: the previous character is not one of `excluded`, or closes a JSON escape.

    Tool arguments (and stored messages) are JSON text, where an escaped newline puts a
    word character, the "n" of backslash-n, right before the number or address it ends.
    """
    return rf"(?:(?<![{excluded}])|(?<=\\[nrt]))"


# Without an END line, the match stops where the base64 body does, not at the end of the text.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?:[\w+/=\s:,.]|\\[nrt]|-(?!----))*"
    r"(?:-----END[A-Z0-9 ]*PRIVATE KEY-----)?"
)

# Vendor key shapes. OpenAI/Anthropic keys must hold a digit so that hyphenated prose
# such as "sk-learn-is-a-great-library" is not taken for a key.
_TOKEN = re.compile(
    _after(r"\w-") + r"(?:"
    r"sk-(?=[\w-]*\d)[\w-]{20,}"
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_\w{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[\w-]{35}(?![\w-])"
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"
    r"|eyJ[\w-]{2,}\.eyJ[\w-]{2,}\.[\w-]*"
    r")"
)

# The token must hold a digit so that "bearer instruments" stays prose.
_BEARER = re.compile(_after(r"\w") + r"((?i:bearer)\s+)((?=[\w.~+/-]*\d)[\w.~+/-]{8,}=*)")

# A secret word not followed by a lower-case letter: `max_tokens`, `tokenizer` and
# `secretary` are not secrets, while `accessToken` and `secretKey` are. The key may be
# quoted, also as \" inside JSON-encoded JSON; a value never ends inside a JSON escape.
_KEY_ASSIGNMENT = re.compile(
    r"(?<![\w.<-])((?:\\?[\"'])?)([\w.-]*?(?i:api[_-]?key|secret|token|passw(?:or)?d)(?![a-z])[\w.-]*)\1"
    r"(\s*[:=](?!=)\s*)"
    r"(?:\\\"((?:[^\"\\\n]|\\[^\"\n])+)\\\"|\"((?:[^\"\\\n]|\\.)+)\"|'([^'\n]+)'"
    r"|([^\s\"',;&<>(){}\[\]\\]+))"
)
_VALUE_GROUPS = (4, 5, 6, 7)
_UNQUOTED_VALUE = 7

# Values that follow a secret-looking key in code and configs without being secrets.
_NOT_SECRET_VALUES = frozenset({"null", "none", "true", "false", "str", "int", "bytes", "string"})

_EMAIL = re.compile(
    _after(r"\w.%+\\-") + r"[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(_after(r"\w.") + rf"(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")

_HEX = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(
    _after(r"\w:") + rf"(?:(?:{_HEX}:){{7}}{_HEX}"
    rf"|(?:{_HEX}(?::{_HEX}){{0,6}})?::(?:{_HEX}(?::{_HEX}){{0,6}})?)(?![\w:])"
)

# Major networks start with 2-6; this keeps epoch milliseconds (1...) out of the card rule.
_CARD = re.compile(
    _after(r"\w-") + r"(?:[2-6]\d{12,18}"
    r"|[2-6]\d{3}(?:[ -]\d{4}){2}[ -]\d{1,7}"
    r"|3\d{3}[ -]\d{6}[ -]\d{4,5})(?![\w-]|\.\d)"
)

# International numbers need their "+"; national ones need the 3-3-4 shape. A bare run
# of digits, a date or "663+859" has neither.
_PHONE_INTERNATIONAL = re.compile(
    _after(r"\w+") + r"\+(?:\d{10,15}|\d{1,3}(?:[ .-]?\(\d{1,4}\)[ .-]?\d{1,10})?(?:[ .-]\d{1,10}){1,6})"
    r"(?!\w|[.-]\d)"
)
_PHONE_NATIONAL = re.compile(
    _after(r"\w+") + r"(?:1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w|[.-]\d)"
)

# Lower-cased with every digit written as 9: one cheap pass over the text lets each
# rule's gate be a few substring tests, so most texts never reach most regexes.
_SHAPE_TABLE = bytes.maketrans(
    string.digits.encode() + string.ascii_uppercase.encode(),
    b"9" * 10 + string.ascii_lowercase.encode(),
)


def _shape(text: str) -> bytes:
    return text.encode("utf-8", "ignore").translate(_SHAPE_TABLE)


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    # Returns the replacement for a match, or None when the match is not PII after all.
    redact: Callable[[re.Match[str]], str | None]
    # The regex runs only when one hint is found: a str in the text, a bytes in its shape.
    text_hints: tuple[str, ...] = ()
    shape_hints: tuple[bytes, ...] = ()

    def may_match(self, text: str, shape: bytes) -> bool:
        for hint in self.text_hints:
            if hint in text:
                return True
        for shape_hint in self.shape_hints:
            if shape_hint in shape:
                return True
        return False


def _whole(kind: str) -> Callable[[re.Match[str]], str | None]:
    return lambda match: PLACEHOLDERS[kind]


def _redact_bearer(match: re.Match[str]) -> str:
    return match.group(1) + PLACEHOLDERS["secret"]


def _redact_assignment(match: re.Match[str]) -> str | None:
    group = next(g for g in _VALUE_GROUPS if match.group(g) is not None)
    value = match.group(group)
    if value in _PLACEHOLDER_VALUES or value.lower() in _NOT_SECRET_VALUES:
        return None
    if group == _UNQUOTED_VALUE and match.string.startswith("(", match.end()):
        return None  # `token = get_token()` assigns a call, not a literal
    whole, offset = match.group(0), match.start()
    return whole[: match.start(group) - offset] + PLACEHOLDERS["secret"] + whole[match.end(group) - offset :]


def _redact_ipv6(match: re.Match[str]) -> str | None:
    text = match.group(0)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    if "::" in text:
        # `::` also appears in code (`arr[1::2]`, `dead::beef`): a compressed address must
        # have two groups, a digit, and a group of three or more hex digits.
        groups = [g for g in text.split(":") if g]
        if len(groups) < 2 or not any(c.isdigit() for c in text) or max(map(len, groups)) < 3:
            return None
    return PLACEHOLDERS["ip"]


def luhn_valid(digits: str) -> bool:
    """True when a string of digits passes the Luhn checksum that card numbers carry."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _redact_card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"[ -]", "", match.group(0))
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return PLACEHOLDERS["card"]
    return None


def _redact_phone(match: re.Match[str]) -> str | None:
    digit_count = sum(c.isdigit() for c in match.group(0))
    return PLACEHOLDERS["phone"] if 10 <= digit_count <= 15 else None


_RULES: tuple[_Rule, ...] = (
    _Rule("secret", _PRIVATE_KEY, _whole("secret"), text_hints=("PRIVATE KEY",)),
    _Rule("secret", _TOKEN, _whole("secret"), text_hints=(
        "sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_",
        "xox", "AIza", "_live_", "_test_", "eyJ",
    )),
    _Rule("secret", _BEARER, _redact_bearer, shape_hints=(b"bearer",)),
    _Rule("secret", _KEY_ASSIGNMENT, _redact_assignment,
          shape_hints=(b"api_key", b"api-key", b"apikey", b"secret", b"token", b"passw")),
    _Rule("email", _EMAIL, _whole("email"), text_hints=("@",)),
    _Rule("ip", _IPV6, _redact_ipv6, text_hints=("::",), shape_hints=(b"9:", b":9")),
    _Rule("ip", _IPV4, _whole("ip"), shape_hints=(b"9.9",)),
    _Rule("card", _CARD, _redact_card, shape_hints=(b"99999999", b"9999 9999", b"9999-9999")),
    _Rule("phone", _PHONE_INTERNATIONAL, _redact_phone, shape_hints=(b"+9",)),
    _Rule("phone", _PHONE_NATIONAL, _redact_phone, shape_hints=(b"999-9999", b"999 9999", b"999.9999")),
)


# Every rule's hints in one pattern each: most texts hold none, and then one search of the
# text and one of its shape replace a gate per rule. The digit hints share their start, so
# a run of digits is tried once, not once per hint.
_ANY_TEXT_HINT = re.compile("|".join(re.escape(hint) for rule in _RULES for hint in rule.text_hints))
_ANY_SHAPE_HINT = re.compile(rb"9(?::|\.9|99(?:99999|9[ -]9999|[-. ]9999))|:9|\+9|bearer|api[_-]?key|secret|token|passw")
# (a gate may let more texts through than the rules' hints, never fewer: test_scrub checks)


# The same gates for many conversations at once (may_need_scrubbing): literal hints matched as
# such (the word ones ASCII case-insensitively, as the shape lower-cases ASCII), the digit ones
# as a regex with [0-9] for the shape's 9.
_TEXT_HINTS = [hint for rule in _RULES for hint in rule.text_hints]
_WORD_HINTS = [hint.decode() for rule in _RULES for hint in rule.shape_hints if b"9" not in hint]
_DIGIT_HINTS = "|".join("".join({"9": "[0-9]", ".": r"\.", "+": r"\+"}.get(char, char) for char in hint.decode())
                        for rule in _RULES for hint in rule.shape_hints if b"9" in hint)


def may_need_scrubbing(conversations: list[list[dict]]) -> list[bool]:
    """Per conversation (chat messages), whether a string scrub_messages scrubs holds a rule's
    hint. One vectorised pass: most conversations hold none, and skip scrubbing altogether."""
    joined = [_joined(messages) for messages in conversations]
    try:
        texts = pl.Series(joined, dtype=pl.String)
    except UnicodeEncodeError:  # a lone surrogate, which Arrow cannot hold: that text is scrubbed unchecked
        texts = pl.Series([text if _encodable(text) else None for text in joined], dtype=pl.String)
    return holds_a_hint(texts).to_list()


def holds_a_hint(texts: pl.Series) -> pl.Series:
    """Per text (_joined's lines), whether it holds a rule's hint; a null text does."""
    flagged = texts.str.contains_any(_TEXT_HINTS) | texts.str.contains_any(_WORD_HINTS, ascii_case_insensitive=True) \
        | texts.str.contains(_DIGIT_HINTS)
    return flagged.fill_null(True)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _joined(messages: list[dict]) -> str:
    """The strings scrub_messages scrubs, a line each (no hint holds a line break)."""
    parts = []
    for message in messages:
        if isinstance(message.get("content"), str):
            parts.append(message["content"])
        for call in message.get("tool_calls") or ():
            function = call.get("function")
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                parts.append(function["arguments"])
    return "\n".join(parts)


def _apply(rule: _Rule, text: str) -> tuple[str, int]:
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        redacted = rule.redact(match)
        if redacted is None:
            return match.group(0)
        count += 1
        return redacted

    return rule.pattern.sub(replace, text), count


def scrub_text(text: str | None) -> tuple[str | None, dict[str, int]]:
    """The text with PII and secrets replaced, and how many of each kind were replaced."""
    if text is None:
        return None, {}
    counts: dict[str, int] = {}
    shape = _shape(text)
    if _ANY_TEXT_HINT.search(text) is None and _ANY_SHAPE_HINT.search(shape) is None:
        return text, counts
    for rule in _RULES:
        if not rule.may_match(text, shape):
            continue
        text, count = _apply(rule, text)
        if count:
            counts[rule.kind] = counts.get(rule.kind, 0) + count
            shape = _shape(text)
    return text, counts


def find_pii(text: str | None) -> list[str]:
    """The kinds of PII the scrubber would still replace in a text, in PLACEHOLDERS order."""
    found = scrub_text(text)[1]
    return [kind for kind in PLACEHOLDERS if kind in found]


def scrub_messages(messages: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Chat messages with every string content and tool-call argument string scrubbed.

    Returns new message dicts, leaving the input untouched, and the total counts per kind.
    """
    total: Counter[str] = Counter()

    def scrub(text: str) -> str:
        scrubbed, counts = scrub_text(text)
        total.update(counts)
        return scrubbed

    result = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), str):
            message["content"] = scrub(message["content"])
        if message.get("tool_calls"):
            message["tool_calls"] = [_scrub_arguments(call, scrub) for call in message["tool_calls"]]
        result.append(message)
    return result, dict(total)


def _scrub_arguments(call: dict, scrub: Callable[[str], str]) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return dict(call)
    return {**call, "function": {**function, "arguments": scrub(function["arguments"])}}
