"""CSV imports into a group or a campaign's audience: staged when queued, run set-based when the job runs.

Staging (in the `cm` process that queues the job) refuses a file that cannot be imported at all and copies the
whole file into `job_file` chunks, so the worker never needs the original. Running (in a worker, or in-process
with `--wait`) streams those chunks through the CSV reader and validates each address (`import_parse`: in a
helper process on another core for a large file; fast path in `emails`); `import_sql` stages the good rows
(multi-row inserts on SQLite, COPY on PostgreSQL) and applies them with a handful of set-based statements in ONE
transaction, which also records the job's counts: a job re-run after a crash either finds that transaction
committed and returns its counts, or starts over.
"""

from __future__ import annotations

import codecs
import os
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
    CsvLayout,
    format_row,
    inspect_csv,
)
from campaign_manager.services.import_parse import BATCH_ROWS, CHUNK_BYTES, Batch, ParseProcess, parse

if TYPE_CHECKING:
    from campaign_manager.services.import_sql import Backend

KIND = "import"
# From this size (about 130,000 rows of a typical file) an import parses in a helper process.
HELPER_MIN_BYTES = 8 << 20
Progress = Callable[[int, int], None]


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
    size = int(args.get("size", 0))
    kind = SqliteBackend if is_sqlite(url) else PostgresBackend
    backend: Backend = kind(engine, job_id, args)
    helper: ParseProcess | None = None
    try:
        done = backend.start()
        if done is not None:
            return done
        chunks = _iter_chunks(url, job_id)
        batches: Iterator[Batch]
        if size >= HELPER_MIN_BYTES and (os.cpu_count() or 1) > 1:
            # The other core parses; on PostgreSQL the SQL thread then no longer contends for the GIL.
            helper = ParseProcess(layout, chunks, forgotten, BATCH_ROWS, kind.helper_share)
            batches = iter(helper)
        else:
            batches = parse(layout, chunks, forgotten, BATCH_ROWS)
        counts = _load(backend, batches, size, progress)
        return backend.finish(counts)
    finally:
        if helper is not None:
            helper.close()
        backend.close()


def _load(backend: Backend, batches: Iterator[Batch], size: int, progress: Progress | None) -> dict[str, int]:
    """Stage every batch; the counts of rows read and rejected as invalid."""
    read = invalid = 0
    for batch in batches:
        read += batch.read
        invalid += len(batch.rejects)
        backend.add(batch.rows, batch.rejects)
        if progress is not None:
            progress(batch.position, size)
    if progress is not None:
        progress(size, size)
    return {"read": read, "invalid": invalid}


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
