"""CSV files as people really have them: sniffed delimiter, any common spelling of the email header, BOM, CRLF,
quoted fields with embedded newlines and delimiters, blank lines. Streams; never holds the file in memory."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, compress, islice
from typing import NamedTuple

from campaign_manager import limits
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
        codec = codecs.lookup(name)
    except LookupError:
        raise InvalidInput(f"unknown encoding {name!r}") from None
    if not getattr(codec, "_is_text_encoding", True):  # rot13, base64, zlib ...: codecs, but not of bytes to text
        raise InvalidInput(f"{name!r} is not a text encoding")
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
    sample = head[:SAMPLE_BYTES]
    first_line = sample.split(b"\n", 1)[0]
    # A stray NUL inside one row makes that row a reject; a header holding one, or NULs making up more than 1% of
    # the first 64 KiB, mean a binary file (UTF-16 text is full of NUL bytes and is not one).
    if not codecs.lookup(enc).name.startswith("utf-16") and (
        b"\x00" in first_line or sample.count(b"\x00") * 100 > len(sample)
    ):
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
    if len(head) > SAMPLE_BYTES and not any(mark in text.lstrip("\r\n") for mark in ("\n", "\r")):
        raise InvalidInput(f"{name} has no line break in its first {SAMPLE_BYTES // 1024} KiB: that is no header row")
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
    for i, key in attributes:
        reason = limits.too_long(f"the name of column {i + 1}", key, limits.ATTRIBUTE_KEY)
        if reason is not None:
            raise InvalidInput(f"{name}: {reason}", hint="column names become attribute keys")
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


# The longest record the reader takes, in characters: the csv module's own default field limit, which cm keeps. A
# longer record (a runaway quoted field, a 50 MB line) is a reject; the reader goes on at the next line.
RECORD_LIMIT = 131_072
# How much of a rejected record is kept to show the user: enough to recognise it, never the whole of a huge one.
RAW_KEPT = 64 * 1024
# Bytes decoded at a time; the last few pieces' lines are kept to show a record the csv module refused.
PIECE_BYTES = 128 * 1024
HISTORY_PIECES = 6
NUL_REASON = "the row holds a NUL byte (binary data), shown here as U+FFFD"


class RecordBatch(NamedTuple):
    lines: list[int]  # the line where each record starts
    rows: list[list[str]]  # the records, blank ones left out
    rejects: list[tuple[int, str, str]]  # (line, raw text, reason): records the reader itself refused
    position: int  # bytes of the file consumed so far


CUT_NOTE = f"; only its first {RAW_KEPT:,} characters are kept here"


def keep_raw(raw: str, reason: str) -> tuple[str, str]:
    """A rejected record's text as it is stored: at most RAW_KEPT characters (the reason then ends with CUT_NOTE),
    no NUL (PostgreSQL cannot store one)."""
    if len(raw) > RAW_KEPT:
        raw, reason = raw[:RAW_KEPT], reason + CUT_NOTE
    return raw.replace("\x00", "\ufffd"), reason


class _Lines:
    """The file's physical lines, decoded and handed to the csv reader a piece at a time (a list per piece, so that
    the reader pulls each line at C speed). Memory stays bounded whatever the file: a line longer than RECORD_LIMIT
    is never held whole; the reader gets its first RAW_KEPT characters padded past the limit, so that the csv module
    refuses the record it belongs to (quoted or not) and the batch loop turns it into a reject."""

    def __init__(self, chunks: Iterable[bytes], encoding: str) -> None:
        self._chunks = chunks
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.position = 0  # bytes decoded so far
        self.count = 0  # lines handed out so far
        self.nul = False  # a NUL was seen somewhere in the file
        self._history: deque[tuple[int, list[str]]] = deque(maxlen=HISTORY_PIECES)
        self._long: str | None = None  # the head of an over-long line whose rest is being skipped
        self._drop_lf = False  # that line ended with a CR at the end of a piece: a LF starting the next is its

    def __iter__(self) -> Iterator[list[str]]:
        carry = ""
        for chunk in self._chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), PIECE_BYTES):
                piece = view[start : start + PIECE_BYTES]
                self.position += len(piece)
                text = self._decoder.decode(piece)
                self.nul = self.nul or "\x00" in text
                lines, carry = self._split(carry + text, final=False)
                if lines:
                    yield lines
        lines, _ = self._split(carry + self._decoder.decode(b"", final=True), final=True)
        if lines:
            yield lines

    def _split(self, text: str, *, final: bool) -> tuple[list[str], str]:
        """The complete lines of `text` and what is left for the next piece."""
        out: list[str] = []
        if self._drop_lf:
            self._drop_lf = False
            text = text[1:] if text.startswith("\n") else text
        if self._long is not None:
            end = _line_end(text)
            if end < 0 and not final:
                return out, ""  # still inside the over-long line: drop this piece
            end = len(text) if end < 0 else end
            ending = _ending(text[:end])
            self._drop_lf = ending == "\r" and end == len(text) and not final
            out.append(self._long + "x" * (RECORD_LIMIT + 1) + ending)
            self._remember([self._long + ending])
            self._long, text = None, text[end:]
        lines = io.StringIO(text, newline="").readlines()
        carry = lines.pop() if lines and not final and not lines[-1].endswith("\n") else ""
        if len(carry) > RECORD_LIMIT:
            self._long, carry = carry[:RAW_KEPT], ""
        if lines:
            self._remember(lines)
            out.extend(lines)
        return out, carry

    def _remember(self, lines: list[str]) -> None:
        self._history.append((self.count + 1, lines))
        self.count += len(lines)

    def raw(self, first: int, last: int) -> str:
        """The text of lines `first` to `last`, as far as the last few pieces still hold it (the error path only)."""
        parts: list[str] = []
        for start, lines in self._history:
            parts.extend(lines[max(first - start, 0) : max(last - start + 1, 0)])
        return "".join(parts)


def _line_end(text: str) -> int:
    """The index just past the first line break of `text` (CRLF counts as one), or -1 if it has none."""
    breaks = [i for i in (text.find("\n"), text.find("\r")) if i >= 0]
    if not breaks:
        return -1
    i = min(breaks)
    return i + 2 if text.startswith("\r\n", i) else i + 1


def _ending(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else line[-1:] if line.endswith(("\r", "\n")) else ""


def read_records(chunks: Iterable[bytes], layout: CsvLayout, size: int) -> Iterator[RecordBatch]:
    """The data records in batches of up to `size`, each with the line where it starts; the header and blank lines
    are skipped. A record
    the reader cannot take (longer than RECORD_LIMIT characters, or holding a NUL) is a reject of its batch, and
    the rest of the file is read. Raises InvalidInput if the bytes stop decoding (staging checked they do).

    Batches, because the import handles a batch with list comprehensions and map() rather than a Python-level
    loop with a function call per row."""
    lines = _Lines(chunks, layout.encoding)
    reader = csv.reader(chain.from_iterable(lines), delimiter=layout.delimiter)
    prev = 0  # the last line of the previous record: the next record starts on the line after
    try:
        for row in reader:  # the header: the first record that is not blank
            prev = reader.line_num
            if row and (len(row) > 1 or row[0].strip()):
                break
        exhausted = False
        while not exhausted:
            starts: list[int] = []
            rows: list[list[str]] = []
            rejects: list[tuple[int, str, str]] = []
            while len(rows) < size:
                want = size - len(rows)
                got: list[list[str]] = []
                error: csv.Error | None = None
                try:
                    got.extend(islice(reader, want))  # extend keeps what came before an error
                except csv.Error as exc:
                    error = exc
                end = reader.line_num
                if error is None and end - prev == len(got):  # almost always: one line per record
                    starts.extend(range(prev + 1, end + 1))
                else:
                    got_starts, prev = _spans(got, prev)
                    starts.extend(got_starts)
                if error is not None:
                    raw, reason = keep_raw(lines.raw(prev + 1, end), _too_long(error))
                    rejects.append((prev + 1, raw, reason))
                elif len(got) < want:
                    exhausted = True
                rows.extend(got)
                prev = end
                if exhausted:
                    break
            if rows and min(map(len, rows)) < 2:  # an empty record is a blank line; skip those and whitespace-only ones
                keep = [bool(r) and (len(r) > 1 or bool(r[0].strip())) for r in rows]
                rows, starts = list(compress(rows, keep)), list(compress(starts, keep))
            if lines.nul:
                rows, starts = _without_nul(rows, starts, rejects, layout.delimiter)
            if rows or rejects or not exhausted:
                yield RecordBatch(starts, rows, rejects, lines.position)
    except UnicodeDecodeError:
        raise InvalidInput(
            f"the file stops being {layout.encoding} text after line {prev}", hint="pass --encoding"
        ) from None
    except csv.Error as exc:  # only the header can get here
        raise InvalidInput(f"the header row cannot be read: {exc}") from None


def _too_long(error: csv.Error) -> str:
    text = str(error)
    if "field larger than field limit" in text:
        return f"the row is longer than {RECORD_LIMIT:,} characters (a quote never closed?); reading went on after it"
    return f"the row cannot be read: {text}"


def _without_nul(
    rows: list[list[str]], starts: list[int], rejects: list[tuple[int, str, str]], delimiter: str
) -> tuple[list[list[str]], list[int]]:
    """Move the records holding a NUL to `rejects` (PostgreSQL cannot store one, and it means binary data)."""
    clean = [not any("\x00" in field for field in row) for row in rows]
    for row, line, ok in zip(rows, starts, clean, strict=True):
        if not ok:
            rejects.append((line, *keep_raw(format_row(row, delimiter), NUL_REASON)))
    return list(compress(rows, clean)), list(compress(starts, clean))


def _spans(rows: list[list[str]], prev: int) -> tuple[list[int], int]:
    """Where each record starts, and the last line of the last one, for records spanning several lines (quoted
    line breaks)."""
    lines = []
    for row in rows:
        lines.append(prev + 1)
        prev += 1 + sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in row)
    return lines, prev


# A spreadsheet runs a cell that starts with one of these as a formula. cm writes such cells (in rejects files and
# listings) behind a ' (OWASP's CSV-injection rule), and an import removes exactly that one ' again, so that a
# rejects file imports back as the original (`+44 20 ...` stays a phone number). A cell of a file from elsewhere
# that starts with ' before one of them is read the same way: spreadsheets themselves write a leading ' for "text".
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NEUTRALISED = tuple("'" + start for start in FORMULA_STARTS)


def neutralise(cell: str) -> str:
    """A cell as cm writes it into a CSV file that a spreadsheet may open."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def unquote_cells(cells: list[str]) -> list[str]:
    """The cells of a column as an import reads them: the ' that `neutralise` put before a formula character
    removed (one, and only there)."""
    if "'" not in "".join(cells):  # the usual case, in C
        return cells
    return [c[1:] if c.startswith(_NEUTRALISED) else c for c in cells]


def split_row(raw: str, delimiter: str) -> list[str]:
    """A stored record's fields again (the rejects list keeps records as text)."""
    return next(csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter), [])


def format_row(fields: list[str], delimiter: str) -> str:
    """A record as it would stand in the file (for the rejects list): quoted where a field needs it, line breaks
    included (the terminator is what makes the writer quote them)."""
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerow(fields)
    return out.getvalue()[:-2]
