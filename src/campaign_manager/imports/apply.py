"""The SQL side of an import: stage every row, then apply them in short, committed segments of addresses.

While the file is read, its good rows are staged into a temporary table and its rejected rows into another; that
takes no lock of the database (temporary tables live in a database of their own). Then the rows are sorted by
address (and line), the rejected rows are stored, and the sorted rows are applied in segments: ranges of addresses,
each holding every row of its addresses, each one transaction that also records the job's progress (the last
address applied and the counts so far). Because no address spans two segments, each segment's counts are exact on
their own (a duplicate in the file is always in the segment of its first line), and a run that stops, for whatever
reason, leaves a consistent result: the next run stages the file again and applies only the addresses after the
last one applied. On SQLite only a segment's transaction holds the write lock, and segments are sized from the last
one so that it is held about LOCK_TARGET_S at a time: an opt-out typed during a million-row import waits at most
about that long, and the worker can renew its lease in between.

Each segment, in one transaction:
1. check that this run still holds the job (a run that lost its lease commits nothing) and that its group or
   campaign still exists; on PostgreSQL take a SHARE lock on `suppression`, so that no `forget` runs meanwhile;
2. if someone was forgotten since the import started, mark their staged rows (what the parsing side knew was
   staged as `gone` already);
3. count its rows, addresses, and addresses suppressed (forgotten or opted out);
4. with --update-existing, update recipients that existed before the import, from the first line of each address;
5. create the recipients that do not exist (the first line of an address wins) and add the active ones to the
   group or campaign;
6. record the progress with the job (the last segment: the counts, and the staged file deleted).
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
from campaign_manager.imports.parse import Batch
from campaign_manager.jobs.runner import JobLost
from campaign_manager.states import JobStatus

log = logging.getLogger(__name__)

# The most rows a segment applies, unless `import.segment_rows` says otherwise (then that is the most, and the
# first). SQLite segments start at FIRST_SQLITE_ROWS and are sized from the last one to hold the write lock about
# LOCK_TARGET_S; PostgreSQL, which has no such lock, applies them at the most.
SEGMENT_ROWS = {"sqlite": 200_000, "postgresql": 200_000}
FIRST_SQLITE_ROWS = 25_000
LOCK_TARGET_S = 0.5
MIN_SEGMENT_ROWS = 2_000
REJECTS_PER_COMMIT = 20_000
# What a segment adds up; the job's counts are these plus `read` and `invalid` (which the reading of the file knows).
APPLIED = ("created", "updated", "added", "already_member", "duplicates", "suppressed")
COUNTS = ("read", "created", "updated", "added", "already_member", "duplicates", "invalid", "suppressed")


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as a dict: SQLite hands back text, psycopg already-decoded values."""
    return dict(json.loads(value) if isinstance(value, str | bytes) else value or {})


@dataclass
class Claim:
    """Who runs the job (its claim's fencing token): a segment commits only while the job is still theirs."""

    worker: str
    attempts: int


