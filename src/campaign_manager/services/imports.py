"""CSV imports into a group or a campaign's audience: staged when queued, run set-based when the job runs.

Staging (in the `cm` process that queues the job) refuses a file that cannot be imported at all and copies the
whole file into `job_file` chunks, so the worker never needs the original. Running (in a worker, or in-process
with `--wait`) streams those chunks through the CSV reader and validates each address (fast path in `emails`);
`import_sql` stages the good rows (multi-row inserts on SQLite, COPY on PostgreSQL) and applies them with a
handful of set-based statements in ONE transaction, which also records the job's counts: a job re-run after a
crash either finds that transaction committed and returns its counts, or starts over.
"""

from __future__ import annotations

import codecs
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from campaign_manager.errors import InvalidInput, NotFound
from campaign_manager.files import open_input
from campaign_manager.models import ImportReject, Job, JobFile
from campaign_manager.services import consent
from campaign_manager.services.csvfile import (
    SAMPLE_BYTES,
    ChunkStream,
    CsvLayout,
    format_row,
    inspect_csv,
    iter_batches,
)
from campaign_manager.services.emails import PLAIN_ADDRESS, check_email

if TYPE_CHECKING:
    from campaign_manager.services.import_sql import Backend

KIND = "import"
CHUNK_BYTES = 1 << 20
BATCH_ROWS = 5_000
Progress = Callable[[int, int], None]
_encode = json.encoder.encode_basestring  # a JSON string literal (non-ASCII kept as is), in C


# ---------------------------------------------------------------------------------------------- staging


def _open_source(source: str, stdin: IO[bytes] | None) -> tuple[IO[bytes], str]:
    if source == "-":
        return (stdin or sys.stdin.buffer), "standard input"
    return open_input(source, "CSV file"), str(Path(source).expanduser())


def stage_import(
    session: Session,
    source: str,
    *,
    group: str | None = None,
    campaign_id: int | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    email_column: str | None = None,
    update_existing: bool = False,
    stdin: IO[bytes] | None = None,
) -> Job:
    """Check the file and stage a copy of it with a queued import job; raises InvalidInput before anything is
    written if the file cannot be imported at all. The caller commits, then enqueues the job."""
    from campaign_manager.services.jobs import create_job

    if (group is None) == (campaign_id is None):
        raise ValueError("an import targets exactly one group or campaign")
    target: dict[str, Any]
    if group is not None:
        from campaign_manager.services.groups import get_group

        grp = get_group(session, group)
        target = {"type": "group", "id": grp.id, "name": grp.name}
    else:
        target = {"type": "campaign", "id": campaign_id}
    stream, name = _open_source(source, stdin)
    try:
        head = _read_full(stream, SAMPLE_BYTES)
        layout = inspect_csv(head, name=name, encoding=encoding, delimiter=delimiter, email_column=email_column)
        args = {
            "source": name,
            "target": target,
            "layout": layout.to_args(),
            "update_existing": update_existing,
        }
        job = create_job(session, KIND, args)
        size = _copy_chunks(session, job, head, stream, layout.encoding, name)
    finally:
        if stream is not stdin and stream is not sys.stdin.buffer:
            stream.close()
    job.args = {**args, "size": size}
    session.flush()
    return job


