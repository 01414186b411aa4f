"""The database's share of an import, alone: what the set-based SQL of an import costs on cm's own tables.

The rows are parsed and prepared before the clock starts (no validation beyond "has an @", no consent checks, no
counts, no rejects, no segments on SQLite), then timed: staging them (multi-row VALUES on SQLite, COPY on
PostgreSQL), keeping the first line of each address in address order (on SQLite INSERT OR IGNORE, in order, into a
table whose key is unique; on PostgreSQL DISTINCT ON), creating the recipients and making them members of the
group, and the commit. The statements are the ones cm's import runs (imports/sqlite.py, imports/postgres.py): on
SQLite with foreign keys off (as on cm's import connection) and the memberships taken from the new ids' range; on
PostgreSQL the recipients created without ON CONFLICT under a lock on `recipient` and their ids, from INSERT ...
RETURNING, fed to the memberships, in segments of 200,000 addresses (the foreign-key triggers of group_member queue
an event per row until the statement ends). It is what any import into these tables must at least do, so it is the
ceiling for cm's import, printed beside its figure.

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
STAGED = "line INTEGER NOT NULL, key TEXT NOT NULL, email TEXT NOT NULL, name TEXT, attributes TEXT NOT NULL"
RECIPIENT = "recipient (email, email_key, name, attributes, status, created_at, updated_at)"


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
    # The settings cm's own connection uses for an import (db.configure_sqlite and imports/sqlite.py).
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = OFF", "cache_size = -16000"):
        con.execute(f"PRAGMA {pragma}")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    (group,) = con.execute("SELECT id FROM recipient_group WHERE name = ?", (GROUP,)).fetchone()
    con.execute(f"CREATE TEMP TABLE s ({STAGED})")
    con.execute(f"CREATE TEMP TABLE t (pos INTEGER PRIMARY KEY, {STAGED}, UNIQUE (key))")
    one = "(?, ?, ?, ?, ?)"
    with steps.step("stage"):
        con.execute("BEGIN")
        for start in range(0, len(rows), ROWS_PER_INSERT):
            part = rows[start : start + ROWS_PER_INSERT]
            con.execute(f"INSERT INTO s VALUES {', '.join([one] * len(part))}", list(chain.from_iterable(part)))
        con.execute("COMMIT")
    with steps.step("sort"):
        con.execute(
            "INSERT OR IGNORE INTO t (line, key, email, name, attributes)"
            " SELECT line, key, email, name, attributes FROM s ORDER BY key, line"
        )
    con.execute("BEGIN IMMEDIATE")
    before = con.execute("SELECT coalesce(max(id), 0) FROM recipient").fetchone()[0]
    with steps.step("recipients"):
        con.execute(
            f"INSERT INTO {RECIPIENT} SELECT email, key, name, attributes, 'active', ?, ? FROM t WHERE true"
            " ORDER BY pos ON CONFLICT DO NOTHING",
            (now, now),
        )
    with steps.step("members"):
        con.execute(
            "INSERT INTO group_member (group_id, recipient_id, added_at) SELECT ?, id, ? FROM recipient WHERE id > ?",
            (group, now, before),
        )
    with steps.step("commit"):
        con.execute("COMMIT")
    con.close()


def postgres_floor(url: str, rows: list[tuple[Any, ...]], steps: Steps) -> None:
    import psycopg

    with psycopg.connect(url) as con, con.cursor() as cur:
        (group,) = cur.execute("SELECT id FROM recipient_group WHERE name = %s", (GROUP,)).fetchone() or (None,)
        # cm's import settings: room for the staged rows in memory, and for the sorts; lookups by index.
        for setting in ("temp_buffers = '256MB'", "work_mem = '64MB'", "enable_hashjoin = off"):
            cur.execute(f"SET {setting}")
        cur.execute("SET enable_mergejoin = off")
        cur.execute(f"CREATE TEMP TABLE s ({STAGED})")
        cur.execute(f"CREATE TEMP TABLE t (pos INTEGER PRIMARY KEY, {STAGED})")
        with steps.step("stage"), cur.copy("COPY s FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with steps.step("sort"):
            cur.execute(
                "INSERT INTO t SELECT row_number() OVER (ORDER BY key), * FROM"
                " (SELECT DISTINCT ON (key) * FROM s ORDER BY key, line) first_lines"
            )
            cur.execute("ANALYZE t")
            (positions,) = cur.execute("SELECT count(*) FROM t").fetchone() or (0,)
            con.commit()
        for first in range(1, positions + 1, SEGMENT_ROWS):
            with steps.step("recipients and members"):
                cur.execute("LOCK TABLE recipient IN SHARE ROW EXCLUSIVE MODE")
                cur.execute(
                    f"WITH created AS (INSERT INTO {RECIPIENT}"
                    " SELECT email, key, name, attributes::json, 'active', now(), now() FROM t u"
                    " WHERE pos BETWEEN %s AND %s AND NOT EXISTS (SELECT FROM recipient r WHERE r.email_key = u.key)"
                    " ORDER BY pos RETURNING id)"
                    " INSERT INTO group_member (group_id, recipient_id, added_at) SELECT %s, id, now() FROM created",
                    (first, first + SEGMENT_ROWS - 1, group),
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
