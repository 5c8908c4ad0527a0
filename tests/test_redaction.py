"""The redaction rules themselves (policies/redaction.yaml through `Redactor`), no database.

Each drop rule is checked by the marker it leaves, not only by the secret being gone: a rule
that stops matching must fail here even when a broader rule would still hide the secret.
"""

from __future__ import annotations

import json
import secrets

import pytest

from stead.policy.redaction import Redactor, load_policy, luhn_spans, reveal

REDACTOR = Redactor(load_policy())

GITHUB_CLASSIC = "ghp_" + "R8fQ2kLm9ZxW4vT7bN1cY6sH3jD5gA0eU2iO"
GITHUB_FINE = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGH0123456789"
SLACK_BOT = "xoxb-" + "1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx"
SLACK_USER = "xoxp-" + "1234567890-0987654321-1122334455-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def stead_key() -> str:
    """The shape `store.principals.create_key` mints: `stead_<12 hex>_<43 url-safe>`."""
    return f"stead_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def shown(text: str) -> str:
    return str(REDACTOR.view({"note": text}, reveal_masked=True)["note"])


@pytest.mark.parametrize(
    ("rule", "secret", "template"),
    [
        ("github_token", GITHUB_CLASSIC, "push with {} now"),
        ("github_token", GITHUB_FINE, "PAT {}"),
        ("slack_token", SLACK_BOT, "bot token {} in the config"),
        ("slack_token", SLACK_USER, "{}"),
        ("slack_webhook", "https://hooks.slack.com/services/T0001/B0002/XyZ123abc", "hook {}"),
        ("google_api_key", "AIza" + "SyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW", "key={}"),
        ("openai_key", "sk-proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12Mn34", "use {}"),
        ("stripe_key", "sk_live_" + "51HxYzAbCdEfGhIjKlMn", "stripe {}"),
        ("gitlab_token", "glpat-" + "xYz123AbC456dEf789Gh", "{}"),
        ("npm_token", "npm_" + "A" * 18 + "b" * 18, "{}"),
        ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "{}"),
        ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", "aws {} here"),
    ],
)
def test_common_token_formats_are_dropped(rule: str, secret: str, template: str) -> None:
    text = shown(template.format(secret))
    assert secret not in text
    assert f"[redacted:{rule}]" in text


def test_stead_keys_are_dropped_by_their_own_rule() -> None:
    for _ in range(20):  # the secret part is random: some draws start or end with - or _
        key = stead_key()
        text = shown(f"log in with {key} then")
        assert text == "log in with [redacted:stead_key] then", key


def test_bearer_tokens_are_dropped_by_their_own_rule() -> None:
    opaque = secrets.token_urlsafe(24)  # matches no vendor format
    assert shown(f"sent with bearer {opaque} over http") == (
        "sent with [redacted:bearer_token] over http"
    )
    assert shown(f"Authorization: Bearer {opaque}") == "Authorization: [redacted:bearer_token]"
    assert shown(f"BEARER {opaque}") == "[redacted:bearer_token]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my password: hunter2, ok", "my password: [redacted:credential], ok"),
        ("Password=hunter2", "Password=[redacted:credential]"),
        ('{"password": "two words"}', '{"password": [redacted:credential]}'),
        ("the password is swordfish.", "the password is [redacted:spoken_password]"),
        ("?user=bob&token=abc123&page=2", "?user=bob&token=[redacted:credential]&page=2"),
        ("api_key => 'k-1'", "api_key => [redacted:credential]"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic [redacted:credential]"),
        (
            "postgresql://stead:s3cr3t@db/stead",
            "postgresql://stead:[redacted:url_password]@db/stead",
        ),
    ],
)
def test_credentials_in_free_text_are_dropped(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_words_that_only_look_like_credentials_stay() -> None:
    text = "tokens: 1234, max_tokens: 100, input_tokens=5; the token was valid"
    assert shown(text) == text


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111_1111_1111_1111",
        "4111.1111.1111.1111",
        "4111/1111/1111/1111",
        "4111 - 1111 - 1111 - 1111",
        "4111111111111111",
        "3782 822463 10005",  # 15 digits, grouped 4-6-5
        "6011\t0009\t9013\t9424",
    ],
)
def test_card_numbers_are_dropped_with_any_separators(card: str) -> None:
    assert shown(f"paid with {card}.") == "paid with [redacted:card_number]."
    assert shown(f"card{card}x") == "card[redacted:card_number]x"


def test_a_card_is_found_among_other_numbers() -> None:
    assert shown("ref 12 4111 1111 1111 1111 exp 09/27") == (
        "ref 12 [redacted:card_number] exp 09/27"
    )
    # The longest valid stretch from a group wins; the rest of the run is left as it was.
    assert luhn_spans("4111 1111 1111 1111 77") == [(0, 19)]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # fails the Luhn check
        "order 1234567890123",  # 13 digits, fails the check
        "at 2026-11-27T12:30:45.123456+00:00",
        "amounts 1,234.50 and 9,876.25",
        "an id of 40 digits 1234567890123456789012345678901234567890",
    ],
)
def test_numbers_that_are_not_cards_stay(text: str) -> None:
    assert shown(text) == text


