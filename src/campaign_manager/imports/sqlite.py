"""The import applier on SQLite: staging in the connection's temporary database, one write lock a segment."""

from __future__ import annotations

import time
from datetime import datetime
from itertools import chain
from typing import Any

from campaign_manager.audience import consent
from campaign_manager.db import connect_sqlite
from campaign_manager.imports.apply import Applier, stored_email
from campaign_manager.imports.rows import StagedRow, columns, create_table

# The first line of each address, in address order: in by line, the later lines of an address are ignored (key is
# unique in cm_sorted). pos numbers them from 1 without gaps (an ignored row takes no rowid). 1,000,000 rows: 1.58 s,
# against 1.82 s for GROUP BY key with min(line), and 1.42 s for the sort alone.
_COLUMNS = columns(StagedRow)
SORT = f"INSERT OR IGNORE INTO cm_sorted ({_COLUMNS}) SELECT {_COLUMNS} FROM cm_staged ORDER BY key, line"
EMAIL = stored_email("instr")
CREATE = (
    "INSERT INTO recipient (email, email_key, name, phone, attributes, status, created_at, updated_at)"
    f" SELECT {EMAIL}, u.key, u.name, NULL, u.attributes, {consent.SQL_NEW_STATUS}, ?, ?"
    " FROM cm_sorted u WHERE u.pos BETWEEN ? AND ? AND u.gone = 0 ORDER BY u.pos"
    " ON CONFLICT (email_key) DO NOTHING"
)
UPDATE = (
    "UPDATE recipient SET name = coalesce(u.name, recipient.name),"
    " attributes = json_patch(recipient.attributes, u.attributes), updated_at = ?"
    " FROM (SELECT key, name, attributes FROM cm_sorted WHERE pos BETWEEN ? AND ? AND gone = 0) u"
    f" WHERE recipient.email_key = u.key AND {consent.sql_may_add('recipient.status', '0')}"
    " AND (recipient.name IS NOT coalesce(u.name, recipient.name)"
    " OR json_patch(recipient.attributes, '{}') IS NOT json_patch(recipient.attributes, u.attributes))"
)


class SqliteApplier(Applier):
    dialect = "sqlite"
    merge_result = "UPDATE job SET result = json_patch(result, ?) WHERE id = ?"
    set_counts = "UPDATE job SET counts = ? WHERE id = ?"
    # Past ~500 rows a statement gains nothing, and its compiled program (kept in the statement cache) grows
    # with it: 4,000 rows of 8 columns is ~8 MB.
    rows_per_insert = 500

    def connect(self) -> Any:
        return connect_sqlite(str(self.engine.url))

    def disconnect(self) -> None:
        self.raw.close()  # SQLite deletes the temp file at once: far cheaper than dropping a million rows

    def open_session(self) -> None:
        # No foreign-key checks on this connection (they cost 15-37% of the SQL): the ids it links come from
        # `recipient` in the same transaction, and each segment finds its group or campaign there first, under the
        # write lock that keeps it there until the commit. (The pragma is a no-op inside a transaction.)
        self.sql("PRAGMA foreign_keys = OFF")
        self.sql("PRAGMA cache_size = -16000")
        # A commit that fills the WAL past 1,000 pages checkpoints it before returning: seconds for a large segment.
        # The write lock is free by then, but nothing else of the import moves; checkpoint(), after each segment,
        # does the same work at a moment of its choosing, and the lock hold it measures is the lock's alone.
        self.sql("PRAGMA wal_autocheckpoint = 0")

    def begin(self) -> float:
        # The write lock, taken up front (a deferred transaction that reads first can fail to upgrade), and only
        # now: staging and sorting wrote the temporary database, which takes no lock of the main one.
        self.sql("BEGIN IMMEDIATE")
        return time.perf_counter()

    def checkpoint(self) -> None:
        self.sql("PRAGMA wal_checkpoint(PASSIVE)")

    def timestamp(self, now: datetime) -> Any:
        return now.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores DateTime on SQLite

    def insert_rows(self, table: str, names: str, rows: list[Any]) -> None:
        # One INSERT with many VALUES tuples costs half what executemany does per row, and runs as one step. The
        # staging tables are written inside one transaction of the temporary database (BEGIN at the first row).
        if not self.raw.in_transaction:
            self.sql("BEGIN")
        one = "(" + ", ".join("?" * len(rows[0])) + ")"
        step = self.rows_per_insert
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            statement = f"INSERT INTO {table} ({names}) VALUES {', '.join([one] * len(part))}"
            self.cur.execute(statement, list(chain.from_iterable(part)))

    def sort(self) -> int:
        # A sorted copy, read in `pos` order, makes every pass walk the addresses in order: the email_key index,
        # the new ids and the memberships are written in order instead of at random. cm_staged is not dropped:
        # that would walk a million rows to free their pages; closing the connection deletes the file at once.
        self.sql(create_table("cm_sorted", StagedRow, first="pos INTEGER PRIMARY KEY", constraint="UNIQUE (key)"))
        self.sql(SORT)
        return int(self.scalar("SELECT coalesce(max(pos), 0) FROM cm_sorted"))

    def create_recipients(self, first: int, last: int, before: int) -> int:
        created = int(self.sql(CREATE, (self.now, self.now, first, last)).rowcount)
        if created:
            # The new recipients are the ids above `before` (the write lock keeps every other writer out): an id
            # range, read in order, where a join back through email_key would look each address up again.
            link = self.target.link("id", "recipient WHERE id > ?")
            self.sql(link, (*self.target.link_params(self.now), before))
        return created

    def update_existing(self, first: int, last: int) -> int:
        return int(self.sql(UPDATE, (self.now, first, last)).rowcount)
