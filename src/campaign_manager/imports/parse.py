"""Reading, parsing and validating an import's rows: CSV records in, typed rows to stage (imports.rows) out.

`parse` turns the staged file's chunks into batches of rows ready to stage, in the job's own process.
(Temporarily, for a measurement: `ParseProcess` does the same in a second process, `python -m
campaign_manager.imports.parse`, on the other core, while the job's process stages what it has received. The two
talk through the helper's stdin and stdout in length-prefixed pickled frames.) This module imports neither
SQLAlchemy nor the CLI.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from itertools import compress
from operator import itemgetter, not_
from typing import IO, Any

from campaign_manager import limits
from campaign_manager.audience.addresses import PLAIN_ADDRESS, check_email, email_hash, email_keys
from campaign_manager.errors import InvalidInput
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
# Batches received from the helper and not yet staged (~0.5 MB each, kept pickled): room for it to run ahead.
BUFFERED_BATCHES = 16

_encode = json.encoder.encode_basestring  # a JSON string literal (non-ASCII kept as is), in C
_FRAME = struct.Struct("<Q")


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


# ---------------------------------------------------------------------------------------------- frames


def _send(out: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_FRAME.pack(len(data)))
    out.write(data)


def _receive(inp: IO[bytes]) -> Any:
    """The next frame's object; EOFError if the other side is gone."""
    return pickle.loads(_receive_bytes(inp))


def _receive_bytes(inp: IO[bytes]) -> bytes:
    head = inp.read(_FRAME.size)
    if len(head) < _FRAME.size:
        raise EOFError
    (size,) = _FRAME.unpack(head)
    data = inp.read(size)
    if len(data) < size:
        raise EOFError
    return data


# ---------------------------------------------------------------------------------------------- the helper


def main() -> int:
    """The helper process: settings, then chunks until an empty one, on stdin; batches, then "end", on stdout."""
    # Stopping is the job's process's call: SIGTERM from systemd (sent to every process of the service) or Ctrl-C
    # in a terminal (sent to the whole process group) must not cut an import short that the worker means to
    # finish within its grace period. The job's process kills the helper when it stops early; if that process
    # dies, the helper's next read or write fails and it exits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    settings = _receive(inp)

    def chunks() -> Iterator[bytes]:
        while chunk := _receive(inp):
            yield chunk

    layout = CsvLayout.from_args(settings["layout"])
    parser = Parser(layout, settings["forgotten"])
    records = read_records(chunks(), layout, settings["batch_rows"])
    try:
        for batch in records:
            parsed = parser.batch(batch)
            # As plain tuples: unpickling a NamedTuple calls its Python constructor, a row at a time.
            _send(out, ("batch", (list(map(tuple, parsed.rows)), list(map(tuple, parsed.rejects)), *parsed[2:])))
    except InvalidInput as exc:
        _send(out, ("error", exc.message, exc.hint))
    else:
        _send(out, ("end",))
    out.flush()
    return 0


# ---------------------------------------------------------------------------------------------- the job's side


class ParseProcess:
    """Run `parse` in a helper process; iterate to receive its batches. Two threads of this process keep the
    pipes moving while it stages and applies rows: one sends the chunks, one receives into a bounded buffer.
    `close` (always call it) stops the helper if it is still running."""

    def __init__(
        self,
        layout: CsvLayout,
        chunks: Iterator[bytes],
        forgotten: set[str],
        batch_rows: int,
    ) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        settings = {
            "layout": layout.to_args(),
            "forgotten": forgotten,
            "batch_rows": batch_rows,
        }
        self._received: queue.Queue[bytes | None] = queue.Queue(maxsize=BUFFERED_BATCHES)
        self._send_error: BaseException | None = None
        self._receive_error: BaseException | None = None
        self._finished = False
        self._threads = [
            threading.Thread(target=self._feed, args=(settings, chunks), name="import-feed", daemon=True),
            threading.Thread(target=self._collect, name="import-collect", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _feed(self, settings: dict[str, Any], chunks: Iterator[bytes]) -> None:
        pipe = self._proc.stdin
        assert pipe is not None
        try:
            _send(pipe, settings)
            for chunk in chunks:
                _send(pipe, chunk)
            _send(pipe, b"")
            pipe.close()
        except BrokenPipeError:
            pass  # the helper stopped (an error in the file, or close()); _collect reports why
        except BaseException as exc:  # reading the chunks failed: say so instead of a stalled import
            self._send_error = exc
            self._proc.kill()

    def _collect(self) -> None:
        # Frames stay pickled until they are staged: a batch takes several times the room as Python objects.
        pipe = self._proc.stdout
        assert pipe is not None
        while True:
            try:
                frame = _receive_bytes(pipe)
            except BaseException as exc:  # EOF: the helper has ended (or died)
                if not isinstance(exc, EOFError):
                    self._receive_error = exc
                self._received.put(None)
                return
            self._received.put(frame)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            frame = self._received.get()
            message: tuple[Any, ...] = ("gone",) if frame is None else pickle.loads(frame)
            if message[0] == "batch":
                rows, rejects, read, position = message[1]
                yield Batch(list(map(StagedRow._make, rows)), list(map(Reject._make, rejects)), read, position)
            elif message[0] == "end":
                self._finished = True
                return
            elif message[0] == "error":
                self._finished = True
                raise InvalidInput(message[1], hint=message[2])
            else:
                for error in (self._send_error, self._receive_error):
                    if error is not None:
                        raise error
                raise RuntimeError(f"the parsing process stopped: {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        try:
            self._proc.wait(timeout=5)
            err = self._proc.stderr.read() if self._proc.stderr else b""
        except (subprocess.TimeoutExpired, ValueError, OSError):
            err = b""
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self._proc.returncode}"

    def close(self) -> None:
        if self._finished:  # it said its last word and is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        if self._proc.poll() is None:
            self._proc.kill()
        # Unblock the collecting thread if the buffer is full, then reap the helper.
        while True:
            try:
                self._received.get_nowait()
            except queue.Empty:
                break
        for thread in self._threads:
            thread.join(timeout=5)
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):  # unsent bytes for a helper that is gone
                    pipe.close()
        self._proc.wait()


if __name__ == "__main__":
    # Run as the module's own name, so that what it pickles (Batch) loads in the job's process.
    from campaign_manager.imports import parse as import_parse

    sys.exit(import_parse.main())
