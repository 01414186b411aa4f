"""The SQL side of an import: stage every row, then apply the file's addresses in short, committed segments.

While the file is read, its good rows (imports.rows.StagedRow) are staged into a temporary table and its rejected
rows into another; that takes no lock of the database (temporary tables live apart from it). Then the rows are
deduplicated and sorted by address, keeping the first line of each (`sort`: the rows left out are the file's
duplicates), the rejected rows are stored, and the addresses are applied in segments: ranges of addresses in that
order, each one transaction that also records the job's progress (the last address applied and the counts so far).
Since an address is in one segment only, each segment's counts are exact on their own, and a run that stops, for
whatever reason, leaves a consistent result: the next run stages the file again and applies only the addresses
after the last one applied. Segments are sized from the last one so that each holds its locks about `hold_seconds`:
an opt-out typed during a million-row import waits at most about that long, and the worker can renew its lease in
between. A segment that cannot have a lock soon (`Busy`) gives everything back and tries again.

Each segment, in one transaction:
1. check that this run still holds the job (a run that lost its lease commits nothing) and that its group or
   campaign still exists (and keep it from being deleted until the commit); keep other writers of recipients out
   (SQLite: the write lock; PostgreSQL: table locks, see postgres.py) and `forget` with them;
2. if someone was forgotten since the import started, mark their staged rows (what the parsing side knew was
   staged as `gone` already);
3. with --update-existing, update the recipients the segment's addresses already have;
4. create a recipient for each new address that may be added, and make the new recipients members (the database's
   own part: sqlite.py, postgres.py); an address neither gone nor created had a recipient already: those that may
   be added become members too, unless they are already, and a pending one (an unconfirmed sign-up) becomes active
   (the only statements that look addresses up again, and only when the segment has such an address);
5. record the progress with the job (the last segment: the counts, and the staged file deleted).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from campaign_manager.audience import consent
from campaign_manager.audience.address_keys import email_hash, email_key
from campaign_manager.audience.addresses import check_email, sql_plain_normalized
from campaign_manager.errors import CmError, NotFound
from campaign_manager.imports.csvfile import unquote_cells
from campaign_manager.imports.rows import Batch, Reject, StagedRow, columns, create_table
from campaign_manager.jobs.runner import JobLost
from campaign_manager.states import JobStatus

log = logging.getLogger(__name__)

# The most rows a segment applies, unless `import.segment_rows` says otherwise (then that is the most, and the
# first). Segments start at FIRST_ROWS and are sized from the last one to hold their locks about `hold_seconds`.
SEGMENT_ROWS = {"sqlite": 200_000, "postgresql": 200_000}
FIRST_ROWS = 25_000
MIN_SEGMENT_ROWS = 2_000
BUSY_PAUSE_S = 0.05  # between a segment that found a lock taken and its next try
REJECTS_PER_COMMIT = 20_000
# What the segments add up; the job's counts are these plus what reading and sorting the file tell: `read`,
# `invalid` and `duplicates` (rows whose address an earlier line of the file gave).
APPLIED = ("created", "updated", "added", "already_member", "suppressed")
COUNTS = ("read", "created", "updated", "added", "already_member", "duplicates", "invalid", "suppressed")

# An address of the segment (at positions ? to ?) that had a recipient before it (id up to ?), and that recipient.
EXISTING = (
    "cm_sorted u JOIN recipient r ON r.email_key = u.key WHERE u.pos BETWEEN ? AND ? AND u.gone = 0 AND r.id <= ?"
)
# Of those, how many may not be added, and how many are pending (to admit, which is rare), in one statement.
_REFUSED, _PENDING = f"NOT {consent.sql_may_add('r.status', 'u.gone')}", consent.sql_is_pending("r.status")
TALLY = f"SELECT count(*) FILTER (WHERE {_REFUSED}), count(*) FILTER (WHERE {_PENDING}) FROM {EXISTING}"


class Busy(Exception):
    """A lock the segment needs is held by someone else: it gave back what it held, and tries again."""


def stored_email(find: str) -> str:
    """The address a new recipient stores, from its staged row `u`: an address staged without `email` is its key;
    a plain (ASCII) one is staged as written, and email-validator's normalization of it is the domain lowercased;
    the others were staged normalized. `find` is the database's position-of-substring function."""
    plain = sql_plain_normalized("u.email", find)
    return f"CASE WHEN u.email IS NULL THEN u.key WHEN u.normalized = 1 THEN u.email ELSE {plain} END"


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as a dict: SQLite hands back text, psycopg already-decoded values."""
    return dict(json.loads(value) if isinstance(value, str | bytes) else value or {})


@dataclass
class Claim:
    """Who runs the job (its claim's fencing token): a segment commits only while the job is still theirs."""

    worker: str
    attempts: int


@dataclass(frozen=True)
class Target:
    """The group or campaign an import fills."""

    kind: str  # "group" or "campaign"
    id: int

    @property
    def table(self) -> str:
        return "recipient_group" if self.kind == "group" else "campaign"

    def link(self, ids: str, source: str) -> str:
        """The INSERT that makes the recipients `ids` selects `FROM source` (which ends in a WHERE clause) members;
        its first parameters are link_params."""
        if self.kind == "group":
            return f"INSERT INTO group_member (group_id, recipient_id, added_at) SELECT ?, {ids}, ? FROM {source}"
        return f"INSERT INTO campaign_recipient (campaign_id, recipient_id) SELECT ?, {ids} FROM {source}"

    def link_params(self, now: Any) -> tuple[Any, ...]:
        return (self.id, now) if self.kind == "group" else (self.id,)


class Applier:
    """Stage and apply one import job's rows, on a plain DB-API connection of its own: `start`, `add` every batch,
    `finish`, and always `close`. A subclass per database (sqlite.py, postgres.py) gives its connection, its
    locks, its staging and sorting, and the statements that create recipients."""

    dialect = ""
    hold_seconds = 0.5  # how long a segment should hold its locks
    # The statements that record the job's progress, with ? for parameters (as every statement here).
    merge_result = ""  # set keys of the job's result: (a JSON object, the job's id)
    set_counts = ""  # (the counts as JSON, the job's id)
    lock_job = "SELECT status, worker, attempts FROM job WHERE id = ?"  # keeps the job row for the transaction
    lock_target = ""  # " FOR KEY SHARE": keeps the target from being deleted until the transaction ends

    def __init__(
        self,
        engine: Any,
        job_id: int,
        args: dict[str, Any],
        *,
        segment_rows: int = 0,
        claim: Claim | None = None,
        forgotten: set[str] | None = None,
        forgotten_at: datetime | None = None,
    ) -> None:
        self.engine, self.job_id, self.args, self.claim = engine, job_id, args, claim
        self.target = Target(args["target"]["type"], int(args["target"]["id"]))
        self.max_rows = segment_rows or SEGMENT_ROWS[self.dialect]
        self.segment_rows = segment_rows or min(self.max_rows, FIRST_ROWS)
        self.forgotten = set(forgotten or ())  # what the parsing side knew: its rows came staged as gone
        self.late: set[str] = set()  # hashes of people forgotten since, looked for in every segment
        self.forgotten_at = forgotten_at or datetime.now(UTC)
        self.read = self.invalid = self.staged = self.duplicates = 0
        self.applied = dict.fromkeys(APPLIED, 0)  # what the committed segments did
        self.last_key: str | None = None  # the last address a committed segment applied
        self.rejects_line = 0  # rejected rows through this line are stored
        self.segments = 0
        self.max_lock = 0.0
        self.now: Any = None
        self.raw: Any = self.connect()
        self.cur: Any = self.raw.cursor()

    # -- reading ----------------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any] | None:
        """The stored counts if a run before this one finished the job; otherwise get ready to stage its rows,
        resuming after what an earlier run committed."""
        self.open_session()
        row = self.sql("SELECT result, counts FROM job WHERE id = ?", (self.job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {self.job_id}")
        result = _json(row[0])
        if result.get("committed"):
            self.raw.rollback()
            return _json(row[1])  # a run before us finished; do not apply twice
        resume = result.get("resume") or {}
        self.last_key, self.segments = resume.get("key"), int(resume.get("segments", 0))
        self.rejects_line = int(resume.get("rejects_line", 0))
        applied = resume.get("applied") or {}
        self.applied.update({key: int(applied.get(key, 0)) for key in APPLIED})
        self._check_target()  # fail at once, before reading a file for a group that is gone
        self.now = self.timestamp(datetime.now(UTC))
        self.raw.commit()
        self.sql(create_table("cm_staged", StagedRow))
        self.sql(create_table("cm_rejects", Reject))
        return None

    def add(self, batch: Batch) -> None:
        """Stage a batch (its good rows, and its rejected ones)."""
        self.read += batch.read
        self.invalid += len(batch.rejects)
        self.staged += len(batch.rows)
        if batch.rows:
            self.insert_rows("cm_staged", columns(StagedRow), batch.rows)
        if batch.rejects:
            self.insert_rows("cm_rejects", columns(Reject), batch.rejects)

    # -- applying ---------------------------------------------------------------------------------------------

    def finish(self, progress: Callable[[float], None] | None = None) -> dict[str, int]:
        """Sort the staged rows, store the rejected ones, apply the addresses in segments; the job's counts.
        `progress(share applied)` is called after each commit (a worker that gives the job back stops there)."""
        self.raw.commit()  # the staging
        positions = self.sort()
        self.duplicates = self.staged - positions
        self._store_rejects(progress)
        first = self._first_position(positions)
        while True:
            last = min(first + self.segment_rows - 1, positions)
            counts = self._apply(first, last, final=last >= positions)
            if last >= positions:
                break
            first = last + 1
            if progress is not None:
                progress(last / positions)
        self._finished()
        return counts

    def _first_position(self, positions: int) -> int:
        """Where this run starts applying: after the last address a committed segment applied."""
        if self.last_key is None:
            return 1
        found = self.scalar("SELECT pos FROM cm_sorted WHERE key > ? ORDER BY pos LIMIT 1", (self.last_key,))
        return positions + 1 if found is None else int(found)

    def _store_rejects(self, progress: Callable[[float], None] | None) -> None:
        """The rejected rows, into import_reject, a few thousand a transaction (a broken file can have millions:
        never one long hold of the lock); the progress says how far, so a resumed run does not store them twice."""
        while True:
            through = self.scalar(
                "SELECT max(line) FROM (SELECT line FROM cm_rejects WHERE line > ? ORDER BY line"
                f" LIMIT {REJECTS_PER_COMMIT}) chunk",
                (self.rejects_line,),
            )
            if through is None:
                return
            self.begin()
            try:
                self._check_still_ours(writing="rejects")
                self._recheck_forgotten()
                rejects = self.sql(
                    f"SELECT {columns(Reject)} FROM cm_rejects WHERE line > ? AND line <= ?",
                    (self.rejects_line, through),
                ).fetchall()
                if self.late:
                    rejects = [r for r in rejects if not self._names_forgotten(r[1])]
                if rejects:
                    rows = [(self.job_id, *reject) for reject in rejects]
                    self.insert_rows("import_reject", f"job_id, {columns(Reject)}", rows)
                self._record({"rejects_line": through})
                self.raw.commit()
            except BaseException:
                self.raw.rollback()
                raise
            self.rejects_line = int(through)
            if progress is not None:
                progress(0.0)

    def _apply(self, first: int, last: int, *, final: bool) -> dict[str, int]:
        """Apply the addresses at positions first..last in one transaction (see the module's docstring), tried
        again as long as a lock it needs is taken. What the run has applied changes only once it has committed."""
        while True:
            try:
                return self._segment(first, last, final=final)
            except Busy:
                time.sleep(BUSY_PAUSE_S)  # who waited behind the segment goes first

    def _segment(self, first: int, last: int, *, final: bool) -> dict[str, int]:
        applied = dict(self.applied)
        key = self.last_key
        started = self.begin()
        try:
            self._check_still_ours(writing="recipients")
            self._recheck_forgotten(first, last)
            if first <= last:
                self._apply_rows(first, last, applied)
                key = self.scalar("SELECT key FROM cm_sorted WHERE pos = ?", (last,))
            counts = {"read": self.read, "invalid": self.invalid, "duplicates": self.duplicates, **applied}
            counts = {name: counts[name] for name in COUNTS}
            if final:
                self.sql("DELETE FROM job_file WHERE job_id = ?", (self.job_id,))
                self.sql(self.set_counts, (json.dumps(counts), self.job_id))
                self._record({"committed": True, "segments": self.segments + 1})
            else:
                resume = {"key": key, "segments": self.segments + 1, "rejects_line": self.rejects_line}
                self._record({"resume": {**resume, "applied": applied}, "partial": counts})
            self.raw.commit()
        except BaseException:
            self.raw.rollback()
            raise
        held = time.perf_counter() - started
        self.applied, self.last_key, self.segments = applied, key, self.segments + 1
        self.checkpoint()
        self._size_next(held, last - first + 1)
        return counts

    def _apply_rows(self, first: int, last: int, applied: dict[str, int]) -> None:
        """Create, update and add the addresses at positions first..last; what they did goes into `applied`.
        An import changes no status but a pending one's (admitted): who may not be added now could not be before."""
        gone = int(self.scalar("SELECT coalesce(sum(gone), 0) FROM cm_sorted WHERE pos BETWEEN ? AND ?", (first, last)))
        if self.args.get("update_existing"):
            applied["updated"] += self.update_existing(first, last)
        # Nobody else writes recipients until the commit, so the ids above this one are the segment's new ones.
        before = int(self.scalar("SELECT coalesce(max(id), 0) FROM recipient"))
        created = self.create_recipients(first, last, before)
        existing = (last - first + 1) - gone - created  # addresses that had a recipient: looked up only if any
        refused = linked = 0
        if existing:
            refused, pending = (int(n) for n in self.sql(TALLY, (first, last, before)).fetchone())
            if pending:
                self._admit_pending(first, last, before)
            may_add = consent.sql_may_add("r.status", "u.gone")
            link = self.target.link("r.id", f"{EXISTING} AND {may_add} ON CONFLICT DO NOTHING")
            linked = self.sql(link, (*self.target.link_params(self.now), first, last, before)).rowcount
        applied["created"] += created
        applied["added"] += created + linked
        applied["suppressed"] += gone + refused
        applied["already_member"] += existing - refused - linked

    def _admit_pending(self, first: int, last: int, before: int) -> None:
        """The segment's pending recipients (unconfirmed sign-ups, rare) become active, each with its consent event."""
        activate, record = consent.SQL_ADMIT
        found = f"SELECT r.id, r.email_key FROM {EXISTING} AND {_PENDING}"
        for rid, key in self.sql(found, (first, last, before)).fetchall():
            if self.sql(activate, (self.now, rid)).rowcount:
                self.sql(record, consent.admit_event_params(rid, key, source=f"import job {self.job_id}", now=self.now))

    def _record(self, values: dict[str, Any]) -> None:
        """Set these keys of the job's result (in the transaction in progress)."""
        self.sql(self.merge_result, (json.dumps(values), self.job_id))

    def _check_still_ours(self, *, writing: str) -> None:
        """Inside a transaction: the job is still this run's, its target still exists, and who must be kept out
        until the commit is: `forget` while rejected rows are stored, and every writer of recipients too while
        `recipients` are."""
        row = self.sql(self.lock_job, (self.job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {self.job_id} no longer exists")
        if self.claim is not None and tuple(row) != (JobStatus.RUNNING, self.claim.worker, self.claim.attempts):
            raise JobLost
        self._check_target(lock=self.lock_target)
        self.hold_writers(recipients=writing == "recipients")

    def _check_target(self, *, lock: str = "") -> None:
        """The group or campaign the import fills still exists (a permanent failure if not: no retry brings it
        back). With `lock`, it stays until the transaction ends: on SQLite, whose import connection does not check
        foreign keys, the write lock keeps it."""
        if self.scalar(f"SELECT id FROM {self.target.table} WHERE id = ?{lock}", (self.target.id,)) is None:
            what = f"{self.target.kind} {self.target.id}"
            raise CmError(f"{what} no longer exists", hint="it was deleted after the import was queued")

    def _recheck_forgotten(self, first: int = 0, last: int = -1) -> None:
        """People forgotten since this import started: their staged rows at positions first..last count as
        suppressed, and their rejected rows are not stored (the usual case: nobody was, and this is one query)."""
        since = self.timestamp(self.forgotten_at - timedelta(minutes=5))  # clocks of other machines may differ
        found = {h for (h,) in self.sql(consent.sql_forgotten_since(), (since,))}
        self.late |= found - self.forgotten
        if not self.late or first > last:
            return
        staged = self.sql("SELECT pos, key FROM cm_sorted WHERE pos BETWEEN ? AND ? AND gone = 0", (first, last))
        for pos in [pos for pos, key in staged.fetchall() if email_hash(key) in self.late]:
            self.sql("UPDATE cm_sorted SET gone = 1 WHERE pos = ?", (pos,))

    def _names_forgotten(self, raw: str) -> bool:
        layout = self.args["layout"]
        fields = next(csv.reader([raw], delimiter=layout["delimiter"]), [])
        if len(fields) <= layout["email_index"]:
            return False
        normalized, reason = check_email(unquote_cells([fields[layout["email_index"]]])[0])
        return reason is None and email_hash(email_key(normalized)) in self.late

    def _size_next(self, held: float, rows: int) -> None:
        """Size the next segment from how long this one held the lock."""
        self.max_lock = max(self.max_lock, held)
        log.debug("import %d: segment of %d rows applied in %.3fs", self.job_id, rows, held)
        if rows and held > self.hold_seconds:
            self.segment_rows = max(MIN_SEGMENT_ROWS, int(rows * self.hold_seconds / held))
        elif rows >= self.segment_rows and held < self.hold_seconds / 2:
            self.segment_rows = min(self.max_rows, self.segment_rows * 2)

    def _finished(self) -> None:
        """After the last commit, note the longest segment transaction (`make bench` reports it)."""
        self.begin()
        self._record({"max_lock_seconds": round(self.max_lock, 3)})
        self.raw.commit()

    # -- the connection ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Roll back what is not committed and close the connection (its temporary tables go with it)."""
        if self.raw is None:
            return
        try:
            self.raw.rollback()
        finally:
            self.disconnect()
            self.raw = None

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        started = time.perf_counter()
        self.cur.execute(self.native(statement), params)
        log.debug("%.3fs %s", time.perf_counter() - started, statement[:100])
        return self.cur

    def scalar(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.sql(statement, params).fetchone()
        return None if row is None else row[0]

    # -- the database's part ----------------------------------------------------------------------------------

    def native(self, statement: str) -> str:
        """The statement in the driver's parameter style."""
        return statement

    def connect(self) -> Any:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    def open_session(self) -> None:
        """Session settings, before the first temporary table is touched."""

    def begin(self) -> float:
        """Start a transaction that writes cm's tables; its start time."""
        return time.perf_counter()

    def hold_writers(self, *, recipients: bool) -> None:
        """Keep `forget` out until the transaction commits, and with `recipients` every other writer of recipients
        (SQLite's write lock does both); raises Busy if it cannot soon."""

    def checkpoint(self) -> None:
        """After a segment's commit."""

    def timestamp(self, now: datetime) -> Any:
        return now

    def insert_rows(self, table: str, names: str, rows: list[Any]) -> None:
        """Insert rows (tuples of the columns `names`) into `table`."""
        raise NotImplementedError

    def sort(self) -> int:
        """cm_sorted: the first staged row of each address, in address order, numbered from 1 in `pos`; how many."""
        raise NotImplementedError

    def create_recipients(self, first: int, last: int, before: int) -> int:
        """Create a recipient for each address at positions first..last that has none and is not gone (from its
        first line; the new ones get ids above `before`), and make them members of the target; how many."""
        raise NotImplementedError

    def update_existing(self, first: int, last: int) -> int:
        """--update-existing: overwrite the stored name and attributes of the active recipients the addresses at
        positions first..last already have; how many changed."""
        raise NotImplementedError
