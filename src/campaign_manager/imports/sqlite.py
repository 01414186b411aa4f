"""The import applier on SQLite: staging in the connection's temporary database, one write lock a segment."""

from __future__ import annotations

import time
from datetime import datetime
from itertools import chain
from typing import Any

from campaign_manager.db import connect_sqlite
from campaign_manager.imports.apply import FIRST_SQLITE_ROWS, Backend


class SqliteBackend(Backend):
    dialect = "sqlite"
    adaptive = True
    first_rows_auto = FIRST_SQLITE_ROWS
    # Waiting for the helper, the job's process is idle: validating every third batch itself, the parsing ends at
    # 3.5 s instead of 4.45 s (1,000,000 rows; every second batch: slower, every fifth: no better).
    helper_share = 3
    # SQLite takes bare columns from the row min() picked: the first line of each address.
    first_rows = (
        "(SELECT min(u.line) AS line, u.key, u.name, u.attributes FROM cm_sorted u"
        " JOIN recipient r ON r.email_key = u.key WHERE {in_range} AND u.gone = 0 GROUP BY u.key)"
    )
    merged_attrs = "json_patch(recipient.attributes, {attrs})"
    differs = "IS NOT"
    merged_result = "json_patch(result, ?)"
    # Past ~500 rows a statement gains nothing, and its compiled program (kept in the statement cache) grows
    # with it: 4,000 rows of 8 columns is ~8 MB.
    rows_per_insert = 500

    def connect(self) -> Any:
        return connect_sqlite(str(self.engine.url))

    def disconnect(self) -> None:
        self.raw.close()  # SQLite deletes the temp file at once: far cheaper than dropping a million rows

    def open_session(self) -> None:
        self.sql("PRAGMA cache_size = -16000")
        # A commit that fills the WAL past 1,000 pages checkpoints it before returning: seconds for a large segment.
        # The write lock is free by then, but nothing else of the import moves; checkpoint(), after each segment,
        # does the same work at a moment of its choosing, and the lock hold it measures is the lock's alone.
        self.sql("PRAGMA wal_autocheckpoint = 0")

    def lock(self) -> float:
        # The write lock, taken up front (a deferred transaction that reads first can fail to upgrade), and only
        # now: staging and sorting wrote the temporary database, which takes no lock of the main one.
        self.sql("BEGIN IMMEDIATE")
        return time.perf_counter()

    def checkpoint(self) -> None:
        self.sql("PRAGMA wal_checkpoint(PASSIVE)")

    def timestamp(self, now: datetime) -> Any:
        return now.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores DateTime on SQLite

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        # One INSERT with many VALUES tuples costs half what executemany does per row, and runs as one step. The
        # staging tables are written inside one transaction of the temporary database (BEGIN at the first row).
        if not self.raw.in_transaction:
            self.sql("BEGIN")
        width = len(rows[0])
        step = self.rows_per_insert
        one = "(" + ", ".join("?" * width) + ")"
        names = f" ({', '.join(columns)})" if columns else ""
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            self.cur.execute(
                f"INSERT INTO {table}{names} VALUES {', '.join([one] * len(part))}", list(chain.from_iterable(part))
            )

    def sort(self) -> int:
        # A sorted copy, read in rowid order, makes every pass walk the rows in address order: the email_key index,
        # the new ids and the memberships are written in order instead of at random (at 300,000 rows: 1.7 s against
        # 2.4 s unsorted, the sort included), and each address's first line comes first.
        self.sql("CREATE TEMP TABLE cm_sorted AS SELECT * FROM cm_seg ORDER BY key, line")
        self.sql("DROP TABLE cm_seg")
        return int(self.scalar("SELECT coalesce(max(rowid), 0) FROM cm_sorted"))
