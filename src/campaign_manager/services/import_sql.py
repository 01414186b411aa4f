"""The SQL side of an import: staging rows, then applying them in short, committed segments.

Rows are staged into a temporary table as they arrive. Every `segment_rows` rows, and once at the end, the segment
is applied in ONE transaction that also records the job's progress (the last line applied and the counts so far),
so a run that stops, whatever the reason, leaves a consistent result that the next run resumes from, with exact
counts. On SQLite only the apply holds the write lock (staging writes the temporary database, which needs none),
and segments are sized from the last one so that the lock is held about half a second at a time: an opt-out
typed during a million-row import waits at most that long, and the worker can renew its lease in between. On
PostgreSQL every statement runs on a thread of its own, which holds the connection, so the server applies one
segment while this process reads and validates the next (psycopg releases the GIL while it waits).

Each segment, in one transaction:
1. check that this run still holds the job (a run that lost its lease commits nothing) and that its group or
   campaign still exists; on PostgreSQL take a SHARE lock on `suppression`, so no `forget` runs meanwhile;
2. if someone was forgotten since the import started, mark their staged rows (and drop their rejected rows);
3. count the segment's addresses new to this import, and those of them suppressed (forgotten or opted out);
4. with --update-existing, update recipients that existed before the import, from the first line of each address;
5. create the recipients that do not exist (the first line of an address wins), add the active ones to the group or
   campaign, remember the segment's addresses in `import_key` (unless it is the last), store its rejected rows;
6. record the progress with the job (the last segment: the counts, and the staged file deleted).
"""

from __future__ import annotations

import csv
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any

from campaign_manager.errors import CmError, NotFound
from campaign_manager.services.csvfile import unquote_cells
from campaign_manager.services.emails import check_email, email_hash
from campaign_manager.services.import_parse import Batch
from campaign_manager.services.jobs import JobLost

log = logging.getLogger(__name__)

