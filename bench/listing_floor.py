"""The driver alone: every recipient, with its groups' names, fetched in pages and written as JSON (one array a
row) on stdout, with nothing of cm loaded. The floor of `cm recipient list --json` (bench/listing.py).

    python -m bench.listing_floor DATABASE > /dev/null      # a SQLite path or a postgresql:// URL
"""

from __future__ import annotations

import json
import sqlite3
import sys
from typing import Any

PAGE_ROWS = 2_000
# What cm lists: the recipient's columns and its groups' names.
FLOOR_QUERY = (
    "SELECT r.id, r.email, r.name, r.phone, r.status, r.attributes, r.opt_out_reason, r.opted_out_at,"
    " r.created_at, r.updated_at, g.name AS group_name FROM recipient r"
    " LEFT JOIN group_member m ON m.recipient_id = r.id LEFT JOIN recipient_group g ON g.id = m.group_id"
    " ORDER BY r.id, g.name"
)


def _write(cursor: Any) -> int:
    encode = json.JSONEncoder(default=str, ensure_ascii=False).encode
    write = sys.stdout.write
    count = 0
    while rows := cursor.fetchmany(PAGE_ROWS):
        for row in rows:
            write(encode(row) + "\n")
        count += len(rows)
    return count


def main(argv: list[str]) -> int:
    (database,) = argv
    if database.startswith(("postgres://", "postgresql://")):
        import psycopg

        with psycopg.connect(database) as con, con.cursor(name="floor") as cursor:  # a server-side cursor
            cursor.execute(FLOOR_QUERY.encode())
            _write(cursor)
        return 0
    lite = sqlite3.connect(database.removeprefix("sqlite:///"))
    _write(lite.execute(FLOOR_QUERY))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