class Backend:
    """Stage and apply one import job's rows, on a plain DB-API connection of its own: `start`, `add` every batch,
    `finish`, and always `close`."""

    dialect = ""
    # A large import is parsed by a helper process (import_parse.ParseProcess); every Nth batch of it is validated
    # by the job's process instead, when that has time to spare (0: never).
    helper_share = 0

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
        self.max_rows = segment_rows or SEGMENT_ROWS[self.dialect]
        self.segment_rows = segment_rows or min(self.max_rows, self.first_rows_auto)
        self.forgotten = set(forgotten or ())  # what the parsing side knew: its rows came staged as gone
        self.late: set[str] = set()  # hashes of people forgotten since, looked for in every segment
        self.forgotten_at = forgotten_at or datetime.now(UTC)
        self.read = self.invalid = 0
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
        self.applied.update(resume.get("applied") or {})
        self._check_target()  # fail at once, before reading a file for a group that is gone
        self.now = self.timestamp(datetime.now(UTC))
        self.raw.commit()
        # email is NULL when it equals the key; attributes is the text of a JSON object.
        self.sql(
            "CREATE TEMP TABLE cm_seg (line INTEGER PRIMARY KEY, key TEXT NOT NULL, email TEXT, name TEXT,"
            " gone INTEGER NOT NULL, normalized INTEGER NOT NULL, attributes TEXT NOT NULL)"
        )
        self.sql("CREATE TEMP TABLE cm_rejects (line INTEGER NOT NULL, raw TEXT NOT NULL, reason TEXT NOT NULL)")
        return None

    def add(self, batch: Batch) -> None:
        """Stage a batch (its good rows, and its rejected ones)."""
        self.read += batch.read
        self.invalid += len(batch.rejects)
        if batch.rows:
            self.insert_rows("cm_seg", (), batch.rows)
        if batch.rejects:
            self.insert_rows("cm_rejects", (), batch.rejects)

    # -- applying ---------------------------------------------------------------------------------------------

    def finish(self, progress: Callable[[float], None] | None = None) -> dict[str, int]:
        """Sort the staged rows, store the rejected ones, apply the rows in segments; the job's counts.
        `progress(share applied)` is called after each commit (a worker that gives the job back stops there)."""
        self.raw.commit()  # the staging
        positions = self.sort()
        self._store_rejects(progress)
        first = self._first_position(positions)
        while True:
            last = self._segment_end(first, positions)
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
        found = self.scalar(
            f"SELECT {self.pos} FROM cm_sorted WHERE key > ? ORDER BY {self.pos} LIMIT 1", (self.last_key,)
        )
        return positions + 1 if found is None else int(found)

    def _segment_end(self, first: int, positions: int) -> int:
        """The last position of the segment starting at `first`: about segment_rows rows, extended to the end of
        its last address (so that no address spans two segments)."""
        end = first + self.segment_rows - 1
        if end >= positions:
            return positions
        key = self.scalar(f"SELECT key FROM cm_sorted WHERE {self.pos} = ?", (end,))
        after = self.scalar(
            f"SELECT {self.pos} FROM cm_sorted WHERE {self.pos} > ? AND key <> ? ORDER BY {self.pos} LIMIT 1",
            (end, key),
        )
        return positions if after is None else int(after) - 1

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
            self.lock()
            try:
                self._check_still_ours()
                self._recheck_forgotten()
                rejects = self.sql(
                    "SELECT line, raw, reason FROM cm_rejects WHERE line > ? AND line <= ?",
                    (self.rejects_line, through),
                ).fetchall()
                if self.late:
                    rejects = [r for r in rejects if not self._names_forgotten(r[1])]
                if rejects:
                    rows = [(self.job_id, *reject) for reject in rejects]
                    self.insert_rows("import_reject", ("job_id", "line", "raw", "reason"), rows)
                self._record({"rejects_line": through})
                self.raw.commit()
            except BaseException:
                self.raw.rollback()
                raise
            self.rejects_line = int(through)
            if progress is not None:
                progress(0.0)

    def _apply(self, first: int, last: int, *, final: bool) -> dict[str, int]:
        """Apply the rows at positions first..last in one transaction (see the module's docstring). What the run
        has applied changes only once it has committed."""
        applied = dict(self.applied)
        key = self.last_key
        locked = self.lock()
        try:
            self._check_still_ours()
            self._recheck_forgotten(first, last)
            if first <= last:
                self._apply_rows(first, last, applied)
                key = self.scalar(f"SELECT key FROM cm_sorted WHERE {self.pos} = ?", (last,))
            counts = {"read": self.read, "invalid": self.invalid, **applied}
            counts = {key: counts[key] for key in COUNTS}
            if final:
                self.sql("DELETE FROM job_file WHERE job_id = ?", (self.job_id,))
                self.sql(f"UPDATE job SET counts = {self.json_param} WHERE id = ?", (json.dumps(counts), self.job_id))
                self._record({"committed": True, "segments": self.segments + 1})
            else:
                resume = {"key": key, "segments": self.segments + 1, "rejects_line": self.rejects_line}
                self._record({"resume": {**resume, "applied": applied}, "partial": counts})
            self.raw.commit()
        except BaseException:
            self.raw.rollback()
            raise
        held = time.perf_counter() - locked
        self.applied, self.last_key, self.segments = applied, key, self.segments + 1
        self.checkpoint()
        self._size_next(held, last - first + 1)
        return counts

    def _record(self, values: dict[str, Any]) -> None:
        """Set these keys of the job's result (in the transaction in progress)."""
        self.sql(f"UPDATE job SET result = {self.merged_result} WHERE id = ?", (json.dumps(values), self.job_id))

    def _check_still_ours(self) -> None:
        """Inside a transaction: the job is still this run's, and its target still exists."""
        found = self.sql(f"SELECT status, worker, attempts FROM job WHERE id = ?{self.for_update}", (self.job_id,))
        row = found.fetchone()
        if row is None:
            raise NotFound(f"job {self.job_id} no longer exists")
        if self.claim is not None and tuple(row) != (JobStatus.RUNNING, self.claim.worker, self.claim.attempts):
            raise JobLost
        self._check_target(lock=self.key_share)
        self.hold_forgetting()

    def _check_target(self, *, lock: str = "") -> None:
        """The group or campaign the import fills still exists (a permanent failure if not: no retry brings it
        back). `lock` keeps it from being deleted until the transaction ends."""
        target = self.args["target"]
        table = "recipient_group" if target["type"] == "group" else "campaign"
        if self.scalar(f"SELECT id FROM {table} WHERE id = ?{lock}", (target["id"],)) is None:
            what = f"{target['type']} {target['id']}"
            raise CmError(f"{what} no longer exists", hint="it was deleted after the import was queued")

    def _recheck_forgotten(self, first: int = 0, last: int = -1) -> None:
        """People forgotten since this import started: their staged rows at positions first..last count as
        suppressed, and their rejected rows are not stored (the usual case: nobody was, and this is one query)."""
        since = self.timestamp(self.forgotten_at - timedelta(minutes=5))  # clocks of other machines may differ
        found = {h for (h,) in self.sql(consent.sql_forgotten_since(), (since,))}
        self.late |= found - self.forgotten
        if not self.late or first > last:
            return
        in_range = f"{self.pos} BETWEEN ? AND ?"
        keys = self.sql(f"SELECT DISTINCT key FROM cm_sorted WHERE {in_range} AND gone = 0", (first, last))
        for key in [k for (k,) in keys.fetchall() if email_hash(k) in self.late]:
            self.sql(f"UPDATE cm_sorted SET gone = 1 WHERE {in_range} AND key = ?", (first, last, key))

    def _names_forgotten(self, raw: str) -> bool:
        layout = self.args["layout"]
        fields = next(csv.reader([raw], delimiter=layout["delimiter"]), [])
        if len(fields) <= layout["email_index"]:
            return False
        normalized, reason = check_email(unquote_cells([fields[layout["email_index"]]])[0])
        return reason is None and email_hash(email_key(normalized)) in self.late

    def _apply_rows(self, first: int, last: int, applied: dict[str, int]) -> None:
        """Count, create and add the rows at positions first..last, into `applied`."""
        in_range = f"u.{self.pos} BETWEEN {int(first)} AND {int(last)}"
        # One pass for the counts. An import changes no one's status: who is opted out now was opted out before.
        rows, distinct, suppressed = self.sql(
            "SELECT count(*), count(DISTINCT u.key),"
            f" count(DISTINCT CASE WHEN NOT {consent.sql_may_add('r.status', 'u.gone')} THEN u.key END)"
            f" FROM cm_sorted u LEFT JOIN recipient r ON r.email_key = u.key WHERE {in_range}"
        ).fetchone()
        attrs = self.attributes
        if self.args.get("update_existing"):
            applied["updated"] += self._update_existing(in_range, attrs)
        applied["created"] += self.sql(
            "INSERT INTO recipient (email, email_key, name, phone, attributes, status, created_at, updated_at)"
            f" SELECT {self.normalized_email}, u.key, u.name, NULL, {attrs}, {consent.SQL_NEW_STATUS}, ?, ?"
            " FROM cm_sorted u"
            f" WHERE {in_range} AND u.gone = 0 ORDER BY u.{self.pos} ON CONFLICT (email_key) DO NOTHING",
            (self.now, self.now),
        ).rowcount
        self.analyze("recipient", first_only=True)
        target = self.args["target"]
        if target["type"] == "group":
            link = "INSERT INTO group_member (group_id, recipient_id, added_at) SELECT ?, r.id, ?"
            params: tuple[Any, ...] = (target["id"], self.now)
        else:
            link = "INSERT INTO campaign_recipient (campaign_id, recipient_id) SELECT ?, r.id"
            params = (target["id"],)
        added = self.sql(
            f"{link} FROM cm_sorted u JOIN recipient r ON r.email_key = u.key"
            f" WHERE {in_range} AND {consent.sql_may_add('r.status', 'u.gone')} ORDER BY u.{self.pos}"
            " ON CONFLICT DO NOTHING",
            params,
        ).rowcount
        applied["added"] += added
        applied["duplicates"] += int(rows) - int(distinct)
        applied["suppressed"] += int(suppressed)
        applied["already_member"] += int(distinct) - int(suppressed) - added

    @property
    def normalized_email(self) -> str:
        """An address staged without email is its key. A plain (ASCII) address is staged as written;
        email-validator's normalization of it is the domain lowercased. Others were staged normalized."""
        plain = sql_plain_normalized("u.email", self.find)
        return f"CASE WHEN u.email IS NULL THEN u.key WHEN u.normalized = 1 THEN u.email ELSE {plain} END"

    def _update_existing(self, in_range: str, attrs: str) -> int:
        """--update-existing: overwrite the stored name and attributes of active recipients that were there before
        the import, from the first line of each address. Returns how many changed."""
        first = self.first_rows.format(in_range=in_range)
        new_name = "COALESCE(u.name, recipient.name)"
        new_attrs = self.merged_attrs.format(attrs=attrs)
        old_attrs = self.merged_attrs.format(attrs="'{}'")
        return int(
            self.sql(
                f"UPDATE recipient SET name = {new_name}, attributes = {new_attrs}{self.to_json}, updated_at = ?"
                f" FROM {first} u WHERE recipient.email_key = u.key AND {consent.sql_may_add('recipient.status', '0')}"
                f" AND (recipient.name {self.differs} {new_name} OR {old_attrs} {self.differs} {new_attrs})",
                (self.now,),
            ).rowcount
        )

    def _size_next(self, held: float, rows: int) -> None:
        """Size the next segment from how long this one held the lock."""
        self.max_lock = max(self.max_lock, held)
        log.debug("import %d: segment of %d rows applied in %.3fs", self.job_id, rows, held)
        if not self.adaptive:
            return
        if rows and held > LOCK_TARGET_S:
            self.segment_rows = max(MIN_SEGMENT_ROWS, int(rows * LOCK_TARGET_S / held))
        elif rows >= self.segment_rows and held < LOCK_TARGET_S / 2:
            self.segment_rows = min(self.max_rows, self.segment_rows * 2)

    def _finished(self) -> None:
        """After the last commit, note the longest segment transaction (`make bench` reports it)."""
        self.lock()
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
        self.cur.execute(statement.replace("?", self.param), params)
        log.debug("%.3fs %s", time.perf_counter() - started, statement[:100])
        return self.cur

    def scalar(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.sql(statement, params).fetchone()
        return None if row is None else row[0]

    # -- dialect ----------------------------------------------------------------------------------------------

    param = "?"
    json_param = "?"
    find = "instr"  # the SQL function that finds a substring (SQLite instr, PostgreSQL strpos)
    pos = "rowid"  # the column of cm_sorted that numbers its rows in address order, from 1
    # update_existing's dialect pieces: the first staged row of each address in a range that is already a
    # recipient; the stored attributes with new ones merged in; a null-safe "differs"; the cast to the column.
    first_rows = ""
    merged_attrs = ""
    differs = ""
    to_json = ""
    attributes = "u.attributes"  # the staged attributes (JSON text) as the column's type
    adaptive = False  # whether segments are sized by how long they hold the lock
    first_rows_auto = 1 << 62  # the first segment's size when the setting is automatic (capped by max_rows)
    for_update = ""  # locks the job row for the segment's transaction
    key_share = ""  # keeps the target row from being deleted until the segment commits
    merged_result = ""  # the job's result with a JSON object's keys set

    def connect(self) -> Any:
        return self.engine.raw_connection()

    def disconnect(self) -> None:
        self.raw.invalidate()  # closes it rather than return it (and its temporary tables) to the pool

    def open_session(self) -> None:
        """Session settings, before the first temporary table is touched."""

    def lock(self) -> float:
        """Start a transaction that writes cm's tables (PostgreSQL has started one with the first statement);
        its start time."""
        return time.perf_counter()

    def hold_forgetting(self) -> None:
        """Keep `forget` out until the transaction commits (SQLite's write lock already does)."""

    def checkpoint(self) -> None:
        """After a segment's commit (SQLite: move the WAL into the database, without holding the lock)."""

    def timestamp(self, now: datetime) -> Any:
        return now

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def sort(self) -> int:
        """cm_sorted: the staged rows in address order (then line), numbered from 1 in `pos`; how many."""
        raise NotImplementedError

    def analyze(self, table: str, *, first_only: bool = False) -> None:
        """Refresh the planner's statistics (PostgreSQL plans for a table as it was when last analyzed)."""