# Rows per segment, unless `import.segment_rows` says otherwise. PostgreSQL: large enough that per-segment
# statements cost little, small enough that the server works while the rest is parsed (1,000,000 rows: 25.6 s with
# 200,000, 29.4 s with 50,000). SQLite: the first segment's size; the next ones are sized to hold the lock about
# LOCK_TARGET_S.
SEGMENT_ROWS = {"sqlite": 100_000, "postgresql": 200_000}
LOCK_TARGET_S = 0.5
MIN_SEGMENT_ROWS = 2_000
# Batches the parsing side may queue ahead of the SQL thread: memory stays bounded (~20 MB of rows).
QUEUE_TASKS = 12
COUNT_KEYS = ("read", "created", "updated", "added", "already_member", "duplicates", "invalid", "suppressed")
_TOTALS = ("read", "invalid", "staged", "distinct", "suppressed", "created", "updated", "added")


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as a dict: SQLite hands back text, psycopg already-decoded values."""
    return dict(json.loads(value) if isinstance(value, str | bytes) else value or {})


def counts_of(totals: dict[str, int]) -> dict[str, int]:
    """What `cm jobs show` reports, from the running totals."""
    t = totals
    return {
        "read": t["read"],
        "created": t["created"],
        "updated": t["updated"],
        "added": t["added"],
        "already_member": t["distinct"] - t["suppressed"] - t["added"],
        "duplicates": t["staged"] - t["distinct"],
        "invalid": t["invalid"],
        "suppressed": t["suppressed"],
    }


@dataclass
class Claim:
    """Who runs the job (its claim's fencing token): a segment commits only while the job is still theirs."""

    worker: str
    attempts: int


@dataclass
class _Segment:
    """What has been staged since the last commit."""

    rows: int = 0
    read: int = 0
    rejects: list[tuple[int, str, str]] = field(default_factory=list)
    last_line: int = 0


class Backend:
    """Stage and apply one import job's rows. The public methods are called from the job's thread; with
    `threaded`, they hand the work to the SQL thread, where `run` waits for an answer and `submit` does not (a
    failure surfaces on the next call)."""

    threaded = True
    dialect = ""
    # A large import is parsed by a helper process (import_parse.ParseProcess); every Nth batch of it is validated
    # by the job's process instead, when that has time to spare (0: never).
    helper_share = 0

    param = "?"
    json_param = "?"
    # The SQL function that finds a substring (SQLite instr, PostgreSQL strpos).
    find = "instr"
    # update_existing's dialect pieces: the first staged row of each address new to this import that is already
    # a recipient; the stored attributes with new ones merged in; a null-safe "differs"; the cast to the column.
    first_rows = ""
    merged_attrs = ""
    differs = ""
    to_json = ""
    # The staged attributes (JSON text) as the column's type.
    attributes = "u.attributes"

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
        self.segment_rows = segment_rows or SEGMENT_ROWS[self.dialect]
        self.max_rows = self.segment_rows
        self.forgotten = set(forgotten or ())  # what the parsing side knew: its rows came staged as gone
        self.late: set[str] = set()  # hashes of people forgotten since: looked for in every segment after
        self.forgotten_at = forgotten_at or datetime.now(UTC)
        self.totals = dict.fromkeys(_TOTALS, 0)
        self.line = 0  # the last line a committed segment applied
        self.segments = 0
        self.keys_stored = False  # whether import_key holds this job's addresses
        self.max_lock = 0.0
        self.segment = _Segment()
        self.now: Any = None
        self.raw: Any = None
        self.cur: Any = None
        self._tasks: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], queue.Queue[Any] | None] | None]
        self._tasks = queue.Queue(maxsize=QUEUE_TASKS)
        self._error: BaseException | None = None
        self._busy = threading.Event()  # the SQL thread is running a task
        self._thread: threading.Thread | None = None
        if self.threaded:
            self._thread = threading.Thread(target=self._serve, name=f"import-{job_id}", daemon=True)
            self._thread.start()
        else:
            self._open()

    # -- the calling side -------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None:
            self._execute(fn, args)
        else:
            self._tasks.put((fn, args, None))
        if self._error is not None:
            raise self._error

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            result = self._execute(fn, args)
        else:
            reply: queue.Queue[Any] = queue.Queue(maxsize=1)
            self._tasks.put((fn, args, reply))
            result = reply.get()
        if self._error is not None:
            raise self._error
        return result

    def close(self, *, cancel: bool = False) -> None:
        """Stop the SQL thread; the segment in progress is rolled back and the connection closed. `cancel` stops a
        statement the server is running now (an interrupted `--wait`)."""
        if self._thread is None:
            self._close()
            return
        if cancel and self._busy.is_set():
            self.cancel()
        self._tasks.put(None)
        self._thread.join()

    def start(self) -> dict[str, Any] | None:
        """Open the connection; the stored counts if a run before this one already finished the job. Otherwise
        `line` is where this run resumes (0: from the start)."""
        return self.run(self._start)  # type: ignore[no-any-return]

    def add(self, batch: Batch) -> None:
        """Stage a batch; apply the segment when it is full."""
        seg = self.segment
        seg.read += batch.read
        seg.rejects.extend(batch.rejects)
        seg.last_line = max(seg.last_line, batch.last_line)
        if batch.rows:
            self.submit(self.stage, batch.rows)
            seg.rows += len(batch.rows)
        if seg.rows >= self.segment_rows:
            self.segment = _Segment()
            self.submit(self._apply, seg, False)

    def finish(self) -> dict[str, int]:
        """Apply what is left and finish the job in the same transaction. Returns the counts."""
        seg, self.segment = self.segment, _Segment()
        return self.run(self._apply, seg, True)  # type: ignore[no-any-return]

    # -- the SQL thread ---------------------------------------------------------------------------------------

    def _serve(self) -> None:
        self._open()
        while (task := self._tasks.get()) is not None:
            fn, args, reply = task
            self._busy.set()
            result = self._execute(fn, args)
            self._busy.clear()
            if reply is not None:
                reply.put(result)
        self._close()

    def _open(self) -> None:
        try:
            self.raw = self.connect()
            self.cur = self.raw.cursor()
        except BaseException as exc:
            self._error = exc

    def _execute(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run one task; after a failure, skip the rest (the caller sees the error on its next call)."""
        if self._error is not None:
            return None
        try:
            return fn(*args)
        except BaseException as exc:
            self._error = exc
            return None

    def _close(self) -> None:
        if self.raw is None:
            return
        try:
            self.raw.rollback()
        finally:
            self.disconnect()  # its temporary tables go with it

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        started = time.perf_counter()
        self.cur.execute(statement.replace("?", self.param), params)
        log.debug("%.3fs %s", time.perf_counter() - started, statement[:100])
        return self.cur

    def scalar(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.sql(statement, params).fetchone()
        return None if row is None else row[0]

    def _start(self) -> dict[str, Any] | None:
        self.open_session()
        row = self.sql("SELECT result, counts FROM job WHERE id = ?", (self.job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {self.job_id}")
        result = _json(row[0])
        if result.get("committed"):
            self.raw.rollback()
            return _json(row[1])  # a run before us finished; do not apply twice
        resume = result.get("resume") or {}
        self.line, self.segments = int(resume.get("line", 0)), int(resume.get("segments", 0))
        self.keys_stored = bool(resume.get("keys_stored", False))
        self.totals.update(resume.get("totals") or {})
        self._check_target()  # fail at once, before reading a file for a group that is gone
        self.now = self.timestamp(datetime.now(UTC))
        # email is NULL when it equals the key; attributes is the text of a JSON object.
        self.sql(
            "CREATE TEMP TABLE cm_seg (line INTEGER PRIMARY KEY, key TEXT NOT NULL, email TEXT, name TEXT,"
            " gone INTEGER NOT NULL, normalized INTEGER NOT NULL, attributes TEXT NOT NULL)"
        )
        self.raw.commit()
        return None

    def _apply(self, seg: _Segment, final: bool) -> dict[str, int]:
        """Apply a segment in one transaction (see the module's docstring). The running totals change only once it
        has committed."""
        src, order = self.prepare() if seg.rows else ("cm_seg", "u.line")
        t, keys_stored = dict(self.totals), self.keys_stored
        locked = self.lock()
        try:
            self._check_still_ours()
            self._recheck_forgotten(src, seg)
            if seg.rows:
                keys_stored = self._apply_rows(src, order, t, remember=not final)
            t["read"] += seg.read
            t["invalid"] += len(seg.rejects)
            if seg.rejects:
                rejects = [(self.job_id, line, raw, reason) for line, raw, reason in seg.rejects]
                self.insert_rows("import_reject", ("job_id", "line", "raw", "reason"), rejects)
            line, segments, counts = max(self.line, seg.last_line), self.segments + 1, counts_of(t)
            if final:
                self.sql("DELETE FROM job_file WHERE job_id = ?", (self.job_id,))
                result: dict[str, Any] = {"committed": True, "segments": segments}
                self.sql(
                    f"UPDATE job SET counts = {self.json_param}, result = {self.merged_result} WHERE id = ?",
                    (json.dumps(counts), json.dumps(result), self.job_id),
                )
            else:
                resume = {"line": line, "segments": segments, "keys_stored": keys_stored, "totals": t}
                result = {"resume": resume, "partial": counts}
                params = (json.dumps(result), self.job_id)
                self.sql(f"UPDATE job SET result = {self.merged_result} WHERE id = ?", params)
            self.raw.commit()
        except BaseException:
            self.raw.rollback()
            raise
        finally:
            self._after_segment(time.perf_counter() - locked, seg.rows)
        self.totals, self.keys_stored, self.line, self.segments = t, keys_stored, line, segments
        if final:
            self._finished()
        return counts

    def _check_still_ours(self) -> None:
        """Inside the segment's transaction: the job is still this run's, and its target still exists."""
        found = self.sql(f"SELECT status, worker, attempts FROM job WHERE id = ?{self.for_update}", (self.job_id,))
        row = found.fetchone()
        if row is None:
            raise NotFound(f"job {self.job_id} no longer exists")
        if self.claim is not None and tuple(row) != ("running", self.claim.worker, self.claim.attempts):
            raise JobLost
        self._check_target(lock=self.key_share)
        self.lock_suppressions()

    def _check_target(self, *, lock: str = "") -> None:
        """The group or campaign the import fills still exists (a permanent failure if not: no retry brings it
        back). `lock` keeps it from being deleted until the transaction ends."""
        target = self.args["target"]
        table = "recipient_group" if target["type"] == "group" else "campaign"
        if self.scalar(f"SELECT id FROM {table} WHERE id = ?{lock}", (target["id"],)) is None:
            what = f"{target['type']} {target['id']}"
            raise CmError(f"{what} no longer exists", hint="it was deleted after the import was queued")

    def _recheck_forgotten(self, src: str, seg: _Segment) -> None:
        """People forgotten since this import started: their staged rows count as suppressed and their rejected
        rows are dropped, whatever the parsing side knew (the usual case: nobody was, and this is one query)."""
        since = self.timestamp(self.forgotten_at - timedelta(minutes=5))  # clocks of other machines may differ
        found = {h for (h,) in self.sql("SELECT email_hash FROM suppression WHERE created_at >= ?", (since,))}
        self.late |= found - self.forgotten
        if not self.late:
            return
        if seg.rows:
            keys = [k for (k,) in self.sql(f"SELECT DISTINCT key FROM {src} WHERE gone = 0").fetchall()]
            for key in (k for k in keys if email_hash(k) in self.late):
                self.sql(f"UPDATE {src} SET gone = 1 WHERE key = ?", (key,))
        seg.rejects = [r for r in seg.rejects if not self._names_forgotten(r[1])]

    def _names_forgotten(self, raw: str) -> bool:
        layout = self.args["layout"]
        fields = next(csv.reader([raw], delimiter=layout["delimiter"]), [])
        if len(fields) <= layout["email_index"]:
            return False
        normalized, reason = check_email(unquote_cells([fields[layout["email_index"]]])[0])
        return reason is None and email_hash(normalized.lower()) in self.late

    def _apply_rows(self, src: str, order: str, t: dict[str, int], *, remember: bool) -> bool:
        """Count, create, add and remember the segment's rows into `t`; whether import_key now holds addresses."""
        # The addresses this import has not applied before: all of them in its first segment.
        new = f"NOT EXISTS (SELECT 1 FROM import_key k WHERE k.job_id = {int(self.job_id)} AND k.key = s.key)"
        new = new if self.keys_stored else "1 = 1"
        t["staged"] += int(self.scalar(f"SELECT count(*) FROM {src}"))
        t["distinct"] += int(self.scalar(f"SELECT count(DISTINCT s.key) FROM {src} s WHERE {new}"))
        # An import changes no one's status: who is opted out now was opted out before it.
        t["suppressed"] += int(
            self.scalar(
                f"SELECT count(DISTINCT s.key) FROM {src} s LEFT JOIN recipient r ON r.email_key = s.key"
                f" WHERE {new} AND (s.gone = 1 OR r.status = 'opted_out')"
            )
        )
        attrs = self.attributes
        if self.args.get("update_existing"):
            t["updated"] += self._update_existing(src, attrs, new)
        t["created"] += self.sql(
            "INSERT INTO recipient (email, email_key, name, phone, attributes, status, created_at, updated_at)"
            f" SELECT {self.normalized_email}, u.key, u.name, NULL, {attrs}, 'active', ?, ? FROM {src} u"
            f" WHERE u.gone = 0 ORDER BY {order} ON CONFLICT (email_key) DO NOTHING",
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
        t["added"] += self.sql(
            f"{link} FROM {src} u JOIN recipient r ON r.email_key = u.key"
            f" WHERE u.gone = 0 AND r.status = 'active' ORDER BY {order} ON CONFLICT DO NOTHING",
            params,
        ).rowcount
        if not remember:
            return self.keys_stored
        job = int(self.job_id)
        self.sql(f"INSERT INTO import_key (job_id, key) SELECT DISTINCT {job}, s.key FROM {src} s WHERE {new}")
        return True

    @property
    def normalized_email(self) -> str:
        """An address staged without email is its key. A plain (ASCII) address is staged as written;
        email-validator's normalization of it is the domain lowercased. Others were staged normalized."""
        at = f"{self.find}(u.email, '@')"
        domain_lowered = f"substr(u.email, 1, {at}) || lower(substr(u.email, {at} + 1))"
        return f"CASE WHEN u.email IS NULL THEN u.key WHEN u.normalized = 1 THEN u.email ELSE {domain_lowered} END"

    def _update_existing(self, src: str, attrs: str, new: str) -> int:
        """--update-existing: overwrite the stored name and attributes of active recipients that were there before
        the import, from the first line of each address. Returns how many changed."""
        first = self.first_rows.format(src=src, new=new)
        new_name = "COALESCE(u.name, recipient.name)"
        new_attrs = self.merged_attrs.format(attrs=attrs)
        old_attrs = self.merged_attrs.format(attrs="'{}'")
        return int(
            self.sql(
                f"UPDATE recipient SET name = {new_name}, attributes = {new_attrs}{self.to_json}, updated_at = ?"
                f" FROM {first} u WHERE recipient.email_key = u.key AND recipient.status = 'active'"
                f" AND (recipient.name {self.differs} {new_name} OR {old_attrs} {self.differs} {new_attrs})",
                (self.now,),
            ).rowcount
        )

    def _after_segment(self, held: float, rows: int) -> None:
        """Empty the staging table; size the next segment from how long this one held the lock."""
        self.end_segment()
        self.max_lock = max(self.max_lock, held)
        log.debug("import %d: segment of %d rows applied in %.3fs", self.job_id, rows, held)
        if rows and held > LOCK_TARGET_S and self.adaptive:
            self.segment_rows = max(MIN_SEGMENT_ROWS, int(rows * LOCK_TARGET_S / held))
        elif rows >= self.segment_rows and held < LOCK_TARGET_S / 2:
            self.segment_rows = min(self.max_rows, self.segment_rows * 2)

    def _finished(self) -> None:
        """After the last commit: note the longest segment transaction (`make bench` reports it), and delete the
        addresses kept for resuming, in short transactions (never holding the lock long)."""
        self.lock()
        params = (json.dumps({"max_lock_seconds": round(self.max_lock, 3)}), self.job_id)
        self.sql(f"UPDATE job SET result = {self.merged_result} WHERE id = ?", params)
        self.raw.commit()
        while self.keys_stored:
            self.lock()
            deleted = self.sql(
                "DELETE FROM import_key WHERE job_id = ? AND key IN (SELECT key FROM import_key WHERE job_id = ?"
                f" LIMIT {MIN_SEGMENT_ROWS * 25})",
                (self.job_id, self.job_id),
            ).rowcount
            self.raw.commit()
            if not deleted:
                return

    # -- dialect ----------------------------------------------------------------------------------------------

    adaptive = False  # whether segments are sized by how long they hold the lock
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
        """Start the segment's transaction (PostgreSQL has started one with the first statement); its start time."""
        return time.perf_counter()

    def lock_suppressions(self) -> None:
        """Keep `forget` out until the segment commits (SQLite's write lock already does)."""

    def cancel(self) -> None:
        """Stop the statement the SQL thread is running."""

    def timestamp(self, now: datetime) -> Any:
        return now

    def stage(self, rows: list[tuple[Any, ...]]) -> None:
        self.insert_rows("cm_seg", (), rows)

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def prepare(self) -> tuple[str, str]:
        """The table to read the segment from, and the order that puts each address's first line first."""
        self.analyze("cm_seg")
        return "cm_seg", "u.line"

    def analyze(self, table: str, *, first_only: bool = False) -> None:
        """Refresh the planner's statistics (PostgreSQL plans for a table as it was when last analyzed)."""

    def end_segment(self) -> None:
        self.sql("DELETE FROM cm_seg")


class SqliteBackend(Backend):
    dialect = "sqlite"
    # Staging rows binds every value under the GIL, so on SQLite a second thread only contends with the parsing
    # one (measured: no faster, and twice the peak memory from per-thread malloc arenas). Run inline.
    threaded = False
    adaptive = True
    # Waiting for the helper, the job's process is idle: validating every third batch itself, the parsing ends at
    # 3.5 s instead of 4.45 s (1,000,000 rows; every second batch: slower, every fifth: no better).
    helper_share = 3
    # SQLite takes bare columns from the row min() picked: the first line of each address.
    first_rows = (
        "(SELECT min(s.line) AS line, s.key, s.name, s.attributes FROM {src} s"
        " JOIN recipient r ON r.email_key = s.key WHERE s.gone = 0 AND {new} GROUP BY s.key)"
    )
    merged_attrs = "json_patch(recipient.attributes, {attrs})"
    differs = "IS NOT"
    merged_result = "json_patch(result, ?)"
    # Past ~500 rows a statement gains nothing, and its compiled program (kept in the statement cache) grows
    # with it: 4,000 rows of 8 columns is ~8 MB.
    rows_per_insert = 500

    def connect(self) -> Any:
        from campaign_manager.db import connect_sqlite

        return connect_sqlite(str(self.engine.url))

    def disconnect(self) -> None:
        self.raw.close()  # SQLite deletes the temp file at once: far cheaper than dropping a million rows

    def open_session(self) -> None:
        self.sql("PRAGMA cache_size = -16000")

    def lock(self) -> float:
        # The write lock, taken up front (a deferred transaction that reads first can fail to upgrade), and only
        # now: staging and sorting wrote the temporary database, which takes no lock of the main one.
        self.sql("BEGIN IMMEDIATE")
        return time.perf_counter()

    def timestamp(self, now: datetime) -> Any:
        return now.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores DateTime on SQLite

    def stage(self, rows: list[tuple[Any, ...]]) -> None:
        self.sql("BEGIN")
        super().stage(rows)
        self.sql("COMMIT")

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        # One INSERT with many VALUES tuples costs half what executemany does per row, and runs as one step.
        width = len(rows[0])
        step = self.rows_per_insert
        one = "(" + ", ".join("?" * width) + ")"
        names = f" ({', '.join(columns)})" if columns else ""
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            self.cur.execute(
                f"INSERT INTO {table}{names} VALUES {', '.join([one] * len(part))}", list(chain.from_iterable(part))
            )

    def prepare(self) -> tuple[str, str]:
        # A sorted copy, read in rowid order, makes every later pass walk the rows in key order: the email_key
        # index, the new ids and the memberships are written in order instead of at random, and each address's
        # first line comes first (at 300,000 rows: 1.7 s against 2.4 s unsorted, the sort included).
        self.sql("DROP TABLE IF EXISTS cm_sorted")
        self.sql("CREATE TEMP TABLE cm_sorted AS SELECT * FROM cm_seg ORDER BY key, line")
        return "cm_sorted", "u.rowid"

    def end_segment(self) -> None:
        self.sql("DELETE FROM cm_seg")
        self.sql("DROP TABLE IF EXISTS cm_sorted")


class PostgresBackend(Backend):
    dialect = "postgresql"
    param = "%s"
    json_param = "%s::json"
    find = "strpos"
    first_rows = (
        "(SELECT DISTINCT ON (s.key) s.line, s.key, s.name, s.attributes FROM {src} s"
        " JOIN recipient r ON r.email_key = s.key WHERE s.gone = 0 AND {new} ORDER BY s.key, s.line)"
    )
    merged_attrs = "(recipient.attributes::jsonb || ({attrs})::jsonb)"
    differs = "IS DISTINCT FROM"
    to_json = "::json"
    attributes = "u.attributes::json"
    for_update = " FOR UPDATE"
    key_share = " FOR KEY SHARE"
    merged_result = "(result::jsonb || %s::jsonb)::json"
    _analyzed = False

    def open_session(self) -> None:
        # The default 8 MB of temp_buffers cannot hold a segment and the statements would spill to disk.
        self.sql("SET temp_buffers = '256MB'")
        self.sql("SET work_mem = '64MB'")

    def lock_suppressions(self) -> None:
        # SHARE conflicts with the ROW EXCLUSIVE a `forget` takes to insert its suppression: this waits for a
        # forget in progress, and one that starts now waits for this segment. What the segment reads of
        # `suppression` after this is what stays true until it commits.
        self.sql("LOCK TABLE suppression IN SHARE MODE")

    def cancel(self) -> None:
        self.raw.driver_connection.cancel_safe()

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        names = f" ({', '.join(columns)})" if columns else ""
        with self.cur.copy(f"COPY {table}{names} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def analyze(self, table: str, *, first_only: bool = False) -> None:
        # Without fresh statistics PostgreSQL plans the joins for the tables as they were (a nested loop over what
        # it thinks is a handful of rows). The recipient table only needs it once: after the first segment.
        if first_only:
            if self._analyzed:
                return
            self._analyzed = True
        self.sql(f"ANALYZE {table}")

    def end_segment(self) -> None:
        self.sql("TRUNCATE cm_seg")
