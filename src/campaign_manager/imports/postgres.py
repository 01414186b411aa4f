"""The import applier on PostgreSQL: staging by COPY, the addresses deduplicated and ordered by DISTINCT ON, and a
segment that holds `recipient` against other writers while it creates recipients without ON CONFLICT."""

from __future__ import annotations

from typing import Any

from campaign_manager.audience import consent
from campaign_manager.imports.apply import Applier, Busy, stored_email
from campaign_manager.imports.rows import StagedRow, columns, create_table

_COLUMNS = columns(StagedRow)
SORT = (
    f"INSERT INTO cm_sorted (pos, {_COLUMNS}) SELECT row_number() OVER (ORDER BY key), {_COLUMNS}"
    f" FROM (SELECT DISTINCT ON (key) {_COLUMNS} FROM cm_staged ORDER BY key, line) first_lines"
)
EMAIL = stored_email("strpos")
# Without ON CONFLICT (a third of the insert's cost) and with the ids it returns feeding the memberships (no join
# back through email_key): safe only while no one else can insert a recipient, which hold_writers sees to.
CREATE = (
    "WITH created AS (INSERT INTO recipient (email, email_key, name, phone, attributes, status, created_at, updated_at)"
    f" SELECT {EMAIL}, u.key, u.name, NULL, u.attributes::json, {consent.SQL_NEW_STATUS}, ?, ?"
    " FROM cm_sorted u WHERE u.pos BETWEEN ? AND ? AND u.gone = 0"
    " AND NOT EXISTS (SELECT FROM recipient r WHERE r.email_key = u.key) ORDER BY u.pos RETURNING id) "
)
UPDATE = (
    "UPDATE recipient SET name = coalesce(u.name, recipient.name),"
    " attributes = (recipient.attributes::jsonb || u.attributes::jsonb)::json, updated_at = ?"
    " FROM cm_sorted u WHERE u.pos BETWEEN ? AND ? AND u.gone = 0 AND recipient.email_key = u.key"
    f" AND {consent.sql_may_add('recipient.status', '0')}"
    " AND (recipient.name IS DISTINCT FROM coalesce(u.name, recipient.name)"
    " OR recipient.attributes::jsonb IS DISTINCT FROM (recipient.attributes::jsonb || u.attributes::jsonb))"
)
# SHARE ROW EXCLUSIVE conflicts with the ROW EXCLUSIVE every INSERT, UPDATE and DELETE of `recipient` takes (and
# with itself: two imports take turns), not with readers, nor with the row locks of foreign-key checks. It also
# conflicts with what (auto)vacuum and ANALYZE take, which need not stop anyone else: so a segment waits for it only
# briefly (a writer waiting behind the segment's request waits as long), then gives way and tries again.
HOLD_RECIPIENTS = "LOCK TABLE recipient IN SHARE ROW EXCLUSIVE MODE"
HOLD_WAIT = "200ms"
LOCK_NOT_AVAILABLE = "55P03"  # the SQLSTATE of a lock_timeout


class PostgresApplier(Applier):
    dialect = "postgresql"
    merge_result = "UPDATE job SET result = (result::jsonb || ?::jsonb)::json WHERE id = ?"
    set_counts = "UPDATE job SET counts = ?::json WHERE id = ?"
    lock_job = Applier.lock_job + " FOR UPDATE"
    lock_target = " FOR KEY SHARE"
    # Shorter than SQLite's: a segment's size makes no difference to the throughput here (1,000,000 rows: 13.3-15.3 s
    # applying in 38-40 segments, 13.3-14.6 s in 5), and a slow segment on a busy machine keeps an opt-out under 1 s.
    hold_seconds = 0.3

    def native(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def connect(self) -> Any:
        return self.engine.raw_connection()

    def disconnect(self) -> None:
        self.raw.invalidate()  # closes it rather than return it (and its temporary tables) to the pool

    def open_session(self) -> None:
        # The default 8 MB of temp_buffers cannot hold the staged rows and the statements would spill to disk.
        self.sql("SET temp_buffers = '256MB'")
        self.sql("SET work_mem = '64MB'")
        # Every join here looks a segment's addresses up in an index of `recipient`. Left to itself, the planner
        # hashes the whole table instead, once a segment (0.78 s against 0.34 s for 20,000 addresses against
        # 930,000 recipients, and growing with the table), whatever its statistics.
        self.sql("SET enable_hashjoin = off")
        self.sql("SET enable_mergejoin = off")

    def hold_writers(self, *, recipients: bool) -> None:
        # First `suppression` in SHARE mode, which conflicts with the ROW EXCLUSIVE a `forget` takes to insert its
        # suppression (and which a forget takes first, so neither waits on the other while holding what the other
        # needs): what the transaction reads of `suppression` stays true until it commits. Then, for a segment,
        # `recipient`: no other writer inserts an address the segment is about to create, or changes a status.
        self.sql(consent.sql_hold_forgetting())
        if recipients:
            self.sql(f"SET LOCAL lock_timeout = '{HOLD_WAIT}'")
            try:
                self.sql(HOLD_RECIPIENTS)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                    raise Busy from None
                raise
            self.sql("SET LOCAL lock_timeout = DEFAULT")

    def insert_rows(self, table: str, names: str, rows: list[Any]) -> None:
        with self.cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def sort(self) -> int:
        self.sql(create_table("cm_sorted", StagedRow, first="pos INTEGER PRIMARY KEY"))
        self.sql(SORT)
        self.sql("DROP TABLE cm_staged")
        self.sql("ANALYZE cm_sorted")
        positions = int(self.scalar("SELECT count(*) FROM cm_sorted"))
        self.raw.commit()
        return positions

    def create_recipients(self, first: int, last: int, before: int) -> int:
        statement = CREATE + self.target.link("id", "created")
        params = (self.now, self.now, first, last, *self.target.link_params(self.now))
        return int(self.sql(statement, params).rowcount)

    def update_existing(self, first: int, last: int) -> int:
        return int(self.sql(UPDATE, (self.now, first, last)).rowcount)