def _read_full(stream: IO[bytes], size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = stream.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _copy_chunks(session: Session, job: Job, head: bytes, stream: IO[bytes], encoding: str, name: str) -> int:
    """Store the file in the database, checking that all of it decodes (so no job fails on that later)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    size, seq, pending = 0, 0, head
    while True:
        chunk = pending + _read_full(stream, CHUNK_BYTES - len(pending))
        pending = b""
        final = len(chunk) < CHUNK_BYTES
        try:
            decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"{name} is not valid {encoding} text (byte {size + exc.start})",
                hint="pass --encoding, e.g. --encoding latin-1",
            ) from None
        if chunk:
            session.add(JobFile(job_id=job.id, seq=seq, data=chunk))
            session.flush()
            seq, size = seq + 1, size + len(chunk)
        if final:
            return size


# ---------------------------------------------------------------------------------------------- running


def _iter_chunks(url: str, job_id: int) -> Iterator[bytes]:
    """One chunk at a time, each by its own query, so memory stays flat however large the file."""
    from campaign_manager.db import get_engine

    with Session(get_engine(url, write=False)) as session:
        seq = 0
        while True:
            data = session.exec(select(JobFile.data).where(JobFile.job_id == job_id, JobFile.seq == seq)).first()
            if data is None:
                return
            yield data
            seq += 1
            session.rollback()  # end the read snapshot between chunks: never pin the WAL for the whole import


def run_import_job(url: str, job_id: int, progress: Progress | None = None) -> dict[str, Any]:
    """The job handler: run (or re-run) an import job. Returns its counts."""
    from campaign_manager.db import get_engine, is_sqlite
    from campaign_manager.services.import_sql import PostgresBackend, SqliteBackend

    engine = get_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.result.get("committed"):
            return dict(job.counts)
        args = dict(job.args)
        forgotten = consent.suppressed_hashes(session)
    layout = CsvLayout.from_args(args["layout"])
    kind = SqliteBackend if is_sqlite(url) else PostgresBackend
    backend: Backend = kind(engine, job_id, args)
    try:
        done = backend.start()
        if done is not None:
            return done
        counts = _load(backend, layout, _iter_chunks(url, job_id), forgotten, int(args.get("size", 0)), progress)
        return backend.finish(counts)
    finally:
        backend.close()


def _load(
    backend: Backend,
    layout: CsvLayout,
    chunks: Iterator[bytes],
    forgotten: set[str],
    size: int,
    progress: Progress | None,
) -> dict[str, int]:
    """Parse, validate and stage every row: the import's hot path. Each batch goes through comprehensions and
    map() (no Python-level call per row); only addresses the PLAIN_ADDRESS pattern does not take, about 2% of a
    typical file, are checked one by one by email-validator."""
    stream = ChunkStream(chunks)
    ei, ni = layout.email_index, layout.name_index
    attr_idx = [i for i, _ in layout.attributes]
    width = max([ei, ni or 0, *attr_idx]) + 1
    plain = PLAIN_ADDRESS.fullmatch
    read = invalid = 0
    for lines, rows in iter_batches(io.BufferedReader(stream, CHUNK_BYTES), layout, BATCH_ROWS):
        read += len(rows)
        original = rows
        if min(map(len, rows)) < width:
            rows = [r if len(r) >= width else r + [""] * (width - len(r)) for r in rows]
        emails = [r[ei].strip() for r in rows]
        # 0: a plain address, which the apply step normalizes (lowercases its domain) in SQL; 1: normalized here.
        normalized = [0 if m else 1 for m in map(plain, emails)]
        rejected: list[int] = []
        rejects: list[tuple[int, str, str]] = []
        for i in [i for i, slow in enumerate(normalized) if slow]:
            emails[i], reason = check_email(emails[i])
            if reason is not None:
                rejected.append(i)
                rejects.append((lines[i], format_row(original[i], layout.delimiter), reason))
        keys = [e.lower() for e in emails]
        # Most addresses are already lowercase: stage no second copy of those (SQL takes the key).
        stored = [None if e == k else e for e, k in zip(emails, keys, strict=True)]
        gone = [1 if consent.email_hash(k) in forgotten else 0 for k in keys] if forgotten else [0] * len(keys)
        names = [r[ni].strip() or None for r in rows] if ni is not None else [None] * len(rows)
        attrs = json_objects(rows, layout.attributes)
        staged = list(zip(lines, keys, stored, names, gone, normalized, attrs, strict=True))
        if rejected:
            invalid += len(rejected)
            drop = set(rejected)
            staged = [row for i, row in enumerate(staged) if i not in drop]
        backend.add(staged, rejects)
        if progress is not None:
            progress(stream.position, size)
    if progress is not None:
        progress(size, size)
    return {"read": read, "invalid": invalid}


def json_objects(rows: list[list[str]], columns: list[tuple[int, str]]) -> list[str]:
    """Each row's attribute columns as the text of a JSON object; an empty cell adds no key. Built column by
    column with json's C string encoder (building it in SQL cost a third of the recipient insert)."""
    if not columns:
        return ["{}"] * len(rows)
    pairs = []
    for i, name in columns:
        key = _encode(name) + ":"
        pairs.append([key + _encode(r[i]) if r[i] else None for r in rows])
    objects = zip(*pairs, strict=True)
    return ["{" + ",".join(t) + "}" if None not in t else "{" + ",".join(filter(None, t)) + "}" for t in objects]


# ---------------------------------------------------------------------------------------------- rejects


def list_rejects(session: Session, job_id: int) -> list[ImportReject]:
    return list(
        session.exec(select(ImportReject).where(ImportReject.job_id == job_id).order_by(col(ImportReject.line))).all()
    )


def write_rejects_csv(session: Session, job: Job, out: IO[str]) -> int:
    """The rejected rows under the file's own header, as they stood: fix them and import the file again."""
    layout = CsvLayout.from_args(job.args["layout"])
    out.write(format_row(layout.header, layout.delimiter) + "\n")
    n = 0
    for reject in list_rejects(session, job.id or 0):
        out.write(reject.raw + "\n")
        n += 1
    return n
