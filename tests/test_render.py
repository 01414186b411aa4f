"""Rendering messages (sending/render.py, templates.py, mime.py): every message parses back with the stdlib's own
parser to exactly what was rendered; the sandbox, the escaping, the limits and the List-Unsubscribe headers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import compat32
from email.policy import default as default_policy
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from markupsafe import escape

from campaign_manager.errors import InvalidInput
from campaign_manager.notifiers import Message
from campaign_manager.sections import UnsubscribeSettings
from campaign_manager.sending.render import Renderer, Target
from campaign_manager.sending.tokens import BadToken, Purpose, read_token
from campaign_manager.tables.sending import Campaign

SECRET = b"render-test-secret-0123456789abcdef"
BOTH = UnsubscribeSettings(mailto="unsubscribe@example.com", url="https://example.com/u/{token}")
ANN = Target(delivery_id=41, recipient_id=9, email="ann@example.com", name="Ann Lee", attributes={"city": "Oslo"})
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def campaign(subject: str = "Hello {{ name }}", text: str = "Hi {{ name }}\n", html: str | None = None) -> Campaign:
    return Campaign(id=7, title="May <news>", subject=subject, body_text=text, body_html=html)


def renderer(c: Campaign | None = None, **options: Any) -> Renderer:
    settings: dict[str, Any] = {
        "from_header": "News <news@example.com>",
        "database_id": "db1",
        "secrets": [SECRET],
        "unsubscribe": BOTH,
        "max_message_bytes": 1_000_000,
    }
    settings.update(options)
    return Renderer(c or campaign(), **settings)


def parse(message: Message) -> EmailMessage:
    parsed = BytesParser(policy=default_policy).parsebytes(message.data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body(parsed: EmailMessage, subtype: str) -> str:
    part = parsed.get_body((subtype,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def display_name(message: Message, header: str) -> str:
    """The display name of the one address in `header`. Python 3.11's parser keeps the folding space between two
    adjacent encoded words of a display name (CPython gh-128110, fixed in later versions), although RFC 2047 (6.2)
    says to drop it, as it does itself in a Subject: a name long enough for two encoded words is decoded with the
    older `email.header` API, which follows the RFC. Shorter names are the parser's."""
    raw = str(message_from_bytes(message.data, policy=compat32)[header])
    phrase = raw.rpartition("<")[0].strip()
    if phrase.startswith("=?") and "?=\r\n =?" in phrase:
        return str(make_header(decode_header(phrase)))
    [address] = cast(Any, parse(message)[header]).addresses
    return str(address.display_name)


def newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_wire_format(message: Message) -> None:
    """CRLF line endings only, lines of at most 998 characters, 7-bit (the addresses here are ASCII), no NUL."""
    lines = message.data.split(b"\r\n")
    assert b"\r" not in message.data.replace(b"\r\n", b"") and b"\n" not in message.data.replace(b"\r\n", b"")
    assert max(map(len, lines)) <= 998
    assert message.data.isascii() and b"\0" not in message.data
    assert message.data.endswith(b"\r\n")
    assert not re.search(rb"^From ", message.data.partition(b"\r\n\r\n")[2], re.MULTILINE)


# --- Round trips over generated recipients --------------------------------------------------------------------

