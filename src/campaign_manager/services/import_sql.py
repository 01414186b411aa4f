"""The SQL side of an import: staging rows and applying them, set-based, in one transaction.

Rows arrive in segments. Each segment is staged into a temporary table and applied (recipients created, members
added). On PostgreSQL every statement runs on a thread of its own, which holds the connection, so the server
applies one segment while this process reads and validates the next (psycopg releases the GIL while it waits).
Everything goes into one transaction that ends by recording the job's counts: an import is applied completely
and once, or not at all.

Per segment, in this order:
1. with several segments, keep the segment's addresses for the counts at the end (cm_keys);
2. with --update-existing, update recipients that existed before the import, from the first line of each address
   (and, with several segments, remember the segment's addresses in cm_seen: a later line never overrides);
3. create the recipients that do not exist (first line wins: rows go in line order within an address);
4. add the active ones to the group or campaign.
Then, once, count the distinct addresses and those suppressed (forgotten, or opted out): one pass over all of them
costs far less than keeping a running count per segment (PostgreSQL, 1,000,000 rows: 1.7 s against 1.5 s for
each of five segments).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import chain
from typing import Any

log = logging.getLogger(__name__)

# Rows per segment on PostgreSQL: large enough that per-segment statements cost little, small enough that the
# server works while the rest is parsed (1,000,000 rows: 25.6 s with 200,000, 29.4 s with 50,000). SQLite applies
# everything as one segment: with nothing to overlap, one sort of 1,000,000 rows beats twenty of 50,000 (7.8 s
# against 9.0 s for the whole import).
SEGMENT_ROWS = 200_000
# Batches the parsing side may queue ahead of the SQL thread: memory stays bounded (~20 MB of rows).
QUEUE_TASKS = 12


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as a dict: SQLite hands back text, psycopg already-decoded values."""
    return dict(json.loads(value) if isinstance(value, str | bytes) else value or {})


