"""What identifies an address once it is normalized: its key, and the hash a forgotten one leaves behind.

Apart from `addresses` (validation and normalization, which needs email-validator) so that the commands that only
read (`cm group list`, `cm recipient list`) and the consent rules load neither.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class Address(NamedTuple):
    """An address as cm stores it: `email` normalized (`addresses.parse_address` makes one), `key` its email_key."""

    email: str
    key: str


def email_key(normalized: str) -> str:
    """The case-insensitive identity of a normalized address, used for uniqueness."""
    return normalized.lower()


def email_keys(addresses: list[str]) -> list[str]:
    """`email_key` of many addresses at once (an import's batch), normalized or plain as written
    (`addresses.PLAIN_ADDRESS`): the key folds case, and the normalization of a plain address only lowercases its
    domain, so both have the same key."""
    return [address.lower() for address in addresses]


def email_hash(key: str) -> str:
    """What a forgotten address leaves behind (consent.forget): the SHA-256 of its key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
