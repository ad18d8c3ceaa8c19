import copy
import json

import pytest

from flywheel_assets.lib.curation.scrub import (
    _ANY_SHAPE_HINT,
    _ANY_TEXT_HINT,
    _RULES,
    PLACEHOLDERS,
    find_pii,
    luhn_valid,
    may_need_scrubbing,
    scrub_messages,
    scrub_text,
)

# Fake keys are assembled from parts so that secret scanners do not flag this file.
OPENAI_KEY = "sk-proj-" + "Ab3dE5fG7h" * 4
ANTHROPIC_KEY = "sk-ant-api03-" + "xY9_zW8-vU7t" * 3
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SESSION_KEY = "ASIA" + "Q3EXAMPLE7TOKEN1"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6" * 3
GITHUB_PAT = "github_pat_" + "11ABCDEFG0" + "_abcdefghij1234567890"
SLACK_TOKEN = "xoxb-" + "1234567890-0987654321-" + "AbCdEfGhIjKl"
GOOGLE_KEY = "AIza" + "SyD-1234567890abcdefghijklmnopqrstu"
STRIPE_KEY = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
JWT = "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0" + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PRIVATE_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1L\n-----END RSA " + "PRIVATE KEY-----"

PII_CORPUS = [
    # email
    ("Contact me at jane.doe@example.com for details.", "Contact me at <EMAIL> for details."),
    ("Write to first.last+news@sub.example.co.uk.", "Write to <EMAIL>."),
    ("(bob_smith99@mail-server.org)", "(<EMAIL>)"),
    # phone
    ("Call (555) 123-4567 tomorrow.", "Call <PHONE> tomorrow."),
    ("My number is 555-123-4567.", "My number is <PHONE>."),
    ("Fax 555.123.4567 or text me", "Fax <PHONE> or text me"),
    ("call 1-800-555-0199 toll free", "call <PHONE> toll free"),
    ("Reach me on +44 20 7946 0958 after 6pm.", "Reach me on <PHONE> after 6pm."),
    ("Dial +1-555-123-4567 now", "Dial <PHONE> now"),
    ("WhatsApp +14155552671", "WhatsApp <PHONE>"),
    ("Office: +44 (0)20 7946 0958", "Office: <PHONE>"),
    ("+33 1 23 45 67 89 is the Paris desk", "<PHONE> is the Paris desk"),
    # card (all pass Luhn)
    ("Card 4111 1111 1111 1111 expires 12/27", "Card <CARD> expires 12/27"),
    ("pay with 4111-1111-1111-1111 please", "pay with <CARD> please"),
    ("Mastercard 5555555555554444 on file", "Mastercard <CARD> on file"),
    ("Amex 3782 822463 10005.", "Amex <CARD>."),
    ("visa:4012888888881881", "visa:<CARD>"),
    # ip
    ("Server at 192.168.1.100 is down", "Server at <IP> is down"),
    ("connect to 10.0.0.1:8080", "connect to <IP>:8080"),
    ("host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 responded", "host <IP> responded"),
    ("ping fe80::1ff:fe23:4567:890a", "ping <IP>"),
    ("route via 2001:db8::8a2e:370:7334.", "route via <IP>."),
    # secret: vendor shapes
    (f"export OPENAI_API_KEY={OPENAI_KEY}", "export OPENAI_API_KEY=<SECRET>"),
    (f"use {ANTHROPIC_KEY} for claude", "use <SECRET> for claude"),
    (f"aws id {AWS_KEY} and {AWS_SESSION_KEY}", "aws id <SECRET> and <SECRET>"),
    (f"git clone https://{GITHUB_TOKEN}@github.com/o/r", "git clone https://<SECRET>@github.com/o/r"),
    (f"GH token {GITHUB_PAT}", "GH token <SECRET>"),
    (f"slack {SLACK_TOKEN} posted", "slack <SECRET> posted"),
    (f"maps key {GOOGLE_KEY}", "maps key <SECRET>"),
    (f"stripe {STRIPE_KEY}", "stripe <SECRET>"),
    (f"session {JWT} expired", "session <SECRET> expired"),
    ("Authorization: Bearer abc123def456ghi789", "Authorization: Bearer <SECRET>"),
    (f"key:\n{PRIVATE_KEY}\ndone", "key:\n<SECRET>\ndone"),
    # secret: key = value assignments, only the value replaced
    ('{"password": "hunter2"}', '{"password": "<SECRET>"}'),
    ("db_password=s3cr3t! host=db", "db_password=<SECRET> host=db"),
    ("client_secret: 'correct horse battery'", "client_secret: '<SECRET>'"),
    ("GET /v1/data?api_key=XYZ123&format=json", "GET /v1/data?api_key=<SECRET>&format=json"),
    ("accessToken = tok_9f8e7d", "accessToken = <SECRET>"),
    ("APIKEY: 'abc'", "APIKEY: '<SECRET>'"),
    # several kinds in one text
    ("Mail jane@example.com, call 555-123-4567, card 4111111111111111, host 10.1.2.3",
     "Mail <EMAIL>, call <PHONE>, card <CARD>, host <IP>"),
]

