"""Signed tokens for the links in messages and on public pages: who (a recipient id), about what (a campaign or a
sign-up id), why (the purpose) and when (the issue time), with an HMAC so that nobody can forge or alter one.

A token is 33 bytes, base64url without padding: 44 characters, the same length for every token (no id's size shows):

    byte 0        version (high 4 bits, now 1) and purpose code (low 4 bits)
    bytes 1-6     recipient id, unsigned big-endian (48 bits)
    bytes 7-12    campaign or sign-up id, the same
    bytes 13-16   issue time, Unix seconds, unsigned big-endian (good until 2106)
    bytes 17-32   HMAC-SHA256(secret, bytes 0-16), its first 16 bytes (128 bits)

It carries ids, never an address. 33 bytes encode to 44 characters exactly, with no spare bits, so each token has
exactly one spelling: a token can be looked up or compared as a string. The purpose is signed with the rest, so a
token made for one purpose is refused where another is expected. Several secrets may check tokens (the first signs,
the others are old ones kept during a rotation); the MAC is compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

from campaign_manager.errors import InvalidInput

VERSION = 1
MAC_BYTES = 16
TOKEN_LENGTH = 44  # characters
_PAYLOAD = struct.Struct(">BHIHII")  # version|purpose, recipient id (16 + 32 bits), ref id (the same), issue time
_MAX_ID = (1 << 48) - 1
_MAX_TIME = (1 << 32) - 1
_BLOCK = 64  # SHA-256's block size, in bytes
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_pads: dict[bytes, tuple[hashlib._Hash, hashlib._Hash]] = {}
_SHAPE = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


class Purpose(StrEnum):
    """What a token lets its bearer do. `code` is the purpose on the wire: never renumber one."""

    code: int

    def __new__(cls, value: str, code: int) -> Purpose:
        member = str.__new__(cls, value)
        member._value_ = value
        member.code = code  # an attribute, not a dict lookup: an Enum's hash is Python code (0.3 us)
        return member

    UNSUBSCRIBE = "unsubscribe", 1  # the List-Unsubscribe links and `unsubscribe_url` of a real send
    TEST = "test", 2  # the same links in a `--test-to` copy: they change nothing
    CONFIRM = "confirm", 3  # a double opt-in confirmation
    UNDO = "undo", 4  # re-subscribing right after an unsubscribe


_PURPOSES: dict[int, Purpose] = {purpose.code: purpose for purpose in Purpose}


class Token(NamedTuple):
    purpose: Purpose
    recipient_id: int
    ref_id: int  # the campaign (unsubscribe, test) or the sign-up (confirm, undo)
    issued_at: datetime  # UTC, to the second


class BadToken(InvalidInput):
    """A token that is malformed, altered, signed by another secret, of another purpose, or too old."""


def make_token(
    secret: bytes, purpose: Purpose, recipient_id: int, ref_id: int, issued_at: datetime | None = None
) -> str:
    """A token for `purpose`, signed with `secret`; issued now unless `issued_at` says otherwise."""
    if not secret:
        raise ValueError("an empty secret signs nothing")
    if not (0 <= recipient_id <= _MAX_ID and 0 <= ref_id <= _MAX_ID):
        raise ValueError("token ids must be between 0 and 2**48 - 1")
    seconds = int(time.time() if issued_at is None else issued_at.timestamp())
    if not 0 <= seconds <= _MAX_TIME:
        raise ValueError("a token's issue time must be between 1970 and 2106")
    payload = _PAYLOAD.pack(
        (VERSION << 4) | purpose.code,
        recipient_id >> 32,
        recipient_id & 0xFFFFFFFF,
        ref_id >> 32,
        ref_id & 0xFFFFFFFF,
        seconds,
    )
    return base64.urlsafe_b64encode(payload + _mac(secret, payload)).decode("ascii")


def read_token(
    token: str,
    purpose: Purpose | Collection[Purpose],
    secrets: Sequence[bytes],
    *,
    max_age: timedelta | float | None = None,
    now: datetime | None = None,
) -> Token:
    """The token's contents, once it is shown to be signed by one of `secrets` for `purpose` (one purpose, or
    several a caller accepts alike: the unsubscribe page takes `test` tokens too and does nothing with them).
    `max_age` (a timedelta or seconds) refuses a token issued longer ago than that. Raises `BadToken`, whose one-line
    message says which check failed (malformed, signature, purpose, expired) and never echoes the token."""
    if not secrets or not all(secrets):
        raise ValueError("no secret to check tokens with")
    raw = _decode(token)
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    # Every secret is tried, whichever matches, so the time taken does not say which one did.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(_mac(secret, payload), mac)
    if not matched:
        raise BadToken("the token's signature does not match (altered, or made by another installation)")
    header, rid_high, rid_low, ref_high, ref_low, seconds = _PAYLOAD.unpack(payload)
    found = _PURPOSES.get(header & 0x0F)
    if header >> 4 != VERSION or found is None:
        raise BadToken("the token is of an unknown version or purpose")
    wanted = {purpose} if isinstance(purpose, Purpose) else set(purpose)
    if found not in wanted:
        raise BadToken(f"this is a {found} token, not {' or '.join(sorted(wanted))}")
    issued = datetime.fromtimestamp(seconds, UTC)
    if max_age is not None:
        limit = max_age if isinstance(max_age, timedelta) else timedelta(seconds=max_age)
        if (now or datetime.now(UTC)) - issued > limit:
            raise BadToken(f"the {found} token has expired")
    return Token(found, (rid_high << 32) | rid_low, (ref_high << 32) | ref_low, issued)


def _mac(secret: bytes, payload: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of `payload`, truncated. Written out rather than `hmac.digest`, which sets up its keys
    again on every call (4.5 us here): the keyed inner and outer hashes are made once a secret and copied (1.9 us).
    A test checks it against `hmac.digest`."""
    pads = _pads.get(secret)
    if pads is None:
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\0")
        pads = (hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD)))
        if len(_pads) >= 64:  # a few secrets are ever live; never grow without bound
            _pads.clear()
        _pads[secret] = pads
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(payload)
    outer.update(inner.digest())
    return outer.digest()[:MAC_BYTES]


def _decode(token: str) -> bytes:
    # The pattern, not b64decode(validate=True), decides: that would also take '+' and '/', a second spelling.
    if not isinstance(token, str) or _SHAPE.fullmatch(token) is None:
        raise BadToken(f"not a token (a token is {TOKEN_LENGTH} letters, digits, '-' and '_')")
    return base64.urlsafe_b64decode(token)
