"""CSV imports into a group or a campaign's audience: staged when queued, run set-based when the job runs.

Staging (in the `cm` process that queues the job) refuses a file that cannot be imported at all and copies the whole
file into `job_file` chunks, so the worker never needs the original. Running (in a worker, or in-process with
`--wait`) streams those chunks through the CSV reader and validates each address (`parse`; fast path in
`audience.addresses`) into typed rows (`rows`); the appliers (`apply`, `sqlite`, `postgres`) stage the good rows
(multi-row inserts on SQLite, COPY on PostgreSQL) and apply them with a handful of set-based statements per
segment, each segment one transaction that also records the job's progress: a job run again after a
crash (or an interruption, or `cm jobs retry`) goes on after its last committed segment, or finds itself finished
and returns its counts. The rejected rows are read back (and written out, neutralised for spreadsheets) from here
too.
"""

from __future__ import annotations

import codecs
import csv
import io
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from campaign_manager.audience import consent
from campaign_manager.audience.groups import get_group
from campaign_manager.db import get_engine, is_sqlite
from campaign_manager.errors import InvalidInput, NotFound
from campaign_manager.files import open_input
from campaign_manager.imports.apply import Applier, Claim
from campaign_manager.imports.csvfile import CUT_NOTE, SAMPLE_BYTES, CsvLayout, inspect_csv, neutralise, split_row
from campaign_manager.imports.parse import BATCH_ROWS, CHUNK_BYTES, parse
from campaign_manager.imports.postgres import PostgresApplier
from campaign_manager.imports.sqlite import SqliteApplier
from campaign_manager.jobs import runner
from campaign_manager.jobs.records import create_job, get_job
from campaign_manager.sending.campaigns import get_campaign
from campaign_manager.tables.base import utcnow
from campaign_manager.tables.jobs import ImportReject, Job, JobFile

KIND = "import"
HALF = 500  # a job's progress goes from 0 to 2 * HALF
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
    if (group is None) == (campaign_id is None):
        raise ValueError("an import targets exactly one group or campaign")
    target = _target(session, group, campaign_id)
    stream, name = _open_source(source, stdin)
    try:
        return _stage(session, stream, name, target, encoding, delimiter, email_column, update_existing)
    finally:
        if stream is not stdin and stream is not sys.stdin.buffer:
            stream.close()


def stage_upload(
    session: Session,
    stream: IO[bytes],
    name: str,
    *,
    group: str | int | None = None,
    campaign_id: int | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    email_column: str | None = None,
    update_existing: bool = False,
) -> Job:
    """`stage_import` of a file already open (an upload to `cm serve`), called `name` in the job and its messages;
    the caller closes it. Exactly one of `group` and `campaign_id`, else InvalidInput."""
    if (group is None) == (campaign_id is None):
        raise InvalidInput("an import goes into exactly one group or campaign: give one of them")
    if campaign_id is not None:
        get_campaign(session, campaign_id)
    target = _target(session, group, campaign_id)
    return _stage(session, stream, name, target, encoding, delimiter, email_column, update_existing)


