"""check_email must agree exactly with email-validator: same verdict, same normalized form, same reason.

The fast path in campaign_manager.audience.addresses re-implements a slice of email-validator, so the
property tests below generate many near-miss addresses around the edges of that slice (role names,
special-use and numeric TLDs, hyphens, dots, length limits, Unicode look-alikes) and compare the result
with the library itself, which acts as the oracle.
"""

from __future__ import annotations

import string
from typing import TypeVar

import email_validator
import pytest
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from campaign_manager.audience.address_keys import email_key
from campaign_manager.audience.addresses import PLAIN_ADDRESS, _fast_normalize, check_email, normalize_email
from campaign_manager.errors import InvalidInput

T = TypeVar("T")

# No example database, so every run and machine behaves the same (Hypothesis still keeps caches in the
# git-ignored .hypothesis/). No deadline: the oracle is slow and timing is not what these tests are about.
_SETTINGS = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _oracle(raw: str) -> tuple[str, str | None]:
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized, None
    except EmailNotValidError as exc:
        return "", str(exc)


def _assert_matches_oracle(raw: str) -> None:
    expected = _oracle(raw)
    assert check_email(raw) == expected
    fast = _fast_normalize(raw.strip())
    # Label the examples so `--hypothesis-show-statistics` shows how often the fast path was exercised.
    event("fast path" if fast is not None else ("slow path, valid" if expected[1] is None else "invalid"))
    if fast is not None:
        assert (fast, None) == expected
    address = raw.strip()
    if PLAIN_ADDRESS.fullmatch(address):
        local, _, domain = address.partition("@")
        assert expected == (local + "@" + domain.lower(), None)


# ---------------------------------------------------------------------------------------------- strategies

ROLE_NAMES = sorted(CASE_INSENSITIVE_MAILBOX_NAMES)
SPECIAL_USE = list(email_validator.SPECIAL_USE_DOMAIN_NAMES)
ATEXT_SPECIALS = "!#$%&'*+-/=?^_`{|}~"
# Unicode that is easy to mistake for ASCII or that email-validator maps/folds/rejects: long s and the
# Kelvin sign (case-fold to s/k), dotless i, a combining accent, fullwidth letters/at-sign/full stop,
# ideographic full stop, no-break and zero-width spaces, Cyrillic, German sharp s, an emoji.
UNICODE = "éßøÅſ\u212aıКа\u0301ａＺ＠。．\u3002\u00a0\u200b\u2028😀"
WEIRD = ' "()<>[]\\,;:\t\n\r\x00'

COMMON_LOCAL_CHARS = string.ascii_letters + string.digits + "_%+-='&"
ALNUM = string.ascii_letters + string.digits
PLAIN_TLDS = ["com", "org", "net", "io", "de", "Example", "COM", "Org", "museum", "c", "x" * 63]
TRICKY_TLDS = [
    *["x" * 64, "123", "1", "a1", "1a", "co1", "c-m", "-com", "com-", "xn--p1ai", "XN--P1AI", "xn--zz"],
    *["localhost", "LocalHost", "xlocal", "local1", "localx", "arpa0", "tes", "", "."],
    *SPECIAL_USE,
    *(name.upper() for name in SPECIAL_USE),
    *(name.title() for name in SPECIAL_USE),
]

# All strategies are built once, at import time: building them inside @composite functions on every draw
# costs more than everything else in these tests together.


def _text(alphabet: str, min_size: int, max_size: int) -> st.SearchStrategy[str]:
    # sampled_from (rather than text(alphabet=...)) keeps repeated characters, which weight the odds.
    return st.text(st.sampled_from(alphabet), min_size=min_size, max_size=max_size)


