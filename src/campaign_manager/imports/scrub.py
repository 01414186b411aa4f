"""Taking an address out of the staged uploads and rejected rows that hold it (`cm recipient forget`).

A staged upload is rewritten in place, chunk by chunk, with each chunk keeping its length: the rows of the forgotten
address (every line of them) and any other mention of it become spaces, which the import reads as blank lines. Line
numbers stay those of the user's file, and an import reading the upload at the same moment never sees the text
shift under it; what it had already read before the rewrite is caught by its own check against `suppression` before
each segment commits (import_sql). Two passes: the first finds the address's rows with the import's own reader (so
"Ada@Example.COM" in a quoted, multi-line record is found as the import would find it), the second works out the
bytes to blank. A file whose text does not hold the address's local part is left alone after a quick scan.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from campaign_manager.audience.address_keys import email_key
from campaign_manager.audience.addresses import check_email
from campaign_manager.imports.csvfile import CsvLayout, read_records, unquote_cells
from campaign_manager.tables.jobs import ImportReject, Job, JobFile

SCAN_ROWS = 5_000


def rejects_naming(key: str) -> Any:
    """The condition on import_reject of the rows that hold the address `key` (in any case)."""
    return sa.func.lower(col(ImportReject.raw)).contains(key, autoescape=True)


def scrub_address(session: Session, key: str) -> int:
    """Remove the address `key` from every rejected row and staged upload; returns how many uploads held it."""
    session.exec(sa.delete(ImportReject).where(rejects_naming(key)))
    staged = sa.exists().where(col(JobFile.job_id) == Job.id)
    scrubbed = 0
    for job in session.exec(select(Job).where(staged).order_by(col(Job.id))).all():
        if job.id is not None and "layout" in (job.args or {}) and _scrub_upload(session, job.id, job.args, key):
            scrubbed += 1
    return scrubbed


def _chunks(session: Session, job_id: int) -> Iterator[bytes]:
    seq = 0
    while (data := session.get(JobFile, (job_id, seq))) is not None:
        yield data.data
        session.expunge(data)  # one chunk in memory at a time
        seq += 1


def _scrub_upload(session: Session, job_id: int, args: dict[str, object], key: str) -> bool:
    layout = CsvLayout.from_args(args["layout"])  # type: ignore[arg-type]
    if not _may_hold(_chunks(session, job_id), layout.encoding, key):
        return False
    rows = _rows_of(_chunks(session, job_id), layout, key)
    ranges = list(_blank_ranges(_chunks(session, job_id), layout.encoding, key, rows))
    if not ranges:
        return False
    head = next(_chunks(session, job_id), b"")[:4]
    space = " ".encode(_base_codec(layout.encoding, head)[0])  # UTF-16 and -32: in the file's own byte order
    start, seq = 0, 0
    while (row := session.get(JobFile, (job_id, seq))) is not None:
        end = start + len(row.data)
        mine = [(max(a, start) - start, min(b, end) - start) for a, b in ranges if a < end and b > start]
        if mine:
            data = bytearray(row.data)
            for a, b in mine:
                data[a:b] = space * ((b - a) // len(space))
            row.data = bytes(data)
            session.add(row)
            session.flush()
        session.expunge(row)
        start, seq = end, seq + 1
    return True


def _may_hold(chunks: Iterator[bytes], encoding: str, key: str) -> bool:
    """Whether the text holds the address's local part (any case): a quick scan that rules out most files. An
    address whose local part is not ASCII could be written otherwise (another Unicode normal form): always read."""
    local = key.rpartition("@")[0]
    if not local.isascii():
        return True
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    tail = ""
    for chunk in chunks:
        text = tail + decoder.decode(chunk).lower()
        if local in text:
            return True
        tail = text[-len(local) :]
    return False


def _rows_of(chunks: Iterator[bytes], layout: CsvLayout, key: str) -> dict[int, int]:
    """The records whose address is `key`: their first line -> their last line."""
    found: dict[int, int] = {}
    for batch in read_records(chunks, layout, SCAN_ROWS):
        cells = unquote_cells([row[layout.email_index] if len(row) > layout.email_index else "" for row in batch.rows])
        for line, row, cell in zip(batch.lines, batch.rows, cells, strict=True):
            address = cell.strip()
            if address.lower() != key and key.rpartition("@")[0] not in address.lower():
                continue
            normalized, reason = check_email(address)
            if reason is None and email_key(normalized) == key:
                found[line] = line + sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in row)
    return found


def _base_codec(encoding: str, head: bytes) -> tuple[str, int]:
    """A codec that encodes each decoded line back to its own bytes (no BOM), and the length of the file's BOM."""
    name = codecs.lookup(encoding).name
    if name == "utf-8-sig":
        return "utf-8", 3 if head.startswith(codecs.BOM_UTF8) else 0
    for family, boms in (
        ("utf-16", ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))),
        ("utf-32", ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"))),
    ):
        if name == family:
            for bom, codec in boms:
                if head.startswith(bom):
                    return codec, len(bom)
            return f"{family}-le", 0
    return name, 0


def _lines(chunks: Iterator[bytes], encoding: str) -> Iterator[tuple[int, int, str, str]]:
    """(line number, byte offset, text with its line ending, the codec that gives its bytes back) for every physical
    line; a very long line is cut into pieces (the same line number, each with its own offset), never held whole."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    codec, offset = "", 0
    number, carry = 1, ""
    for chunk in chunks:
        if not codec:
            codec, offset = _base_codec(encoding, chunk)
        lines = io.StringIO(carry + decoder.decode(chunk), newline="").readlines()
        carry = lines.pop() if lines and not lines[-1].endswith("\n") else ""  # a CR may be half of a CRLF
        if len(carry) > 1 << 16:
            lines.append(carry)
            carry = ""
        for line in lines:
            yield number, offset, line, codec
            offset += len(line.encode(codec))
            number += line.endswith(("\n", "\r"))
    rest = carry + decoder.decode(b"", final=True)
    if rest:
        yield number, offset, rest, codec or "utf-8"


def _blank_ranges(chunks: Iterator[bytes], encoding: str, key: str, rows: dict[int, int]) -> Iterator[tuple[int, int]]:
    """The byte ranges to turn into spaces: every line of the address's records (their line endings kept), and
    each other mention of the address."""
    spans = sorted(rows.items())
    mention = re.compile(re.escape(key), re.IGNORECASE)
    for number, offset, text, codec in _lines(chunks, encoding):
        body = text.rstrip("\r\n")
        if any(first <= number <= last for first, last in spans):
            yield offset, offset + len(body.encode(codec))
            continue
        for match in mention.finditer(body):
            start = offset + len(body[: match.start()].encode(codec))
            yield start, start + len(match.group().encode(codec))
