"""The pieces of an RFC 5322 message, written directly rather than through `email.message.EmailMessage` (~950 us a
message, against a few here): header values encoded (RFC 2047) only when they must be, and folded; bodies in a
transfer encoding that passes 7-bit SMTP (quoted-printable, or base64 when that is smaller); CRLF line endings.

tests/test_render.py parses what these make with the stdlib's parser (policy.default) and checks that every value
comes back as it went in.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import idna

# Characters that end a line for one reader or another (str.splitlines' list): never in a header value from data.
LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# A display name that can stand unquoted: atoms (RFC 5322's atext) separated by single spaces.
_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# An unstructured value that can stand as it is: printable ASCII, no leading or trailing space.
_PLAIN_TEXT = re.compile(r"[!-~](?:[ -~]*[!-~])?")
_BLANKS = re.compile("[ \t]+")
_WORD_BYTES = 45  # UTF-8 bytes per encoded word: 60 base64 characters, a 72-character word (RFC 2047: at most 75)
_LINE = 78  # RFC 5322's recommended line length (998 is the limit)
_HIGH_BYTES = bytes(range(128, 256))
_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)


def encode_words(text: str) -> str:
    """`text` as RFC 2047 encoded words (UTF-8, base64), folded one word a line. Each word holds whole characters:
    a multi-byte character is never split between two words (RFC 2047, section 5)."""
    data = text.encode("utf-8")
    if len(data) <= _WORD_BYTES:
        return f"=?utf-8?b?{binascii.b2a_base64(data, newline=False).decode('ascii')}?="
    words = []
    start = 0
    while start < len(data):
        end = min(start + _WORD_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # back off a continuation byte
            end -= 1
        words.append(f"=?utf-8?b?{binascii.b2a_base64(data[start:end], newline=False).decode('ascii')}?=")
        start = end
    return "\r\n ".join(words)


def unstructured(name: str, value: str) -> str:
    """The header line `Name: value` (no CRLF at its end) for free text such as a subject: as it is when it is plain
    ASCII and fits a line, folded at its spaces when it is plain but long, encoded otherwise. `value` must hold no
    line break (the caller refuses those)."""
    if _PLAIN_TEXT.fullmatch(value) and "=?" not in value:
        line = f"{name}: {value}"
        if len(line) <= _LINE:
            return line
        folded = _fold(name, value)
        if folded is not None:
            return folded
    if not value:
        return f"{name}: "
    return f"{name}: {encode_words(value)}"


def _fold(name: str, value: str) -> str | None:
    """`Name: value` folded before spaces so that each line is at most 78 characters where a word allows it; None
    when a word is too long for even the 998-character limit (the caller encodes instead). The first word stays on
    the first line: a fold right after the colon would add a space to the value."""
    pieces = re.findall(r" *[^ ]+", value)
    lines = [f"{name}: {pieces[0]}"]
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) > _LINE:
            lines.append(piece)
        else:
            lines[-1] += piece
    if max(map(len, lines)) > 998:
        return None
    return "\r\n".join(lines)


def ascii_address(address: str) -> str:
    """`address` for a header: its domain in IDNA (punycode) when the local part is ASCII, so that the message stays
    7-bit; an address with a non-ASCII local part stays UTF-8 (it needs SMTPUTF8 whatever is done)."""
    if address.isascii():
        return address
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return address
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return address


def mailbox(name: str, address: str) -> str:
    """A mailbox for From or To: `address` alone, or `name <address>` with the name as atoms, a quoted string or
    encoded words, whichever it needs. `name` must hold no line break (the caller refuses those). Its runs of spaces
    and tabs are written as one space, and none around it: readers of a structured header read them so anyway."""
    address = ascii_address(address)
    if "  " in name or "\t" in name or name[:1] == " " or name[-1:] == " ":
        name = _BLANKS.sub(" ", name).strip(" ")
    if not name:
        return address
    if len(name) <= 200 and _ATOM_PHRASE.fullmatch(name) and "=?" not in name:
        phrase = name
    elif len(name) <= 200 and _PLAIN_TEXT.fullmatch(name) and "=?" not in name:
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        phrase = encode_words(name)
    last_line = phrase.rsplit("\n", 1)[-1]
    # 9: "From: " and " <>" around them, so that the line keeps within 78 characters where it can.
    separator = " " if len(last_line) + len(address) + 9 <= _LINE else "\r\n "
    return f"{phrase}{separator}<{address}>"


def body_part(subtype: str, text: str) -> bytes:
    """A text part's Content-Type and Content-Transfer-Encoding lines, the blank line and the encoded `text` (LF
    line endings) in quoted-printable, or base64 when that is smaller (text mostly outside ASCII); CRLF line
    endings. It ends with CRLF whatever the text ends with: a quoted-printable soft line break adds nothing."""
    data = text.encode("utf-8")
    if not data:
        return _PART_HEADERS[subtype, "7bit"]
    high = 0 if data.isascii() else len(data) - len(data.translate(None, _HIGH_BYTES))
    # Quoted-printable writes a byte outside ASCII in 3 characters, base64 every byte in 4/3.
    if high * 6 < len(data):
        encoded = binascii.b2a_qp(data, quotetabs=False, istext=True).replace(b"\n", b"\r\n")
        if not encoded.endswith(b"\r\n"):
            encoded += b"=\r\n"
        if b"From " in encoded:  # mbox-minded relays turn a line's "From " into ">From ": give them none
            encoded = _FROM_LINE.sub(b"=46rom ", encoded)
        return _PART_HEADERS[subtype, "quoted-printable"] + encoded
    return _PART_HEADERS[subtype, "base64"] + base64.encodebytes(data).replace(b"\n", b"\r\n")


_PART_HEADERS = {
    (subtype, encoding): (
        f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii")
    for subtype in ("plain", "html")
    for encoding in ("7bit", "quoted-printable", "base64")
}


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR as LF: the bodies' line endings, whatever a template or its data used."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


class DateHeader:
    """The Date header's value (UTC), made once a second rather than once a message."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, format_datetime(datetime.fromtimestamp(second, UTC))
        return self._value