def _mostly(common: st.SearchStrategy[T], *rare: st.SearchStrategy[T], odds: int = 12) -> st.SearchStrategy[T]:
    # `common` with probability (odds - 1) / odds, else one of `rare`. An example makes several such
    # choices, so the rare branches must stay rare for a good share of examples to be valid. (Not
    # st.one_of(common, common, ..., rare): one_of drops repeated alternatives, which makes that 50:50.)
    return st.sampled_from([*[common] * (odds - 1), st.one_of(*rare)]).flatmap(lambda strategy: strategy)


def _mostly_empty(*rare: str, odds: int = 12) -> st.SearchStrategy[str]:
    return st.sampled_from([*[""] * (odds - 1) * len(rare), *rare])


def _lists(elements: st.SearchStrategy[T], min_size: int, max_size: int) -> st.SearchStrategy[list[T]]:
    # Like st.lists, but a fixed number of draws: st.lists makes Hypothesis discard ~25% of its attempts
    # as overruns here, which costs time.
    return st.builds(lambda n, xs: list(xs[:n]), st.integers(min_size, max_size), st.tuples(*[elements] * max_size))


def _mixed_case(text: str, mask: int) -> str:
    return "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(text))


def _random_case(texts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # One integer as a bit mask is much cheaper to generate than a boolean per character.
    return st.builds(_mixed_case, texts, st.integers(0, 2**70))


def _address(local: str, labels: list[str], tld: str) -> str:
    return local + "@" + ".".join([*labels, tld])


# Each atom or label draws from one alphabet: mostly the fast path's own characters (so that many examples
# are valid and exercise the fast path), sometimes the rest of atext, sometimes a sprinkling of characters
# that never belong.
_atoms = _mostly(
    _text(COMMON_LOCAL_CHARS, 1, 10),
    _text(COMMON_LOCAL_CHARS + ATEXT_SPECIALS, 1, 10),
    _text(COMMON_LOCAL_CHARS * 8 + ATEXT_SPECIALS + UNICODE + WEIRD + ".", 1, 10),
    odds=6,
)
_dot_atoms = _lists(_atoms, 1, 3).map(".".join)
_role_locals = st.builds(
    str.__add__,
    _random_case(st.sampled_from(ROLE_NAMES)),
    _mostly_empty("+tag", ".x", "s", "-1", "é", " "),
)
# Around the 64-character local-part limit (which email-validator enforces only in strict mode).
_long_locals = _text("abcXYZ019", 60, 70)
_misdotted_locals = st.sampled_from([".a", "a.", "a..b", ".", "", "a.b.", "..a"])
_local_parts = _mostly(_dot_atoms, _role_locals, _role_locals, _long_locals, _misdotted_locals, odds=3)

_noisy_label = _text(ALNUM * 8 + "-_." + UNICODE + WEIRD, 1, 10)
_labels = _mostly(
    _text(ALNUM * 3 + "-", 1, 10),
    _noisy_label,
    # Around the 63-character label limit.
    _text("ab1-", 61, 65),
    # The R-LDH rule: "ab--c" is rejected, "xn--..." is Punycode, "a--b" is fine.
    st.sampled_from(["ab--c", "xn--bcher-kva", "XN--bcher-kva", "xn--a", "a--b", "a-b", "1-2", ""]),
    odds=8,
)
_plain_tlds = st.sampled_from(PLAIN_TLDS)
_domain_names = st.builds(
    lambda labels, tld, tail: ".".join([*labels, tld]) + tail,
    _mostly(_lists(_labels, 1, 3), st.just([])),
    _mostly(_plain_tlds, st.sampled_from(TRICKY_TLDS), _labels, odds=4),
    _mostly_empty(".", "-", "..", " ", "\n", "@x.com"),
)
_domains = _mostly(
    _domain_names,
    st.sampled_from(["[1.2.3.4]", "[IPv6:::1]", "[ipv6:2001:db8::1]", "[300.1.1.1]", "", "."]),
)
addresses = st.builds(
    lambda prefix, local, domain, suffix: prefix + local + "@" + domain + suffix,
    _mostly_empty(" ", "\t", "\n", "\u3000", '"quoted"', "Name <"),
    _local_parts,
    _domains,
    _mostly_empty(" ", "\n", ">"),
)

# The everyday shape the fast path is for: First.Last123@example.com, Some.One+tag@mail.Example.org.
_word = _text(ALNUM, 1, 10)
plain_addresses = st.builds(
    _address,
    st.builds(
        lambda first, rest: first + "".join(sep + word for sep, word in rest),
        _word,
        _lists(st.tuples(st.sampled_from(".+_-"), _word), 0, 2),
    ),
    _lists(_text(ALNUM, 1, 12), 1, 3),
    st.sampled_from(["com", "org", "net", "de", "io", "Example", "COM", "info", "co", "uk"]),
)


def _apply_edits(address: str, edits: list[tuple[int, int, str]]) -> str:
    for kind, index, char in edits:
        position = index % (len(address) + 1)
        if kind == 0:
            address = address[:position] + char + address[position:]
        elif kind == 1:
            address = address[:position] + char + address[position + 1 :]
        else:
            address = address[:position] + address[position + 1 :]
    return address


# A plausible address with one to three random single-character insertions, replacements or deletions.
_edit = st.tuples(
    st.integers(0, 2), st.integers(0, 80), st.sampled_from(ALNUM + ATEXT_SPECIALS + UNICODE + WEIRD + ".@-")
)
_edits = _lists(_edit, 1, 3)
mutated_addresses = st.builds(_apply_edits, plain_addresses, _edits)

# Addresses whose local part, labels, domain and total length straddle the limits.
length_boundaries = st.builds(
    _address,
    _random_case(st.integers(1, 70).map("a".__mul__)),
    _lists(st.integers(1, 66).map("b".__mul__), 1, 5),
    st.sampled_from(["com", "Org", "c", "x" * 63]),
)


# -------------------------------------------------------------------------------------- property tests


@settings(_SETTINGS, max_examples=10_000)
@given(addresses)
def test_structured_addresses_match_email_validator(raw: str) -> None:
    _assert_matches_oracle(raw)


@settings(_SETTINGS, max_examples=7_000)
@given(mutated_addresses)
def test_mutated_addresses_match_email_validator(raw: str) -> None:
    _assert_matches_oracle(raw)


@settings(_SETTINGS, max_examples=5_000)
@given(_text("abAB09" * 4 + '.@-+_ "<>[]é\u212a\n', 0, 30))
def test_random_text_matches_email_validator(raw: str) -> None:
    _assert_matches_oracle(raw)


@settings(_SETTINGS, max_examples=3_000)
@given(length_boundaries)
def test_length_boundaries_match_email_validator(raw: str) -> None:
    _assert_matches_oracle(raw)


@settings(_SETTINGS, max_examples=2_000)
@given(plain_addresses)
def test_fast_path_takes_plain_addresses(raw: str) -> None:
    # Keeps the properties above from being vacuous: ordinary addresses really do use the fast path.
    assert _fast_normalize(raw) is not None
    assert PLAIN_ADDRESS.fullmatch(raw) is not None or raw.partition("@")[0].lower() in ROLE_NAMES
    _assert_matches_oracle(raw)


# ------------------------------------------------------------------------------------------ known traps


# 254 characters, the most email-validator allows: a 64-character local part and 63-character labels.
_LONGEST = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("First.Last123@Example.com", "First.Last123@example.com"),
        ("Some.One+tag@mail.Example.ORG", "Some.One+tag@mail.example.org"),
        ("  o'brien@Example.com\n", "o'brien@example.com"),
        # RFC 2142 role names are lowercased, but only as the whole local part.
        ("PostMaster@Example.com", "postmaster@example.com"),
        ("ABUSE@example.com", "abuse@example.com"),
        ("Www@example.com", "www@example.com"),
        ("Postmaster+x@example.com", "Postmaster+x@example.com"),
        ("Postmasters@example.com", "Postmasters@example.com"),
        # Special-use names only match whole labels at the end.
        ("a@local.example.com", "a@local.example.com"),
        ("a@foo.xlocal", "a@foo.xlocal"),
        ("a@b.c", "a@b.c"),
        ("a@" + "b" * 63 + ".com", "a@" + "b" * 63 + ".com"),
        (_LONGEST, _LONGEST),
    ],
)
def test_fast_path_examples(raw: str, normalized: str) -> None:
    assert _fast_normalize(raw.strip()) == normalized
    assert check_email(raw) == (normalized, None) == _oracle(raw)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("a@xn--bcher-kva.ch", "a@bücher.ch"),  # Punycode is decoded to Unicode
        ("a@Bücher.ch", "a@bücher.ch"),
        ("Émile@example.com", "Émile@example.com"),
        ("a@a--b.com", "a@a--b.com"),  # "--" is only reserved in the 3rd and 4th position
        ("x" * 65 + "@example.com", "x" * 65 + "@example.com"),  # 64 is enforced only in strict mode
        ('"john"@example.com', None),
        ("a@example.co\u212a", "a@example.cok"),  # Kelvin sign folds to "k": never matched by the regex
        ("a@ſub.example.com", "a@sub.example.com"),
        ("a~b@example.com", "a~b@example.com"),
    ],
)
def test_slow_path_examples(raw: str, normalized: str | None) -> None:
    assert _fast_normalize(raw) is None
    result = check_email(raw)
    assert result == _oracle(raw)
    if normalized is not None:
        assert result == (normalized, None)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "plainaddress",
        "@example.com",
        "a@",
        "a@localhost",
        "a@foo.localhost",
        "a@foo.local",
        "a@foo.LOCAL",
        "a@x.test",
        "a@x.invalid",
        "a@x.y.onion",
        "a@1.168.192.in-addr.arpa",
        "a@example.c1",
        "a@example.123",
        "a@example",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@example..com",
        "a@.example.com",
        "a@example.com.",
        "a@-example.com",
        "a@example-.com",
        "a@ab--c.com",
        "a@" + "b" * 64 + ".com",
        "a@" + ".".join(["b" * 63] * 4),
        _LONGEST[:-4] + "d.com",  # 255 characters
        "a@[192.168.0.1]",
        "a@[IPv6:::1]",
        "a b@example.com",
        "a@b@example.com",
        "a@example.com\nb",
        "Name <a@example.com>",
        "a@example．com\u200b",
    ],
)
def test_rejections(raw: str) -> None:
    assert _fast_normalize(raw.strip()) is None
    normalized, reason = check_email(raw)
    assert normalized == ""
    assert reason
    assert (normalized, reason) == _oracle(raw)


@pytest.mark.parametrize("name", SPECIAL_USE)
def test_every_special_use_domain_is_rejected(name: str) -> None:
    for raw in (f"a@mail.{name}", f"a@mail.{name.upper()}", f"a@{name}.{name}"):
        assert _fast_normalize(raw) is None
        assert check_email(raw) == _oracle(raw)
        assert check_email(raw)[1] is not None


@pytest.mark.parametrize("name", ROLE_NAMES)
def test_every_role_name_is_lowercased(name: str) -> None:
    raw = name.upper() + "@Example.com"
    assert check_email(raw) == (name + "@example.com", None) == _oracle(raw)


# ----------------------------------------------------------------------------------------------- helpers


def test_normalize_email() -> None:
    assert normalize_email(" Some.One@Example.COM ") == "Some.One@example.com"
    with pytest.raises(InvalidInput) as info:
        normalize_email("a@localhost")
    reason = _oracle("a@localhost")[1]
    assert str(info.value) == f"invalid email 'a@localhost': {reason}"


def test_email_key_is_case_insensitive() -> None:
    assert email_key("Some.One@example.com") == email_key("some.one@example.com") == "some.one@example.com"
