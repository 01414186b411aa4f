"""Signed tokens (sending/tokens.py): what they carry, and every way a wrong one is refused."""

from __future__ import annotations

import base64
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign_manager.errors import InvalidInput
from campaign_manager.sending.tokens import TOKEN_LENGTH, BadToken, Purpose, make_token, read_token

SECRET = b"s" * 32
OLD = b"an older secret, kept to check tokens during a rotation"
MAX_ID = 2**48 - 1
ids = st.integers(min_value=0, max_value=MAX_ID)


@given(purpose=st.sampled_from(Purpose), recipient_id=ids, ref_id=ids, seconds=st.integers(0, 2**32 - 1))
def test_round_trip_and_one_size(purpose: Purpose, recipient_id: int, ref_id: int, seconds: int) -> None:
    issued = datetime.fromtimestamp(seconds, UTC)
    token = make_token(SECRET, purpose, recipient_id, ref_id, issued)
    assert len(token) == TOKEN_LENGTH  # whatever the ids' size: a token says nothing by its length
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert read_token(token, purpose, [SECRET]) == (purpose, recipient_id, ref_id, issued)


def test_the_mac_is_hmac_sha256_of_the_payload_truncated_to_128_bits() -> None:
    raw = base64.urlsafe_b64decode(make_token(SECRET, Purpose.UNSUBSCRIBE, 12, 34))
    assert raw[17:] == hmac.digest(SECRET, raw[:17], "sha256")[:16]
    long_secret = b"k" * 100  # longer than SHA-256's block: RFC 2104 hashes it first
    raw = base64.urlsafe_b64decode(make_token(long_secret, Purpose.CONFIRM, 1, 2))
    assert raw[17:] == hmac.digest(long_secret, raw[:17], "sha256")[:16]


def test_issued_now_by_default() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    token = read_token(make_token(SECRET, Purpose.UNDO, 1, 2), Purpose.UNDO, [SECRET])
    assert before <= token.issued_at <= datetime.now(UTC)


def test_every_altered_character_is_refused() -> None:
    token = make_token(SECRET, Purpose.UNSUBSCRIBE, 123, 456)
    for i, char in enumerate(token):
        for other in "AQgw-_09":
            if other != char:
                altered = token[:i] + other + token[i + 1 :]
                with pytest.raises(BadToken):
                    read_token(altered, Purpose.UNSUBSCRIBE, [SECRET])


@pytest.mark.parametrize("made_for", list(Purpose))
def test_a_token_of_one_purpose_is_refused_by_the_others(made_for: Purpose) -> None:
    token = make_token(SECRET, made_for, 1, 2)
    for purpose in Purpose:
        if purpose is made_for:
            assert read_token(token, purpose, [SECRET]).purpose is made_for
        else:
            with pytest.raises(BadToken, match=f"this is a {made_for} token, not {purpose}"):
                read_token(token, purpose, [SECRET])


def test_several_purposes_can_be_accepted_alike() -> None:
    test_token = make_token(SECRET, Purpose.TEST, 1, 2)
    assert read_token(test_token, {Purpose.UNSUBSCRIBE, Purpose.TEST}, [SECRET]).purpose is Purpose.TEST
    with pytest.raises(BadToken):
        read_token(make_token(SECRET, Purpose.UNDO, 1, 2), {Purpose.UNSUBSCRIBE, Purpose.TEST}, [SECRET])


def test_rotation_old_secrets_check_but_never_sign() -> None:
    old_token = make_token(OLD, Purpose.UNSUBSCRIBE, 5, 6)
    assert read_token(old_token, Purpose.UNSUBSCRIBE, [SECRET, OLD]).recipient_id == 5
    with pytest.raises(BadToken, match="signature"):
        read_token(old_token, Purpose.UNSUBSCRIBE, [SECRET])  # the old secret retired: its tokens go with it
    new_token = make_token(SECRET, Purpose.UNSUBSCRIBE, 5, 6)
    assert read_token(new_token, Purpose.UNSUBSCRIBE, [SECRET, OLD]).ref_id == 6
    with pytest.raises(BadToken, match="signature"):
        read_token(new_token, Purpose.UNSUBSCRIBE, [b"another installation's secret"])


def test_max_age() -> None:
    issued = datetime(2030, 1, 1, tzinfo=UTC)
    token = make_token(SECRET, Purpose.CONFIRM, 1, 2, issued)
    now = issued + timedelta(days=7, seconds=1)
    assert read_token(token, Purpose.CONFIRM, [SECRET], max_age=timedelta(days=8), now=now).ref_id == 2
    assert read_token(token, Purpose.CONFIRM, [SECRET], max_age=8 * 86400.0, now=now).ref_id == 2
    with pytest.raises(BadToken, match="the confirm token has expired"):
        read_token(token, Purpose.CONFIRM, [SECRET], max_age=timedelta(days=7), now=now)
    # An unsubscribe token is read without max_age: it never expires.
    old = make_token(SECRET, Purpose.UNSUBSCRIBE, 1, 2, datetime(1971, 1, 1, tzinfo=UTC))
    assert read_token(old, Purpose.UNSUBSCRIBE, [SECRET]).issued_at.year == 1971


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "a" * (TOKEN_LENGTH - 1),
        "a" * (TOKEN_LENGTH + 1),
        "a" * (TOKEN_LENGTH - 1) + "=",
        "+" * TOKEN_LENGTH,  # standard base64's alphabet: a second spelling, refused
        "/" * TOKEN_LENGTH,
        "é" * TOKEN_LENGTH,
        " " + "a" * (TOKEN_LENGTH - 1),
        "a" * (TOKEN_LENGTH - 1) + "\n",
    ],
)
def test_malformed_tokens(bad: str) -> None:
    with pytest.raises(BadToken, match="not a token") as caught:
        read_token(bad, Purpose.UNSUBSCRIBE, [SECRET])
    assert "\n" not in caught.value.message


def test_bad_token_is_invalid_input_on_one_line_without_the_token() -> None:
    token = make_token(b"foreign", Purpose.UNSUBSCRIBE, 1, 2)
    with pytest.raises(InvalidInput) as caught:
        read_token(token, Purpose.UNSUBSCRIBE, [SECRET])
    assert isinstance(caught.value, BadToken)
    assert "\n" not in caught.value.message and token not in caught.value.message


def test_a_token_holds_ids_not_addresses() -> None:
    raw = base64.urlsafe_b64decode(make_token(SECRET, Purpose.UNSUBSCRIBE, 0x010203040506, 0x0A0B0C0D0E0F))
    assert raw[1:7] == bytes([1, 2, 3, 4, 5, 6]) and raw[7:13] == bytes([10, 11, 12, 13, 14, 15])
    assert len(raw) == 33


@pytest.mark.parametrize(("secret", "recipient_id", "ref_id"), [(b"", 1, 1), (SECRET, -1, 1), (SECRET, 1, MAX_ID + 1)])
def test_make_token_refuses_what_it_cannot_sign(secret: bytes, recipient_id: int, ref_id: int) -> None:
    with pytest.raises(ValueError):
        make_token(secret, Purpose.UNSUBSCRIBE, recipient_id, ref_id)


def test_no_secret_checks_nothing() -> None:
    token = make_token(SECRET, Purpose.UNSUBSCRIBE, 1, 2)
    for secrets in ([], [b""]):
        with pytest.raises(ValueError):
            read_token(token, Purpose.UNSUBSCRIBE, secrets)
