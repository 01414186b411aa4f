"""The import applier on PostgreSQL: staging by COPY into temporary tables, a SHARE lock on `suppression` a segment."""

from __future__ import annotations

from typing import Any

from campaign_manager.audience import consent
from campaign_manager.imports.apply import Backend


class PostgresBackend(Backend):
    dialect = "postgresql"
    param = "%s"
    json_param = "%s::json"
    find = "strpos"
    pos = "pos"
    first_rows = (
        "(SELECT DISTINCT ON (u.key) u.line, u.key, u.name, u.attributes FROM cm_sorted u"
        " JOIN recipient r ON r.email_key = u.key WHERE {in_range} AND u.gone = 0 ORDER BY u.key, u.line)"
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
        # The default 8 MB of temp_buffers cannot hold the staged rows and the statements would spill to disk.
        self.sql("SET temp_buffers = '256MB'")
        self.sql("SET work_mem = '64MB'")

    def hold_forgetting(self) -> None:
        # SHARE conflicts with the ROW EXCLUSIVE a `forget` takes to insert its suppression: this waits for a
        # forget in progress, and one that starts now waits for this segment. What the segment reads of
        # `suppression` after this is what stays true until it commits.
        self.sql(consent.sql_hold_forgetting())

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        names = f" ({', '.join(columns)})" if columns else ""
        with self.cur.copy(f"COPY {table}{names} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def sort(self) -> int:
        self.sql("CREATE TEMP TABLE cm_sorted AS SELECT row_number() OVER (ORDER BY key, line) AS pos, * FROM cm_seg")
        self.sql("DROP TABLE cm_seg")
        self.sql("ALTER TABLE cm_sorted ADD PRIMARY KEY (pos)")
        self.sql("ANALYZE cm_sorted")
        positions = int(self.scalar("SELECT count(*) FROM cm_sorted"))
        self.raw.commit()
        return positions

    def analyze(self, table: str, *, first_only: bool = False) -> None:
        # Without fresh statistics PostgreSQL plans the joins for the tables as they were (a nested loop over what
        # it thinks is a handful of rows). The recipient table only needs it once: after the first segment.
        if first_only:
            if self._analyzed:
                return
            self._analyzed = True
        self.sql(f"ANALYZE {table}")