class Backend:
    """Stage and apply one import job's rows. The public methods are called from the job's thread; with
    `threaded`, they hand the work to the SQL thread, where `run` waits for an answer and `submit` does not (a
    failure surfaces on the next call), and the rows are applied in segments so that the two overlap."""

    threaded = True
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

    def __init__(self, engine: Any, job_id: int, args: dict[str, Any]) -> None:
        self.engine, self.job_id, self.args = engine, job_id, args
        self.totals = dict.fromkeys(("staged", "distinct", "suppressed", "created", "updated", "added"), 0)
        self.pending = 0
        self._rejects: list[tuple[int, str, str]] = []
        self.now: Any = None
        self.raw: Any = None
        self.cur: Any = None
        self.keys: str | None = None  # the table holding every address staged so far, once there is one
        self._tasks: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], queue.Queue[Any] | None] | None]
        self._tasks = queue.Queue(maxsize=QUEUE_TASKS)
        self._error: BaseException | None = None
        self._committed = False
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

    def close(self) -> None:
        """Stop the SQL thread; an uncommitted transaction is rolled back and the connection closed."""
        if self._thread is None:
            self._close()
        else:
            self._tasks.put(None)
            self._thread.join()

    def start(self) -> dict[str, Any] | None:
        """Open the transaction; the stored counts if a run before this one already committed the job."""
        return self.run(self._start)  # type: ignore[no-any-return]

    def add(self, rows: list[tuple[Any, ...]], rejects: list[tuple[int, str, str]]) -> None:
        # Few, large statements: each one the SQL thread runs means taking the GIL back from the parsing thread.
        self._rejects.extend(rejects)
        if len(self._rejects) >= 5_000:
            self.submit(self.insert_many, "cm_rejects", self._rejects)
            self._rejects = []
        if rows:
            self.submit(self.insert_many, "cm_seg", rows)
            self.pending += len(rows)
        if self.threaded and self.pending >= SEGMENT_ROWS:
            self.submit(self._apply_segment)
            self.pending = 0

    def finish(self, counts: dict[str, int]) -> dict[str, Any]:
        """Apply what is left, record the counts with the job and commit. Returns the counts."""
        if self._rejects:
            self.submit(self.insert_many, "cm_rejects", self._rejects)
        return self.run(self._finish, counts)  # type: ignore[no-any-return]

    # -- the SQL thread ---------------------------------------------------------------------------------------

    def _serve(self) -> None:
        self._open()
        while (task := self._tasks.get()) is not None:
            fn, args, reply = task
            result = self._execute(fn, args)
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
            result = fn(*args)
        except BaseException as exc:
            self._error = exc
            return None
        return result

    def _close(self) -> None:
        if self.raw is None:
            return
        try:
            if not self._committed:
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
        self.begin()
        done, stored = self.sql("SELECT result, counts FROM job WHERE id = ?", (self.job_id,)).fetchone()
        if _json(done).get("committed"):
            return _json(stored)  # a run before us committed; do not apply twice
        self.now = self.timestamp(datetime.now(UTC))
        # email is NULL when it equals the key; attributes is the text of a JSON object.
        self.sql(
            "CREATE TEMP TABLE cm_seg (line INTEGER PRIMARY KEY, key TEXT NOT NULL, email TEXT, name TEXT,"
            " gone INTEGER NOT NULL, normalized INTEGER NOT NULL, attributes TEXT NOT NULL)"
        )
        self.sql(f"CREATE TEMP TABLE cm_seen (key TEXT PRIMARY KEY){self.without_rowid}")
        self.sql("CREATE TEMP TABLE cm_keys (key TEXT NOT NULL, gone INTEGER NOT NULL)")
        self.sql("CREATE TEMP TABLE cm_rejects (line INTEGER NOT NULL, raw TEXT NOT NULL, reason TEXT NOT NULL)")
        return None

    def _apply_segment(self) -> None:
        src, order = self.prepare()
        rows = int(self.scalar(f"SELECT count(*) FROM {src}"))
        if not rows:
            return
        t = self.totals
        t["staged"] += rows
        # Segments each go, so their addresses are kept for the counts; one segment is still there at the end.
        self.keys = "cm_keys" if self.threaded else src
        if self.threaded:
            self.sql(f"INSERT INTO cm_keys SELECT key, gone FROM {src}")
        attrs = self.attributes
        if self.args.get("update_existing"):
            t["updated"] += self._update_existing(
                src, attrs, "NOT EXISTS (SELECT 1 FROM cm_seen x WHERE x.key = s.key)"
            )
            if self.threaded:
                self.remember(src)
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
        self.end_segment()

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

    def _finish(self, counts: dict[str, int]) -> dict[str, Any]:
        self._apply_segment()
        t = self.totals
        if self.keys is not None:
            # An import changes no one's status: who is opted out now was opted out before it.
            t["distinct"] = self.scalar(f"SELECT count(DISTINCT key) FROM {self.keys}")
            t["suppressed"] = self.scalar(
                f"SELECT count(DISTINCT k.key) FROM {self.keys} k LEFT JOIN recipient r ON r.email_key = k.key"
                " WHERE k.gone = 1 OR r.status = 'opted_out'"
            )
        result = {
            "read": counts["read"],
            "created": t["created"],
            "updated": t["updated"],
            "added": t["added"],
            "already_member": t["distinct"] - t["suppressed"] - t["added"],
            "duplicates": t["staged"] - t["distinct"],
            "invalid": counts["invalid"],
            "suppressed": t["suppressed"],
        }
        self.sql("DELETE FROM import_reject WHERE job_id = ?", (self.job_id,))
        self.sql(
            "INSERT INTO import_reject (job_id, line, raw, reason) SELECT ?, line, raw, reason FROM cm_rejects"
            " ORDER BY line",
            (self.job_id,),
        )
        self.sql("DELETE FROM job_file WHERE job_id = ?", (self.job_id,))
        self.sql(
            f"UPDATE job SET counts = {self.json_param}, result = {self.json_param} WHERE id = ?",
            (json.dumps(result), json.dumps({"committed": True}), self.job_id),
        )
        self.raw.commit()
        self._committed = True
        return result

    # -- dialect ----------------------------------------------------------------------------------------------

    without_rowid = ""

    def connect(self) -> Any:
        return self.engine.raw_connection()

    def disconnect(self) -> None:
        self.raw.invalidate()  # closes it rather than return it (and its temporary tables) to the pool

    def begin(self) -> None:
        """Start the transaction (PostgreSQL: psycopg has started one with the first statement)."""

    def timestamp(self, now: datetime) -> Any:
        return now

    def insert_many(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def prepare(self) -> tuple[str, str]:
        """The table to read the segment from, and the order that puts each address's first line first."""
        self.analyze("cm_seg")
        return "cm_seg", "u.line"

    def remember(self, src: str) -> None:
        """Add the segment's addresses to cm_seen. (The WHERE is SQLite's: without one it cannot tell the upsert's
        ON from a join's.)"""
        self.sql(f"INSERT INTO cm_seen (key) SELECT key FROM {src} WHERE key IS NOT NULL ON CONFLICT DO NOTHING")

    def analyze(self, table: str, *, first_only: bool = False) -> None:
        """Refresh the planner's statistics (PostgreSQL plans for a table as it was when last analyzed)."""

    def end_segment(self) -> None:
        self.sql("DELETE FROM cm_seg")


class SqliteBackend(Backend):
    # Staging rows binds every value under the GIL, so on SQLite a second thread only contends with the parsing
    # one (measured: no faster, and twice the peak memory from per-thread malloc arenas). Run inline, and so
    # apply everything as one segment (see SEGMENT_ROWS).
    threaded = False
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
    without_rowid = " WITHOUT ROWID"
    # Past ~500 rows a statement gains nothing, and its compiled program (kept in the statement cache) grows
    # with it: 4,000 rows of 8 columns is ~8 MB.
    rows_per_insert = 500

    def connect(self) -> Any:
        from campaign_manager.db import connect_sqlite

        return connect_sqlite(str(self.engine.url))

    def disconnect(self) -> None:
        self.raw.close()  # SQLite deletes the temp file at once: far cheaper than dropping a million rows

    def begin(self) -> None:
        self.sql("PRAGMA cache_size = -16000")
        # Taken up front: the write lock is held from here to the commit, so no other writer can slip in
        # between the segments (they wait, up to the busy timeout).
        self.sql("BEGIN IMMEDIATE")

    def timestamp(self, now: datetime) -> Any:
        return now.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores DateTime on SQLite

    def insert_many(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        # One INSERT with many VALUES tuples costs half what executemany does per row, and runs as one step.
        width = len(rows[0])
        step = self.rows_per_insert
        one = "(" + ", ".join("?" * width) + ")"
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            self.cur.execute(
                f"INSERT INTO {table} VALUES {', '.join([one] * len(part))}", list(chain.from_iterable(part))
            )

    def prepare(self) -> tuple[str, str]:
        # A sorted copy, read in rowid order, makes every later pass walk the rows in key order: the email_key
        # index, the new ids and the memberships are written in order instead of at random, and each address's
        # first line comes first (at 300,000 rows: 1.7 s against 2.4 s unsorted, the sort included).
        self.sql("DROP TABLE IF EXISTS cm_sorted")
        self.sql("CREATE TEMP TABLE cm_sorted AS SELECT * FROM cm_seg ORDER BY key, line")
        return "cm_sorted", "u.rowid"


class PostgresBackend(Backend):
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
    _analyzed = False

    def begin(self) -> None:
        # Session settings, before the first temporary table is touched: the default 8 MB of temp_buffers cannot
        # hold a segment and the addresses kept for the counts, and the statements would spill to disk.
        self.sql("SET temp_buffers = '256MB'")
        self.sql("SET LOCAL work_mem = '64MB'")

    def insert_many(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        with self.cur.copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    attributes = "u.attributes::json"

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