# Text without line breaks (header values) and text with any mix of them (bodies); no surrogates (hypothesis's
# default alphabet leaves them out: they cannot be sent as UTF-8 at all).
one_line = st.text(st.characters(blacklist_characters=LINE_BREAKS, blacklist_categories=("Cs",)), max_size=120)
edge_words = st.sampled_from(
    ["", " ", "  ", "\t", ".", "..", "=", "=?utf-8?b?QQ==?=", "From ", "é", "€", "😀", "a" * 80]
)
header_text = st.lists(st.one_of(one_line, edge_words, st.text("ab ", max_size=1100)), max_size=4).map("".join)
body_text = st.lists(
    st.one_of(
        st.text(max_size=200),
        st.sampled_from(["\r\n", "\n", "\r", ".\n", "\n.", "\n..\n", "x" * 300, " \n", "\t\n", "=\n", "Ж" * 100]),
    ),
    max_size=8,
).map("".join)
emails = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}@[a-z0-9]{1,10}\.(com|org|example)", fullmatch=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.one_of(st.none(), header_text),
    email=emails,
    title=one_line.filter(str.strip),
    subject=header_text,
    text=body_text,
    html=st.one_of(st.none(), body_text),
    attributes=st.dictionaries(st.sampled_from(["city", "first name", "ünï", "x"]), body_text, max_size=3),
)
@example(  # a long plain subject, folded at its spaces; a long non-ASCII name, in several encoded words
    name="Zoë " * 30,
    email="a@example.com",
    title="t",
    subject="word " * 50 + "end",
    text=".\n..\r\n.x\rFrom here\n" + "long " * 100 + "\n \n\t\n=",
    html="<p>" + "x" * 2000 + "</p>",
    attributes={},
)
@example(  # a word too long for one line: encoded; leading and trailing spaces; text that looks encoded
    name='"Lee, Ann" \\ =?utf-8?b?QQ==?=',
    email="a@example.com",
    title="t",
    subject=" " + "x" * 1200 + " =?utf-8?b?QQ==?= ",
    text="Ж" * 3000,
    html="",
    attributes={"city": "<Oslo>"},
)
def test_every_message_parses_back_as_rendered(
    name: str | None,
    email: str,
    title: str,
    subject: str,
    text: str,
    html: str | None,
    attributes: dict[str, str],
) -> None:
    c = Campaign(
        id=3,
        title=title,
        subject="{{ recipient.attributes.subject }}",
        body_text="{{ campaign.title }}|{{ body }}|{{ name }}",
        body_html=None if html is None else "<p>{{ recipient.attributes.html }}</p>{{ body }}",
    )
    target = Target(1, 2, email, name, None, {**attributes, "subject": subject, "body": text, "html": html})
    message = renderer(c).render(target)
    check_wire_format(message)
    parsed = parse(message)
    assert not parsed.defects
    assert parsed["Subject"] == subject == message.subject
    [to] = cast(Any, parsed["To"]).addresses
    # Runs of spaces and tabs in a display name read as one space (RFC 5322, 3.2.2), which is what is sent.
    assert (display_name(message, "To"), to.addr_spec) == (re.sub(r"[ \t]+", " ", name or "").strip(" "), email)
    [sender] = cast(Any, parsed["From"]).addresses
    assert (sender.display_name, sender.addr_spec) == ("News", "news@example.com")
    # The decoded bodies are the templates' output (line endings as LF: the wire has CRLF, whatever the data had).
    expected_text = newlines(f"{title}|{text}|{name or ''}")
    assert body(parsed, "plain") == expected_text == message.text
    if html is None:
        assert parsed.get_content_type() == "text/plain" and message.html is None
    else:
        assert parsed.get_content_type() == "multipart/alternative"
        expected_html = newlines(f"<p>{escape(html)}</p>{escape(text)}")
        assert body(parsed, "html") == expected_html == message.html
    assert parsed["Message-ID"] == message.message_id


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("plain ASCII\n", "quoted-printable"),
        ("Ein Satz mit ein paar Umlauten, wie es sie im Deutschen gibt: schön, Größe.\n", "quoted-printable"),
        ("Почти всё по-русски, кроме этого.\n" * 20, "base64"),
        ("", "7bit"),
    ],
)
def test_transfer_encoding_follows_the_text(text: str, encoding: str) -> None:
    message = renderer(campaign(text="{{ body }}")).render(ANN._replace(attributes={"body": text}))
    parsed = parse(message)
    assert parsed["Content-Transfer-Encoding"] == encoding
    assert body(parsed, "plain") == text


def test_headers_are_plain_when_they_can_be() -> None:
    message = renderer(campaign(subject="Our May news")).render(ANN)
    head = message.data.split(b"\r\n\r\n")[0].decode()
    assert "\r\nSubject: Our May news\r\n" in head
    assert "\r\nTo: Ann Lee <ann@example.com>\r\n" in head
    assert "\r\nFrom: News <news@example.com>\r\n" in head
    assert "\r\nMIME-Version: 1.0\r\n" in head and re.search(r"^Date: \w{3}, \d", head)
    assert "=?" not in head


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("Lee, Ann", '"Lee, Ann" <ann@example.com>'),
        ('Ann "the" Lee', '"Ann \\"the\\" Lee" <ann@example.com>'),
        ("Zoë", "=?utf-8?b?Wm/Dqw==?= <ann@example.com>"),
        ("", "ann@example.com"),
    ],
)
def test_display_names_are_quoted_or_encoded(name: str, raw: str) -> None:
    message = renderer().render(ANN._replace(name=name))
    assert f"\r\nTo: {raw}\r\n".encode() in message.data
    [to] = cast(Any, parse(message)["To"]).addresses
    assert to.display_name == name


def test_an_international_domain_goes_out_as_punycode() -> None:
    message = renderer(from_header="Café <news@bücher.example>").render(ANN._replace(email="ann@bücher.example"))
    check_wire_format(message)
    parsed = parse(message)
    assert cast(Any, parsed["To"]).addresses[0].domain == "xn--bcher-kva.example"
    assert message.message_id.endswith("@xn--bcher-kva.example>")
    assert str(parsed["From"]) == "Café <news@xn--bcher-kva.example>"
    assert message.to == "ann@bücher.example" and message.envelope_from == "news@bücher.example"


