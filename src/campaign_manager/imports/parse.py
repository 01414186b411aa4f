"""Reading, parsing and validating an import's rows: CSV records in, typed rows to stage (imports.rows) out.

`parse` turns the staged file's chunks into batches of rows ready to stage, in the job's own process. (A helper
process that parsed large files on the other core while this one staged them was dropped: `make bench` measured no
gain from it, see bench/README.md.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import compress
from operator import itemgetter, not_

from campaign_manager import limits
from campaign_manager.audience.address_keys import email_hash, email_keys
from campaign_manager.audience.addresses import PLAIN_ADDRESS, check_email
from campaign_manager.imports.csvfile import (
    CsvLayout,
    RecordBatch,
    format_row,
    keep_raw,
    read_records,
    unquote_cells,
)
from campaign_manager.imports.rows import Batch, Reject, StagedRow

CHUNK_BYTES = 1 << 20
BATCH_ROWS = 5_000

_encode = json.encoder.encode_basestring  # a JSON string literal (non-ASCII kept as is), in C


def parse(layout: CsvLayout, chunks: Iterator[bytes], forgotten: set[str], batch_rows: int) -> Iterator[Batch]:
    """Every row of the file, parsed and validated, in batches."""
    parser = Parser(layout, forgotten)
    for records in read_records(chunks, layout, batch_rows):
        yield parser.batch(records)


class Parser:
    """Turns a batch of records into rows to stage: the import's hot path. A batch goes through map() and
    comprehensions a column at a time, with no Python-level call per row; only addresses the PLAIN_ADDRESS pattern
    does not take, about 2% of a typical file, are checked one by one by email-validator, and only cells over a
    length limit one by one."""

    def __init__(self, layout: CsvLayout, forgotten: set[str]) -> None:
        self.layout, self.forgotten = layout, forgotten
        self.width = max([layout.email_index, layout.name_index or 0, *(i for i, _ in layout.attributes)]) + 1

    def batch(self, records: RecordBatch) -> Batch:
        layout, forgotten, width = self.layout, self.forgotten, self.width
        lines, rows = records.lines, records.rows
        rejects = list(map(Reject._make, records.rejects))
        read = len(rows) + len(rejects)
        if not rows:
            return Batch([], rejects, read, records.position)
        original = rows
        if min(map(len, rows)) < width:
            rows = [r if len(r) >= width else r + [""] * (width - len(r)) for r in rows]
        emails = list(map(str.strip, _column(rows, layout.email_index)))
        # 0: a plain address, which the apply step normalizes (lowercases its domain) in SQL; 1: normalized here.
        normalized = list(map(int, map(not_, map(PLAIN_ADDRESS.fullmatch, emails))))
        problems: dict[int, str] = {}
        for i in compress(range(len(emails)), normalized):
            emails[i], reason = check_email(emails[i])
            if reason is not None:
                problems[i] = reason
        names: list[str | None] = [None] * len(rows)
        if layout.name_index is not None:
            cells = list(map(str.strip, _column(rows, layout.name_index)))
            names = [c or None for c in cells]
            _too_long(problems, "the name", cells, limits.NAME)
        columns = [(key, _column(rows, i)) for i, key in layout.attributes]
        for key, cells in columns:
            _too_long(problems, f"attribute {key[:40]!r}", cells, limits.ATTRIBUTE_VALUE)
        keys = email_keys(emails)
        # Most addresses are already lowercase: stage no second copy of those (SQL takes the key).
        stored = [None if e == k else e for e, k in zip(emails, keys, strict=True)]
        gone = [1 if email_hash(k) in forgotten else 0 for k in keys] if forgotten else [0] * len(keys)
        attrs = json_columns(columns, len(rows))
        staged = list(map(StagedRow._make, zip(lines, keys, stored, names, gone, normalized, attrs, strict=True)))
        if problems:
            for i in sorted(problems):
                rejects.append(Reject(lines[i], *keep_raw(format_row(original[i], layout.delimiter), problems[i])))
            staged = [row for i, row in enumerate(staged) if i not in problems]
        return Batch(staged, rejects, read, records.position)


def _column(rows: list[list[str]], index: int) -> list[str]:
    """One column of the records, as the import reads it (see unquote_cells)."""
    return unquote_cells(list(map(itemgetter(index), rows)))


def _too_long(problems: dict[int, str], what: str, cells: list[str], limit: int) -> None:
    """Note each cell longer than `limit` as its row's problem (a row keeps the first one found)."""
    if max(map(len, cells)) <= limit:  # the usual case, in C
        return
    for i, cell in enumerate(cells):
        reason = limits.too_long(what, cell, limit)
        if reason is not None:
            problems.setdefault(i, reason)


def json_columns(columns: list[tuple[str, list[str]]], count: int) -> list[str]:
    """The text of a JSON object for each of `count` rows, from (key, cells) columns; an empty cell adds no key.
    Built with json's C string encoder and one %-template for every row (building it in SQL cost a third of the
    recipient insert); only rows with an empty cell are put together again one by one."""
    if not columns:
        return ["{}"] * count
    keys = [_encode(name) + ":" for name, _ in columns]
    template = "{" + ",".join(key.replace("%", "%%") + "%s" for key in keys) + "}"
    encoded = [list(map(_encode, cells)) for _, cells in columns]
    objects = list(map(template.__mod__, zip(*encoded, strict=True)))
    gaps: set[int] = set()
    for _, cells in columns:
        if "" in cells:  # in C; most files have no empty cell, or few
            gaps.update(compress(range(count), map(not_, cells)))
    for i in gaps:
        pairs = [key + column[i] for key, column, (_, cells) in zip(keys, encoded, columns, strict=True) if cells[i]]
        objects[i] = "{" + ",".join(pairs) + "}"
    return objects