CLEAN_CORPUS = [
    "What is 663+859?",
    "What is 663 + 859?",
    "convert 12 km to miles",
    "2026-11-26T10:00:00Z",
    "Meeting at 10:30 on 2026-11-26, UTC+05:30",
    "Released v1.2.3 today; version 1.2.3 is stable",
    "id 123e4567-e89b-12d3-a456-426614174000",
    "The answer is 1522.",
    "pi is 3.14159",
    '{"a": 663, "b": 859}',
    "Order 4111111111111112 fails the Luhn check",
    "Timestamp 1764151200000 in milliseconds",
    "Scores 100 200 300 and 10 - 5 = 5",
    "Price: $1,234,567.89",
    "Local number 555-1234 has seven digits",
    "ISBN 978-3-16-148410-0",
    "999.1.1.1 is not an address",
    "arr[1::2] and std::vector<int>",
    "the sk-learn-style-api-is-nice",
    "set max_tokens=512 and temperature=0.7",
    "the tokenizer splits text into tokens",
    "def connect(api_key: str) -> None:",
    "token = get_token()",
    "The bearer of bad news",
    "email me @ noon",
]


def expected_counts(scrubbed: str) -> dict[str, int]:
    return {kind: scrubbed.count(p) for kind, p in PLACEHOLDERS.items() if scrubbed.count(p)}


@pytest.mark.parametrize("text, scrubbed", PII_CORPUS)
def test_scrub_text_replaces_pii_with_typed_placeholders(text, scrubbed):
    assert scrub_text(text) == (scrubbed, expected_counts(scrubbed))


@pytest.mark.parametrize("text", CLEAN_CORPUS)
def test_scrub_text_leaves_ordinary_text_unchanged(text):
    assert scrub_text(text) == (text, {})
    assert find_pii(text) == []


@pytest.mark.parametrize("text, scrubbed", PII_CORPUS)
def test_find_pii_names_the_kinds_and_nothing_is_left_after_scrubbing(text, scrubbed):
    assert find_pii(text) == [kind for kind, p in PLACEHOLDERS.items() if p in scrubbed]
    assert find_pii(scrubbed) == []
    assert scrub_text(scrubbed) == (scrubbed, {})


def test_placeholders_are_exactly_the_five_kinds():
    assert PLACEHOLDERS == {
        "email": "<EMAIL>",
        "phone": "<PHONE>",
        "card": "<CARD>",
        "ip": "<IP>",
        "secret": "<SECRET>",
    }


def test_none_passes_through():
    assert scrub_text(None) == (None, {})
    assert find_pii(None) == []


def test_counts_add_up_per_kind():
    text = "a@x.io b@y.io 555-123-4567 and Bearer abc123def456ghi789"
    assert scrub_text(text) == ("<EMAIL> <EMAIL> <PHONE> and Bearer <SECRET>", {"email": 2, "phone": 1, "secret": 1})


