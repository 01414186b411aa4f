"""One big database per test session and backend, built with set-based SQL, and a fresh copy of it for each test.

`BIG` recipients (more than SQLite's 250,000 bound parameters and PostgreSQL's 65,535), built in a few seconds:

- recipient i (1..BIG) is `user{i:07d}@example.com`, named `Person {i:07d}`, with attributes `{"seq": i}`;
- every `OPTED_OUT_EVERY`th one is opted out (reason "bulk");
- group `everyone` holds all of them, group `vip` those with i % VIP_EVERY == 1 (all active: 1, 1001, ...);
- campaign 1, "all", targets `everyone` and names every recipient with `--recipient`;
- BIG addresses were forgotten (suppression entries whose hashes match no address here).

The template is made once (after `db.upgrade`, as `cm db upgrade` would); each test gets a file copy on SQLite and
`CREATE DATABASE ... TEMPLATE` on PostgreSQL, dropped after the test.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from campaign_manager import db

BIG = 260_000
OPTED_OUT_EVERY = 50
VIP_EVERY = 1_000
EVERYONE, VIP, CAMPAIGN_TITLE = "everyone", "vip", "all"
STAMP = "2026-01-01 00:00:00.000000"


@dataclass(frozen=True)
class Expected:
    """What the big database holds, for the tests to check results against."""

    recipients: int = BIG
    opted_out: int = BIG // OPTED_OUT_EVERY
    vip: int = len(range(1, BIG + 1, VIP_EVERY))

    @property
    def active(self) -> int:
        return self.recipients - self.opted_out

    @staticmethod
    def email(i: int) -> str:
        return f"user{i:07d}@example.com"


EXPECTED = Expected()


# The same statements on both backends, with the sequence written per dialect: `n(i)` is 1..rows.
_SEQUENCE = {
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})",
    "postgresql": "WITH n(i) AS (SELECT generate_series(1, {rows}))",
}
_PAD = {"sqlite": "printf('%07d', i)", "postgresql": "lpad(i::text, 7, '0')"}
_JSON = {"sqlite": "json_object('seq', i)", "postgresql": "json_build_object('seq', i)"}
_TIME = {"sqlite": f"'{STAMP}'", "postgresql": f"'{STAMP}+00'::timestamptz"}
_HASH = {"sqlite": "printf('%064x', i)", "postgresql": "lpad(to_hex(i), 64, '0')"}


def _statements(dialect: str, rows: int) -> list[str]:
    seq = _SEQUENCE[dialect].format(rows=rows)
    pad, attrs, now = _PAD[dialect], _JSON[dialect], _TIME[dialect]
    out = f"i % {OPTED_OUT_EVERY} = 0"
    return [
        f"INSERT INTO recipient_group (id, name, name_key, description, public, created_at, updated_at)"
        f" VALUES (1, '{EVERYONE}', '{EVERYONE.lower()}', 'all of them', false, {now}, {now}),"
        f" (2, '{VIP}', '{VIP.lower()}', NULL, false, {now}, {now})",
        f"INSERT INTO recipient (id, email, email_key, name, phone, attributes, status, opt_out_reason,"
        f" opted_out_at, created_at, updated_at) {seq}"
        f" SELECT i, 'user' || {pad} || '@example.com', 'user' || {pad} || '@example.com', 'Person ' || {pad},"
        f" NULL, {attrs}, CASE WHEN {out} THEN 'opted_out' ELSE 'active' END,"
        f" CASE WHEN {out} THEN 'bulk' END, CASE WHEN {out} THEN {now} END, {now}, {now} FROM n",
        f"INSERT INTO group_member (group_id, recipient_id, added_at) SELECT 1, id, {now} FROM recipient",
        f"INSERT INTO group_member (group_id, recipient_id, added_at)"
        f" SELECT 2, id, {now} FROM recipient WHERE id % {VIP_EVERY} = 1",
        "INSERT INTO campaign (id, title, subject, body_text, status, created_at, updated_at, ledger_through,"
        f" ledger_done) VALUES (1, '{CAMPAIGN_TITLE}', 'Hello', 'Hi all', 'draft', {now}, {now}, 0, false)",
        "INSERT INTO campaign_group (campaign_id, group_id) VALUES (1, 1)",
        "INSERT INTO campaign_recipient (campaign_id, recipient_id) SELECT 1, id FROM recipient",
        f"INSERT INTO suppression (email_hash, reason, created_at) {seq} SELECT {_HASH[dialect]}, 'bulk', {now} FROM n",
    ]


def build_sqlite(path: Path, rows: int = BIG) -> str:
    """The big database as a SQLite file (in rollback-journal mode on disk, so one file is all there is to copy)."""
    url = f"sqlite:///{path}"
    db.upgrade(url)
    db.dispose_engines()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN")
        for statement in _statements("sqlite", rows):
            con.execute(statement)
        con.execute("COMMIT")
        # No ANALYZE: cm never runs it on SQLite, so the tests see the plans a user's database gets.
        con.execute("PRAGMA journal_mode = DELETE")
    finally:
        con.close()
    return url


def copy_sqlite(template: Path, folder: Path) -> str:
    target = folder / "big.db"
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def build_postgres(url: str, rows: int = BIG) -> None:
    """Fill the (empty) PostgreSQL database at url with the big data set."""
    import psycopg

    db.upgrade(url)
    db.dispose_engines()
    with psycopg.connect(url) as con:
        # No foreign-key triggers while filling it (the rows are consistent by construction): a third of the time.
        con.execute("SET session_replication_role = replica")
        for statement in _statements("postgresql", rows):
            con.execute(statement)
        for table in ("recipient", "recipient_group", "campaign"):
            con.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        con.commit()
    with psycopg.connect(url, autocommit=True) as con:
        # What autovacuum does to a table this size within a minute: the plans a user's database gets.
        con.execute("VACUUM ANALYZE")


@contextmanager
def copy_postgres(template_url: str, server_url: str) -> Iterator[str]:
    """A database made from the template (CREATE DATABASE ... TEMPLATE), dropped afterwards."""
    import psycopg

    name = f"cm_test_{uuid.uuid4().hex[:12]}"
    template = template_url.rpartition("/")[2]
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = f"{server_url.rpartition('/')[0]}/{name}"
    try:
        yield url
    finally:
        db.dispose_engines()
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
