"""The database's share of an import, alone: what the set-based SQL of an import costs on cm's own tables.

The rows are parsed and prepared before the clock starts (no validation beyond "has an @", no consent checks, no
counts, no rejects), then timed: staging them (multi-row VALUES on SQLite, COPY on PostgreSQL), one
`INSERT ... SELECT ... ON CONFLICT DO NOTHING` into recipient, one into group_member (with its foreign keys) and
the commit; on SQLite also the sort that puts the rows in key order (without it both inserts are slower), on
PostgreSQL per segment of 200,000 rows (faster there than one statement each). It is what any import into these
tables must at least do, so it is the ceiling for cm's import, printed beside its figure.

Run by bench/imports.py in a process of its own, against a database cm has created with the group "bench":
    python -m bench.schema_floor DATABASE CSV_FILE        # prints {"rows": N, "seconds": S, "steps": {...}}
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import chain
from typing import Any

GROUP = "bench"
ROWS_PER_INSERT = 500
SEGMENT_ROWS = 200_000


def prepare(path: str) -> list[tuple[int, str, str, str | None, str]]:
    """(line, key, email, name, attributes JSON) for each row whose email has an @; the file's own columns."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for line, (email, name, city, plan) in enumerate(reader, start=2):
            email = email.strip()
            if "@" in email:
                attrs = json.dumps({"city": city, "plan": plan}, separators=(",", ":"))
                rows.append((line, email.lower(), email, name or None, attrs))
    return rows


class Steps:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - started, 3)


def sqlite_floor(path: str, rows: list[tuple[Any, ...]], steps: Steps) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    # The settings cm's own connection uses for an import (db.configure_sqlite and the import backend).
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON", "cache_size = -16000"):
        con.execute(f"PRAGMA {pragma}")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    (group,) = con.execute("SELECT id FROM recipient_group WHERE name = ?", (GROUP,)).fetchone()
    con.execute("BEGIN IMMEDIATE")
    con.execute("CREATE TEMP TABLE s (line INTEGER PRIMARY KEY, key TEXT, email TEXT, name TEXT, attributes TEXT)")
    one = "(?, ?, ?, ?, ?)"
    with steps.step("stage"):
        for start in range(0, len(rows), ROWS_PER_INSERT):
            part = rows[start : start + ROWS_PER_INSERT]
            con.execute(f"INSERT INTO s VALUES {', '.join([one] * len(part))}", list(chain.from_iterable(part)))
    with steps.step("sort"):
        con.execute("CREATE TEMP TABLE t AS SELECT * FROM s ORDER BY key, line")
    with steps.step("recipients"):
        con.execute(
            "INSERT INTO recipient (email, email_key, name, attributes, status, created_at, updated_at)"
            " SELECT email, key, name, attributes, 'active', ?, ? FROM t WHERE true ON CONFLICT DO NOTHING",
            (now, now),
        )
    with steps.step("members"):
        con.execute(
            "INSERT INTO group_member (group_id, recipient_id, added_at) SELECT ?, r.id, ? FROM t"
            " JOIN recipient r ON r.email_key = t.key WHERE true ON CONFLICT DO NOTHING",
            (group, now),
        )
    with steps.step("commit"):
        con.execute("COMMIT")
    con.close()


def postgres_floor(url: str, rows: list[tuple[Any, ...]], steps: Steps) -> None:
    """In segments of 200,000 rows, as cm does: on PostgreSQL five segments beat one statement over 1,000,000 rows
    (the foreign-key triggers of group_member queue an event per row until the statement ends)."""
    import psycopg

    with psycopg.connect(url) as con, con.cursor() as cur:
        (group,) = cur.execute("SELECT id FROM recipient_group WHERE name = %s", (GROUP,)).fetchone() or (None,)
        # cm's import settings: room for the staged rows in memory, and for the sorts.
        cur.execute("SET temp_buffers = '256MB'")
        cur.execute("SET work_mem = '64MB'")
        cur.execute("CREATE TEMP TABLE s (line integer, key text, email text, name text, attributes text)")
        for start in range(0, len(rows), SEGMENT_ROWS):
            with steps.step("stage"):
                cur.execute("TRUNCATE s")
                with cur.copy("COPY s FROM STDIN") as copy:
                    for row in rows[start : start + SEGMENT_ROWS]:
                        copy.write_row(row)
                cur.execute("ANALYZE s")
            with steps.step("recipients"):
                cur.execute(
                    "INSERT INTO recipient (email, email_key, name, attributes, status, created_at, updated_at)"
                    " SELECT email, key, name, attributes::json, 'active', now(), now() FROM s ORDER BY line"
                    " ON CONFLICT DO NOTHING"
                )
                if not start:
                    cur.execute("ANALYZE recipient")
            with steps.step("members"):
                cur.execute(
                    "INSERT INTO group_member (group_id, recipient_id, added_at) SELECT %s, r.id, now() FROM s"
                    " JOIN recipient r ON r.email_key = s.key ON CONFLICT DO NOTHING",
                    (group,),
                )
        with steps.step("commit"):
            con.commit()


def main(argv: list[str]) -> int:
    url, path = argv
    rows = prepare(path)
    steps = Steps()
    run: Callable[[str, list[tuple[Any, ...]], Steps], None]
    if "://" not in url or url.startswith("sqlite:"):
        url, run = url.split(":///", 1)[-1], sqlite_floor
    else:
        run = postgres_floor
    started = time.perf_counter()
    run(url, rows, steps)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": len(rows), "seconds": round(seconds, 3), "steps": steps.times}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