@pytest.mark.parametrize(
    "digits, valid",
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),
        ("79927398710", False),
        ("378282246310005", True),
    ],
)
def test_luhn_valid(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize("text", ["a" * 100_000, "1-" * 50_000, "a." * 50_000 + "@", "+1 " * 30_000, "api_key" * 10_000])
def test_adversarial_long_inputs_finish_unchanged(text):
    # Catastrophic backtracking would hang here rather than fail, which is still a failure.
    assert scrub_text(text) == (text, {})


def test_scrub_messages_scrubs_content_and_tool_arguments_without_mutating_input():
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Email jane@example.com my card 4111 1111 1111 1111"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "send_email", "arguments": '{"to": "jane@example.com", "api_key": "abc123"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sent from 10.0.0.7"},
    ]
    original = copy.deepcopy(messages)

    scrubbed, counts = scrub_messages(messages)

    assert messages == original
    assert scrubbed == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Email <EMAIL> my card <CARD>"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "send_email", "arguments": '{"to": "<EMAIL>", "api_key": "<SECRET>"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sent from <IP>"},
    ]
    assert counts == {"email": 2, "card": 1, "secret": 1, "ip": 1}


def test_scrub_messages_of_nothing():
    assert scrub_messages([]) == ([], {})


def test_tool_arguments_stay_valid_json_with_pii_after_escaped_newlines():
    arguments = json.dumps({
        "body": f"Hi,\nann@example.com\n555-123-4567\n4111111111111111\n10.0.0.1\n{OPENAI_KEY}",
        "password": 'quote " and backslash \\ inside',
        "key": "-----BEGIN " + "PRIVATE KEY-----\nMIIEvQIBADAN\n",
    })
    call = {"id": "c", "type": "function", "function": {"name": "send", "arguments": arguments}}

    scrubbed, counts = scrub_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])

    assert json.loads(scrubbed[0]["tool_calls"][0]["function"]["arguments"]) == {
        "body": "Hi,\n<EMAIL>\n<PHONE>\n<CARD>\n<IP>\n<SECRET>",
        "password": "<SECRET>",
        "key": "<SECRET>",
    }
    assert counts == {"secret": 3, "email": 1, "phone": 1, "card": 1, "ip": 1}


def test_find_pii_sees_through_stored_message_json_and_passes_scrubbed_json():
    # The blocking check reads messages_json, where tool arguments are JSON inside JSON.
    messages = [
        {"role": "user", "content": "reach me:\nann@example.com or\n+44 20 7946 0958"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "pay", "arguments": json.dumps({"card": "4111 1111 1111 1111", "api_key": "abc123", "ip": "10.0.0.1"})}}]},
    ]
    assert find_pii(json.dumps(messages, ensure_ascii=False)) == ["email", "phone", "card", "ip", "secret"]
    scrubbed, _ = scrub_messages(messages)
    assert find_pii(json.dumps(scrubbed, ensure_ascii=False)) == []


def test_the_one_pass_gates_let_every_rules_hint_through():
    # the gates skip a text holding no hint: a hint they missed would skip its rule unseen
    for rule in _RULES:
        for hint in rule.text_hints:
            assert _ANY_TEXT_HINT.search(f"a {hint} b"), hint
        for hint in rule.shape_hints:
            assert _ANY_SHAPE_HINT.search(b"a " + hint + b" b"), hint
    assert scrub_text("call 555-123-4567 now") == ("call <PHONE> now", {"phone": 1})


def test_the_batch_gate_flags_every_conversation_a_rule_could_change():
    # skipped conversations are never scrubbed: the batch gate may flag more than the rules
    # change, never less; here every PII example and every hint, also as tool-call arguments
    texts = [text for text, _ in PII_CORPUS] + [f"a {hint} b" for rule in _RULES for hint in rule.text_hints] \
        + [f"a {hint.decode().replace('9', '7').upper()} b" for rule in _RULES for hint in rule.shape_hints]
    as_content = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": text}] for text in texts]
    as_arguments = [[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": text}}]}] for text in texts]
    assert may_need_scrubbing(as_content) == [True] * len(texts)
    assert may_need_scrubbing(as_arguments) == [True] * len(texts)
    clean = [[{"role": "user", "content": text}] for text in CLEAN_CORPUS]
    flagged = may_need_scrubbing(clean)
    # what it lets pass, scrubbing leaves as it is
    assert all(scrub_messages(messages)[1] == {} for messages, check in zip(clean, flagged) if not check)
    assert not all(flagged)
    assert may_need_scrubbing([[{"role": "user", "content": "x \ud800 y"}], [{"role": "user", "content": "w1 w2"}]]) \
        == [True, False]
