"""CSV files as people really have them: sniffed delimiter, any common spelling of the email header, BOM, CRLF,
quoted fields with embedded newlines and delimiters, blank lines. Streams; never holds the file in memory."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, islice
from typing import IO

from campaign_manager.errors import InvalidInput

DELIMITERS = (",", ";", "\t", "|")
DEFAULT_ENCODING = "utf-8-sig"
# Header spellings, compared with everything but letters and digits removed.
EMAIL_HEADERS = ("email", "emailaddress", "mail", "emailaddr", "mailaddress", "emails", "courriel", "correo")
NAME_HEADERS = ("name", "fullname", "displayname", "recipientname", "contactname")
SAMPLE_BYTES = 64 * 1024


def _squash(header: str) -> str:
    return re.sub(r"[^0-9a-z]", "", header.strip().lower())


@dataclass(frozen=True)
class CsvLayout:
    """How to read a file: decided once from its head, before anything is queued."""

    encoding: str
    delimiter: str
    header: list[str]
    email_index: int
    name_index: int | None
    attributes: list[tuple[int, str]] = field(default_factory=list)

    def to_args(self) -> dict[str, object]:
        return {
            "encoding": self.encoding,
            "delimiter": self.delimiter,
            "header": self.header,
            "email_index": self.email_index,
            "name_index": self.name_index,
            "attributes": [list(a) for a in self.attributes],
        }

    @classmethod
    def from_args(cls, args: dict[str, object]) -> CsvLayout:
        return cls(
            encoding=str(args["encoding"]),
            delimiter=str(args["delimiter"]),
            header=list(args["header"]),  # type: ignore[call-overload]
            email_index=int(args["email_index"]),  # type: ignore[call-overload]
            name_index=None if args["name_index"] is None else int(args["name_index"]),  # type: ignore[call-overload]
            attributes=[(int(i), str(n)) for i, n in args["attributes"]],  # type: ignore[attr-defined]
        )


def check_encoding(encoding: str | None) -> str:
    name = encoding or DEFAULT_ENCODING
    try:
        codecs.lookup(name)
    except LookupError:
        raise InvalidInput(f"unknown encoding {name!r}") from None
    # A UTF-8 file may or may not start with a BOM; utf-8-sig reads both.
    return DEFAULT_ENCODING if codecs.lookup(name).name == "utf-8" else name


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: 0 for d in DELIMITERS}
    quoted = False
    for ch in first_line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def inspect_csv(
    head: bytes,
    *,
    name: str,
    encoding: str | None = None,
    delimiter: str | None = None,
    email_column: str | None = None,
) -> CsvLayout:
    """Decide the layout from the first bytes of a file; raise InvalidInput if it cannot be imported at all."""
    enc = check_encoding(encoding)
    if b"\x00" in head[:SAMPLE_BYTES] and not enc.lower().startswith("utf-16"):
        raise InvalidInput(f"{name} is not a CSV file (it holds binary data)")
    decoder = codecs.getincrementaldecoder(enc)(errors="strict")
    try:
        text = decoder.decode(head[:SAMPLE_BYTES], final=len(head) <= SAMPLE_BYTES)
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"{name} is not valid {enc} text (byte {exc.start})", hint="pass --encoding, e.g. --encoding latin-1"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInput(f"{name} is empty: expected a header row naming the email column")
    if delimiter is not None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(delimiter, delimiter)
        if len(delimiter) != 1:
            raise InvalidInput(f"--delimiter must be one character, got {delimiter!r}")
    delim = delimiter or _sniff_delimiter(lines[0])
    try:
        header = next(csv.reader(io.StringIO(text.lstrip("\r\n")), delimiter=delim))
    except (csv.Error, StopIteration) as exc:
        raise InvalidInput(f"{name} is not a CSV file: {exc}") from None
    header = [h.strip() for h in header]
    email_index = _find_email(header, email_column, name)
    squashed = [_squash(h) for h in header]
    name_index = next((i for i, h in enumerate(squashed) if h in NAME_HEADERS and i != email_index), None)
    attributes = [(i, h or f"column_{i + 1}") for i, h in enumerate(header) if i not in (email_index, name_index)]
    return CsvLayout(enc, delim, header, email_index, name_index, attributes)


def _find_email(header: list[str], wanted: str | None, name: str) -> int:
    if wanted is not None:
        for i, h in enumerate(header):
            if h.lower() == wanted.strip().lower():
                return i
        raise InvalidInput(f"{name} has no column {wanted!r}; its columns are: {', '.join(header)}")
    squashed = [_squash(h) for h in header]
    for candidates in (EMAIL_HEADERS, None):
        for i, h in enumerate(squashed):
            if (h in candidates) if candidates else ("email" in h or "mail" in h):
                return i
    shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    raise InvalidInput(
        f"{name} has no email column (columns: {shown})", hint="name it with --email-column, or add a header row"
    )


class ChunkStream(io.RawIOBase):
    """A readable binary stream over an iterable of byte chunks (the staged copy of an upload)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buffer = memoryview(b"")  # a view, so handing out part of a chunk copies only that part
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buffer = memoryview(nxt)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self.position += n
        return n


def iter_batches(stream: IO[bytes], layout: CsvLayout, size: int) -> Iterator[tuple[list[int], list[list[str]]]]:
    """The data rows in batches of up to `size`: (the line number where each record starts, the records). The header
    and blank lines are skipped. Raises InvalidInput naming the line if the bytes stop decoding or the CSV breaks.

    Batches, because the import handles a batch with list comprehensions and map() rather than a Python-level
    loop with a function call per row."""
    text = io.TextIOWrapper(stream, encoding=layout.encoding, newline="", errors="strict")
    text._CHUNK_SIZE = 1 << 16  # type: ignore[attr-defined]  # decode 64 KiB at a time, not 8 KiB
    reader = csv.reader(text, delimiter=layout.delimiter)
    prev = 0  # the last line of the previous record: the next record starts on the line after
    try:
        for row in reader:  # the header: the first record that is not blank
            prev = reader.line_num
            if row and (len(row) > 1 or row[0].strip()):
                break
        while True:
            rows = list(islice(reader, size))
            if not rows:
                return
            end = reader.line_num
            # Almost always one line per record; quoted line breaks need counting.
            lines = list(range(prev + 1, end + 1)) if end - prev == len(rows) else _start_lines(rows, prev)
            prev = end
            if min(map(len, rows)) < 2:  # an empty record is a blank line; skip those and whitespace-only ones
                keep = [bool(r) and (len(r) > 1 or bool(r[0].strip())) for r in rows]
                rows = list(compress(rows, keep))
                lines = list(compress(lines, keep))
            if rows:
                yield lines, rows
    except UnicodeDecodeError:
        raise InvalidInput(
            f"the file stops being {layout.encoding} text after line {prev}", hint="pass --encoding"
        ) from None
    except csv.Error as exc:
        raise InvalidInput(f"broken CSV after line {prev}: {exc}") from None


def _start_lines(rows: list[list[str]], prev: int) -> list[int]:
    """Where each record starts, for a batch with records spanning several lines (quoted line breaks)."""
    lines = []
    for row in rows:
        lines.append(prev + 1)
        prev += 1 + sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in row)
    return lines


def format_row(fields: list[str], delimiter: str) -> str:
    """A record as it would stand in the file (for the rejects list)."""
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="").writerow(fields)
    return out.getvalue()