# --- List-Unsubscribe and tokens --------------------------------------------------------------------------------


def _links(message: Message) -> list[str]:
    headers = dict(message.headers)
    return re.findall(r"<([^>]+)>", headers.get("List-Unsubscribe", ""))


def _token(link: str) -> str:
    found = re.search(r"(?:%20|/u/)([A-Za-z0-9_-]{44})", link)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize(
    ("mailto", "url", "one_click"),
    [
        ("unsubscribe@example.com", "", False),
        ("", "https://example.com/u/{token}", True),
        ("unsubscribe@example.com", "https://example.com/u/{token}", True),
        ("", "http://127.0.0.1:8000/u/{token}", False),  # plain http: a link, never one-click
        ("", "", False),
    ],
)
def test_list_unsubscribe(mailto: str, url: str, one_click: bool) -> None:
    c = campaign(text="{{ unsubscribe_url }}")
    message = renderer(c, unsubscribe=UnsubscribeSettings(mailto=mailto, url=url)).render(ANN)
    parsed = parse(message)
    links = _links(message)
    expected = []
    if mailto:
        expected.append(f"mailto:{mailto}?subject=unsubscribe%20")
    if url:
        expected.append(url.replace("{token}", ""))
    assert [link.replace(_token(link), "") for link in links] == expected
    for link in links:
        assert read_token(_token(link), Purpose.UNSUBSCRIBE, [SECRET])[1:3] == (ANN.recipient_id, 7)
    assert ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click") in message.headers if one_click else True
    assert (parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click") is one_click
    assert [name for name, _ in message.headers] == ["List-Unsubscribe"] * bool(links) + [
        "List-Unsubscribe-Post"
    ] * one_click
    if links:
        assert re.sub(r"\s+", " ", str(parsed["List-Unsubscribe"])) == dict(message.headers)["List-Unsubscribe"]
    # unsubscribe_url: the URL when there is one, else the mailto link, else nothing.
    assert message.text == (links[-1] if links else "")


def test_a_test_copy_carries_a_test_token_and_its_own_message_id() -> None:
    r = renderer(test=True)
    first, second = r.render(ANN), r.render(ANN)
    token = _token(_links(first)[0])
    assert read_token(token, Purpose.TEST, [SECRET]).recipient_id == ANN.recipient_id
    with pytest.raises(BadToken):
        read_token(token, Purpose.UNSUBSCRIBE, [SECRET])
    assert first.message_id != second.message_id  # a person sending two tests sees both


def test_rotation_the_first_secret_signs() -> None:
    message = renderer(secrets=[b"new-secret", SECRET]).render(ANN)
    token = _token(_links(message)[0])
    assert read_token(token, Purpose.UNSUBSCRIBE, [b"new-secret"]).ref_id == 7
    with pytest.raises(BadToken):
        read_token(token, Purpose.UNSUBSCRIBE, [SECRET])


def test_message_fields_and_message_id() -> None:
    message = renderer().render(ANN)
    assert message.key == "db1-41"
    assert (message.to, message.sender, message.envelope_from) == (
        "ann@example.com",
        "News <news@example.com>",
        "news@example.com",
    )
    assert re.fullmatch(r"<db1-41\.[\w.-]+@example\.com>", message.message_id)
    # Stable for a key: a retry, in another process with a new Renderer, sends the same Message-ID.
    assert renderer().render(ANN).message_id == message.message_id
    assert renderer().render(ANN._replace(delivery_id=42)).message_id != message.message_id
    other_campaign = Campaign(id=8, title="t", subject="s", body_text="t")
    assert renderer(other_campaign).render(ANN).message_id != message.message_id


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"from_header": "not an address"}, "not one email address"),
        ({"from_header": "a@example.com, b@example.com"}, "not one email address"),
        ({"from_header": "News <news@example.com>\r\nBcc: x@example.com"}, "line break"),
        ({"unsubscribe": UnsubscribeSettings(url="https://example.com/u/")}, "has no {token}"),
        ({"unsubscribe": UnsubscribeSettings(url="https://example.com/u/{token} x")}, "not an http"),
        ({"unsubscribe": UnsubscribeSettings(url="javascript:x({token})")}, "not an http"),
        ({"unsubscribe": UnsubscribeSettings(mailto="Unsub <u@example.com>")}, "not a plain email address"),
        ({"unsubscribe": UnsubscribeSettings(mailto="u@example.com?cc=x@example.com")}, "not a plain email"),
    ],
)
def test_settings_that_cannot_make_a_message(options: Mapping[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        renderer(**options)