def stage_addresses(session: Session, emails: Sequence[str], name: str, *, campaign_id: int) -> Job:
    """An import job of a list of addresses (the REST API's `recipient_emails` of a new campaign) into a campaign's
    audience: the same job, consent rules and counts as a CSV file's, one address a row."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["email"])
    writer.writerows([email] for email in emails)
    stream = io.BytesIO(text.getvalue().encode())
    get_campaign(session, campaign_id)
    return _stage(session, stream, name, _target(session, None, campaign_id), "utf-8", ",", "email", False)


def _target(session: Session, group: str | int | None, campaign_id: int | None) -> dict[str, Any]:
    if group is not None:
        grp = get_group(session, group)
        return {"type": "group", "id": grp.id, "name": grp.name}
    return {"type": "campaign", "id": campaign_id}


def _stage(
    session: Session,
    stream: IO[bytes],
    name: str,
    target: dict[str, Any],
    encoding: str | None,
    delimiter: str | None,
    email_column: str | None,
    update_existing: bool,
) -> Job:
    head = _read_full(stream, SAMPLE_BYTES + 1)  # one byte more tells whether the sample is the whole file
    layout = inspect_csv(head, name=name, encoding=encoding, delimiter=delimiter, email_column=email_column)
    args = {
        "source": name,
        "target": target,
        "layout": layout.to_args(),
        "update_existing": update_existing,
    }
    job = create_job(session, KIND, args)
    size = _copy_chunks(session, job, head, stream, layout.encoding, name)
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


def _iter_chunks(url: str, job_id: int, size: int) -> Generator[bytes]:
    """One chunk at a time, each by its own query, so memory stays flat however large the file."""
    with Session(get_engine(url, write=False)) as session:
        seq = 0
        while True:
            data = session.exec(select(JobFile.data).where(JobFile.job_id == job_id, JobFile.seq == seq)).first()
            if data is None:
                if seq == 0 and size:
                    raise NotFound(f"the staged file of job {job_id} was purged", hint="import the file again")
                return
            yield data
            seq += 1
            session.rollback()  # end the read snapshot between chunks: never pin the WAL for the whole import


def run_import_job(url: str, job_id: int, progress: Progress | None = None) -> dict[str, Any]:
    """The job handler: run an import job, or resume it after its last committed segment. Returns its counts."""
    engine = get_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.result.get("committed"):
            return dict(job.counts)
        args = dict(job.args)
        forgotten_at = utcnow()
        forgotten = consent.suppressed_hashes(session)
    layout = CsvLayout.from_args(args["layout"])
    size = int(args.get("size", 0))
    kind = SqliteApplier if is_sqlite(url) else PostgresApplier
    claim, settings = runner.current_claim(), runner.current_settings()
    applier: Applier = kind(
        engine,
        job_id,
        args,
        segment_rows=0 if settings is None else settings.imports.segment_rows,
        claim=None if claim is None else Claim(*claim),
        forgotten=forgotten,
        forgotten_at=forgotten_at,
    )
    chunks: Generator[bytes] | None = None
    try:
        done = applier.start()
        if done is not None:
            return done
        chunks = _iter_chunks(url, job_id, size)
        # Progress: the first half of the bar reads the file, the second applies it.
        for batch in parse(layout, chunks, forgotten, BATCH_ROWS):
            applier.add(batch)
            if progress is not None:
                progress(batch.position * HALF // max(size, 1), 2 * HALF)
        return applier.finish(None if progress is None else lambda share: progress(HALF + int(share * HALF), 2 * HALF))
    finally:
        if chunks is not None:
            chunks.close()  # its read session, now rather than whenever the generator is collected
        applier.close()


# ---------------------------------------------------------------------------------------------- rejects


REJECTS_PAGE = 1_000


def iter_rejects(session: Session, job_id: int) -> Iterator[ImportReject]:
    """The rows a job rejected, in file order, a page at a time (a broken file can have millions)."""
    after: tuple[int, int] = (-1, -1)
    while True:
        page = session.exec(
            select(ImportReject)
            .where(
                ImportReject.job_id == job_id,
                sa.tuple_(col(ImportReject.line), col(ImportReject.id)) > sa.tuple_(*after),
            )
            .order_by(col(ImportReject.line), col(ImportReject.id))
            .limit(REJECTS_PAGE)
        ).all()
        yield from page
        if len(page) < REJECTS_PAGE:
            return
        after = (page[-1].line, page[-1].id or 0)


def rejects_page(session: Session, job_id: int, *, after: int = 0, limit: int) -> list[ImportReject]:
    """One page of an import job's rejected rows (the REST API's listing): lines after `after`, in file order, at
    most `limit` (a line is a row's key within its job: the import stores and resumes its rejects by it)."""
    _import_job(session, job_id)
    return list(
        session.exec(
            select(ImportReject)
            .where(ImportReject.job_id == job_id, col(ImportReject.line) > after)
            .order_by(col(ImportReject.line))
            .limit(limit)
        ).all()
    )


def _import_job(session: Session, job_id: int) -> Job:
    job = get_job(session, job_id)
    if job.kind != KIND:
        raise InvalidInput(f"job {job_id} is a {job.kind} job; only imports have rejected rows")
    return job


def write_rejects(session: Session, job_id: int, out: IO[str]) -> int:
    """`cm jobs show --rejects`: one CSV row per rejected row (line, reason, the row as written). Every cell that
    a spreadsheet would run as a formula is written behind a '. Returns how many rows."""
    _import_job(session, job_id)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["line", "reason", "row"])
    n = 0
    for reject in iter_rejects(session, job_id):
        writer.writerow([str(reject.line), neutralise(reject.reason), neutralise(reject.raw)])
        n += 1
    return n


def write_rejects_file(session: Session, job_id: int, out: IO[str]) -> tuple[int, int]:
    """`cm jobs show --rejects-file`: the rejected rows under the file's own header and in its delimiter, to fix and
    import again (every cell a spreadsheet would run as a formula behind a ', which the import removes: importing
    the file unchanged gives the same rejects). A row too long to have been kept whole cannot be fixed from here
    and is left out. Returns how many rows were written, and how many left out."""
    job = _import_job(session, job_id)
    layout = CsvLayout.from_args(job.args["layout"])
    writer = csv.writer(out, delimiter=layout.delimiter, lineterminator="\n")
    writer.writerow([neutralise(cell) for cell in layout.header])
    written = cut = 0
    for reject in iter_rejects(session, job_id):
        if reject.reason.endswith(CUT_NOTE):
            cut += 1
            continue
        writer.writerow([neutralise(cell) for cell in split_row(reject.raw, layout.delimiter)])
        written += 1
    return written, cut