def test_field_names_match_whatever_their_case() -> None:
    data = {
        "Password": "p1",
        "API_KEY": "k1",
        "ToKeN": "t1",
        "nested": [{"AUTHORIZATION": "a1"}, {"Card_Number": "c1"}],
        "EMAIL": "bob@example.com",
        "Summary": "private words",
        "Arguments": {"Secret": "s1", "amount": 5},
    }
    visible, private = REDACTOR.apply(data)
    assert visible == {
        "Password": "[redacted]",
        "API_KEY": "[redacted]",
        "ToKeN": "[redacted]",
        "nested": [{"AUTHORIZATION": "[redacted]"}, {"Card_Number": "[redacted]"}],
        "EMAIL": "[masked]",
        "Summary": "[masked]",
        "Arguments": "[masked]",
    }
    # Masked originals are kept (sealed) with the drop rules applied inside them too.
    full = reveal(visible, private)
    assert full["Arguments"] == {"Secret": "[redacted]", "amount": 5}
    assert full["EMAIL"] == "bob@example.com"
    assert "s1" not in json.dumps(private)


def test_tenant_fields_match_whatever_their_case() -> None:
    redactor = Redactor(load_policy().with_fields(drop=["Internal_Ref"], mask=["TICKET_NOTE"]))
    visible, _ = redactor.apply({"INTERNAL_REF": "r-1", "ticket_note": "n", "other": "o"})
    assert visible == {"INTERNAL_REF": "[redacted]", "ticket_note": "[masked]", "other": "o"}


def test_view_keeps_text_as_written_and_masks_unless_revealed() -> None:
    data = {"body": "Hi Bob,\nyour refund is on its way.", "to": "bob@example.com", "n": 3}
    assert REDACTOR.view(data, reveal_masked=True) == data
    assert REDACTOR.view(data, reveal_masked=False) == {
        "body": "[masked]",
        "to": "[masked]",
        "n": 3,
    }
    stored, _ = REDACTOR.apply(data)  # storage neutralizes control characters; a view does not
    assert stored["body"] == "[masked]"
    assert REDACTOR.apply({"x": "a\nb"})[0] == {"x": "a\\x0ab"}


ANTHROPIC_KEY = "sk-ant-api03-Zx9_secretSECRET-0123456789"


def test_masked_originals_are_kept_with_drop_rules_applied() -> None:
    """For storage: masked text and masked fields go to the sealed part, by path, with every
    drop rule applied there too; the visible entry holds only markers."""
    data = {
        "log": ["call bob@example.com", {"deep": f"key {ANTHROPIC_KEY} for alice@example.org"}],
        "comment": ["one", "two 4111 1111 1111 1111"],
        "summary": "",  # nothing to mask
        "n": 3,
    }
    visible, private = REDACTOR.apply(data)
    assert visible == {
        "log": ["call [masked:email]", {"deep": "key [redacted:anthropic_key] for [masked:email]"}],
        "comment": "[masked]",
        "summary": "",
        "n": 3,
    }
    assert private == [
        (["log", 0], "call bob@example.com"),
        (["log", 1, "deep"], "key [redacted:anthropic_key] for alice@example.org"),
        (["comment"], ["one", "two [redacted:card_number]"]),
    ]
    full = reveal(visible, private)
    assert full == {
        "log": [
            "call bob@example.com",
            {"deep": "key [redacted:anthropic_key] for alice@example.org"},
        ],
        "comment": ["one", "two [redacted:card_number]"],
        "summary": "",
        "n": 3,
    }
    assert visible["log"][0] == "call [masked:email]"  # revealing a copy, not the entry
    assert REDACTOR.apply({"plain": "nothing here", "list": ["a", 1]}) == (
        {"plain": "nothing here", "list": ["a", 1]},
        [],
    )


def test_reveal_skips_originals_without_a_place() -> None:
    assert reveal({"a": "[masked]"}, [([], "lost"), (["a"], "found")]) == {"a": "found"}


def test_drop_text_drops_secrets_and_leaves_the_rest_as_written() -> None:
    title = f"Refund for bob@example.com\nkey {ANTHROPIC_KEY}"
    assert REDACTOR.drop_text(title) == ("Refund for bob@example.com\nkey [redacted:anthropic_key]")


def test_tenant_fields_keep_the_file_patterns() -> None:
    redactor = Redactor(load_policy().with_fields(drop=["internal_ref"], mask=[]))
    assert redactor.apply({"x": "paid 4111 1111 1111 1111"})[0] == {
        "x": "paid [redacted:card_number]"
    }


@pytest.mark.parametrize(
    "card",
    [
        "4222222222222",  # 13 digits, the shortest card
        "6221260000000000001",  # 19 digits, the longest
        "5555 5555 5555 4444",  # doubled 5s: 5 * 2 - 9
    ],
)
def test_cards_of_every_length_are_dropped(card: str) -> None:
    assert shown(f"paid with {card}.") == "paid with [redacted:card_number]."


def test_back_to_back_cards_are_both_dropped() -> None:
    assert shown("4111 1111 1111 1111 4242 4242 4242 4242") == (
        "[redacted:card_number] [redacted:card_number]"
    )


def test_only_the_value_of_a_match_is_replaced_mid_text() -> None:
    assert shown("ok then, password: hunter2 and more") == (
        "ok then, password: [redacted:credential] and more"
    )
    # The value is followed by more of the match (the `@`): only the value goes.
    assert shown("dsn is postgres://bob:s3cret@db.example.com:5432/x today") == (
        "dsn is postgres://bob:[redacted:url_password]@db.example.com:5432/x today"
    )
