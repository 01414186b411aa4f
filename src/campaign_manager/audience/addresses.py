"""Email address validation and normalization.

email-validator is the single source of truth for what a valid address is and how it is normalized, but it
costs ~30 µs per address (it walks the string character by character, with Unicode normalization at every
position), which caps bulk imports near 35,000 rows/s. Almost every real address is plain ASCII of one
shape, so `_fast_normalize` recognizes that shape with one precompiled regex and normalizes it the way
email-validator would. Anything it is not certain about goes to email-validator, which also produces the
reason text for invalid addresses. tests/test_emails.py checks with property-based tests that the result is
identical to email-validator's.

An address's key and hash (what identifies it once normalized) are in `address_keys`, which needs none of this.
"""

from __future__ import annotations

import re

import email_validator
from email_validator import EmailNotValidError, validate_email

# RFC 2142 role mailboxes ("Postmaster", "ABUSE", ...) are normalized to lowercase by email-validator when
# they are the whole local part. Taken from the library so the two lists cannot drift apart. (It lives in
# a submodule, not in the package's public names; if a release moves it, this import fails loudly at
# startup instead of silently normalizing differently.)
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from campaign_manager.audience.address_keys import Address, email_key
from campaign_manager.errors import InvalidInput

_ROLE_NAMES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
_MAX_ROLE_NAME_LENGTH = max(map(len, _ROLE_NAMES))

# email-validator rejects special-use domains (localhost, *.local, *.test, *.invalid, *.onion, *.arpa, ...)
# and their subdomains. Snapshot its public list at import time; as a suffix tuple `str.endswith` does the
# check in C. (Entries are compared as the library does, without case folding; the library lowercases the
# domain first, and so do we.)
_SPECIAL_USE_SUFFIXES = tuple("." + name for name in email_validator.SPECIAL_USE_DOMAIN_NAMES)

# RFC 5321 limits as enforced by email-validator. Since 2.3 it checks the 64-character local-part limit
# only in its "strict" mode (2.2 always did), so longer local parts are left to the slow path to decide.
_MAX_ADDRESS_LENGTH = 254
_MAX_LOCAL_LENGTH = 64

# The common shape, deliberately narrower than what is valid:
# - local part: dot-atoms of letters, digits and the usual `_ % + - = ' &` (no leading, trailing or
#   doubled dots); the rarer RFC 5322 atext characters, quoting and Unicode take the slow path;
# - domain: at least two labels; each label is letters/digits joined by single hyphens, so it can neither
#   start nor end with a hyphen nor contain "--" anywhere (which sidesteps the R-LDH rule for "ab--"
#   labels and all Punycode "xn--" labels, which email-validator decodes to Unicode); at most 63
#   characters, enforced by the negative lookahead (a run of 64 LDH characters cannot be a valid label);
# - TLD: 1-63 letters only (email-validator merely requires the last character to be a letter).
# re.ASCII and explicit ranges instead of re.IGNORECASE: with Unicode matching, [a-z] under IGNORECASE
# also matches "ſ" (U+017F) and the Kelvin sign (U+212A), which email-validator folds to "s" and "k".
# Used with fullmatch, never `$`, which would also match before a trailing newline.
_LOCAL_ATOM = r"[A-Za-z0-9_%+=&'-]+"
_LABEL = r"(?![A-Za-z0-9-]{64})[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"
_FAST_ADDRESS = re.compile(
    rf"(?P<local>{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*)@(?P<domain>(?:{_LABEL}\.)+[A-Za-z]{{1,63}})",
    re.ASCII,
)


# The same shape with every remaining condition folded into the pattern, for bulk imports that test a whole batch
# with map() and leave the lowercasing of the domain to SQL: an already stripped address that this fullmatches is
# valid, and email-validator normalizes it to local + "@" + domain.lower(). Length limits and the exclusions
# are lookaheads; (?i:...) stays ASCII-only under re.ASCII.
_ROLES = "|".join(sorted(_ROLE_NAMES))
_SPECIAL_TLDS = "|".join(sorted({name.rsplit(".", 1)[-1] for name in email_validator.SPECIAL_USE_DOMAIN_NAMES}))
PLAIN_ADDRESS = re.compile(
    rf"(?=[^@]{{1,{_MAX_LOCAL_LENGTH}}}@)(?=.{{3,{_MAX_ADDRESS_LENGTH}}}\Z)(?!(?i:{_ROLES})@)"
    rf"{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*@(?:{_LABEL}\.)+(?!(?i:{_SPECIAL_TLDS})\Z)[A-Za-z]{{1,63}}",
    re.ASCII,
)


def _fast_normalize(address: str) -> str | None:
    """Normalize an already stripped, plain ASCII address exactly as email-validator would.

    Returns None whenever the address is not of the common shape, or could be invalid, or could be
    normalized differently; the caller must then ask email-validator.
    """
    # The length check comes first so the regex never scans absurdly long input.
    if len(address) > _MAX_ADDRESS_LENGTH:
        return None
    match = _FAST_ADDRESS.fullmatch(address)
    if match is None:
        return None
    local, domain = match.group("local", "domain")
    if len(local) > _MAX_LOCAL_LENGTH:
        return None
    # email-validator lowercases the domain (UTS-46 mapping, which for ASCII letters/digits/hyphens/dots is
    # just lowercasing) and keeps the local part's case.
    domain = domain.lower()
    if ("." + domain).endswith(_SPECIAL_USE_SUFFIXES):
        return None
    if len(local) <= _MAX_ROLE_NAME_LENGTH and local.lower() in _ROLE_NAMES:
        local = local.lower()
    return local + "@" + domain


def check_email(raw: str) -> tuple[str, str | None]:
    """Validate and normalize one address: (normalized, None) when valid, ("", reason) when not.

    `raw` is stripped of surrounding whitespace first. No DNS lookups. The result is exactly
    email_validator.validate_email(raw.strip(), check_deliverability=False).normalized, and the reason is
    str() of its EmailNotValidError.
    """
    address = raw.strip()
    normalized = _fast_normalize(address)
    if normalized is not None:
        return normalized, None
    try:
        return validate_email(address, check_deliverability=False).normalized, None
    except EmailNotValidError as exc:
        return "", str(exc)


def sql_plain_normalized(column: str, find: str) -> str:
    """The normalization of a plain address (one PLAIN_ADDRESS fullmatches) as a SQL expression over `column`:
    email-validator's result for it is the address with its domain lowercased. `find` is the database's
    position-of-substring function (`instr` on SQLite, `strpos` on PostgreSQL)."""
    at = f"{find}({column}, '@')"
    return f"substr({column}, 1, {at}) || lower(substr({column}, {at} + 1))"


def normalize_email(raw: str) -> str:
    """Like check_email, but raises InvalidInput with the reason when the address is invalid."""
    normalized, reason = check_email(raw)
    if reason is not None:
        raise InvalidInput(f"invalid email {raw.strip()!r}: {reason}")
    return normalized


def parse_address(raw: str) -> Address:
    """`raw` normalized (normalize_email, which raises InvalidInput with the reason) and keyed."""
    normalized = normalize_email(raw)
    return Address(normalized, email_key(normalized))
