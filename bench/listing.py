"""Listing speed and memory: `cm recipient list --json > /dev/null` over a million recipients, on SQLite and on
PostgreSQL, each beside floors from the same run on the same database:

- the database's own command-line client printing the same rows as JSON (`sqlite3 -json`; on PostgreSQL
  `psql` copying `row_to_json` of each row out);
- the driver alone (bench/listing_floor.py): the same rows fetched in pages from Python and each written as a
  JSON array, with nothing of cm loaded.

The database is filled with set-based SQL after `cm db upgrade` (a million rows in seconds, no import needed):
recipient i is `user{i:07d}@example.com`, in group "bench", every 50th opted out. Afterwards the last page is read
back (`--offset`) so that a listing that stops early cannot look fast, and `cm recipient list --json --limit 1`
on the same database gives the memory any cm process takes, beside the listing's peak.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench import pg, proc
from bench.imports import Bench
from bench.listing_floor import FLOOR_QUERY
from bench.report import Baseline, Figure, Target

RSS_TARGET_MB = 150.0
OPTED_OUT_EVERY = 50
STAMP = "2026-01-01 00:00:00.000000"


def _fill_statements(rows: int, *, postgres: bool) -> list[str]:
    seq = (
        f"WITH n(i) AS (SELECT generate_series(1, {rows}))"
        if postgres
        else f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})"
    )
    pad = "lpad(i::text, 7, '0')" if postgres else "printf('%07d', i)"
    attrs = "json_build_object('seq', i)" if postgres else "json_object('seq', i)"
    now = f"'{STAMP}+00'::timestamptz" if postgres else f"'{STAMP}'"
    out = f"i % {OPTED_OUT_EVERY} = 0"
    return [
        "INSERT INTO recipient_group (id, name, name_key, public, created_at, updated_at)"
        f" VALUES (1, 'bench', 'bench', false, {now}, {now})",
        f"INSERT INTO recipient (id, email, email_key, name, attributes, status, opt_out_reason, opted_out_at,"
        f" created_at, updated_at) {seq} SELECT i, 'user' || {pad} || '@example.com', 'user' || {pad} ||"
        f" '@example.com', 'Person ' || {pad}, {attrs}, CASE WHEN {out} THEN 'opted_out' ELSE 'active' END,"
        f" CASE WHEN {out} THEN 'bulk' END, CASE WHEN {out} THEN {now} END, {now}, {now} FROM n",
        f"INSERT INTO group_member (group_id, recipient_id, added_at) SELECT 1, id, {now} FROM recipient",
    ]


def fill_sqlite(path: Path, rows: int) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN")
        for statement in _fill_statements(rows, postgres=False):
            con.execute(statement)
        con.execute("COMMIT")
    finally:
        con.close()


def fill_postgres(url: str, rows: int) -> None:
    import psycopg

    with psycopg.connect(url) as con:
        try:
            # No foreign-key triggers while filling (the rows are consistent by construction); needs a superuser,
            # and only saves time.
            con.execute("SET session_replication_role = replica")
        except psycopg.Error:
            con.rollback()
        for statement in _fill_statements(rows, postgres=True):
            con.execute(statement.encode())
        con.execute(f"SELECT setval(pg_get_serial_sequence('recipient', 'id'), {rows})".encode())
        con.commit()
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("VACUUM ANALYZE")  # what autovacuum would soon do: the plans a user's database gets


def bench_listing(bench: Bench, *, rows: int, server_url: str) -> None:
    bench.report.section(f"listing {rows:,} recipients: `cm recipient list --json > /dev/null`, SQLite")
    with bench.fresh_dir("listing-sqlite") as folder:
        database = str(folder / "cm.db")
        if _prepare(bench, database, lambda: fill_sqlite(folder / "cm.db", rows), rows):
            floors = [f for f in (_sqlite_cli_floor(bench, folder / "cm.db"), _driver_floor(bench, database)) if f]
            _measure(bench, database, rows, label="SQLite", floors=floors)
    bench.report.section(f"listing {rows:,} recipients: `cm recipient list --json > /dev/null`, PostgreSQL")
    try:
        with pg.throwaway_database(server_url) as url:
            bench.report.note(f"throwaway database {url.rsplit('/', 1)[-1]} (dropped afterwards)")
            if _prepare(bench, url, lambda: fill_postgres(url, rows), rows):
                floors = [f for f in (_psql_floor(bench, url), _driver_floor(bench, url)) if f]
                _measure(bench, url, rows, label="PostgreSQL", floors=floors)
    except pg.Unavailable as exc:
        bench.report.note(f"skipped: {exc}")
        bench.report.target(_target("PostgreSQL", None, "PostgreSQL not reachable"))


def _prepare(bench: Bench, database: str, fill: Any, rows: int) -> bool:
    upgrade = bench.cm(database, "db", "upgrade")
    if not upgrade.ok:
        bench.report.note(f"not available: {upgrade.failure()}")
        bench.report.target(_target(_label(database), None, "cm db upgrade failed"))
        return False
    started = time.perf_counter()
    fill()
    bench.report.note(f"filled with {rows:,} recipients by set-based SQL in {time.perf_counter() - started:.1f} s")
    return True


def _measure(bench: Bench, database: str, rows: int, *, label: str, floors: list[Figure]) -> None:
    report = bench.report
    argv = [proc.cm(), "--database", database, "recipient", "list", "--json"]
    run = proc.run(
        argv, env=bench.env, cwd=bench.work, out_dir=bench.work / "out", timeout=bench.timeout, discard_stdout=True
    )
    if not run.ok:
        report.note(f"not available: {run.failure()}")
        report.table(floors)
        report.target(_target(label, None, "command failed"))
        return
    problem = _check(bench, database, rows)
    one = bench.cm(database, "recipient", "list", "--json", "--limit", "1")
    rss_base = (Baseline("cm recipient list --limit 1", one.peak_rss_mb),) if one.ok else ()
    suffix = "" if not problem else " (CHECK FAILED)"
    figures = [
        *floors,
        Figure(
            f"cm recipient list --json{suffix}",
            run.seconds,
            "s",
            f"{rows / run.seconds:,.0f} rows/s",
            tuple(Baseline(f.name, f.value) for f in floors),
        ),
        Figure("cm recipient list --json peak RSS", run.peak_rss_mb, "MB", "", rss_base),
    ]
    report.table(figures)
    report.target(_target(label, run.peak_rss_mb if not problem else None, problem))


def _check(bench: Bench, database: str, rows: int) -> str:
    """The last page read back: a listing that stopped early would not find the last recipient there."""
    run = bench.cm(database, "recipient", "list", "--json", "--offset", str(rows - 1))
    last = _json(run.stdout) if run.ok else None
    if not (isinstance(last, list) and len(last) == 1 and last[0].get("id") == rows):
        bench.report.note(f"check: the last recipient is not {rows:,}: {(run.stdout or run.stderr)[:200]!r}")
        return "listing check failed"
    bench.report.note(f"check: recipient {rows:,} is the last one, as expected")
    return ""


def _sqlite_cli_floor(bench: Bench, path: Path) -> Figure | None:
    exe = shutil.which("sqlite3")
    if exe is None:
        bench.report.note("floor: not available: the sqlite3 CLI is not installed (apt-get install sqlite3)")
        return None
    run = proc.run([exe, "-json", str(path), FLOOR_QUERY], out_dir=bench.work / "out", discard_stdout=True)
    if not run.ok:
        bench.report.note(f"floor: not available: {run.failure()}")
        return None
    return Figure("sqlite3 -json (floor)", run.seconds, "s", f"peak RSS {run.peak_rss_mb:.0f} MB")


def _psql_floor(bench: Bench, url: str) -> Figure | None:
    exe = shutil.which("psql")
    if exe is None:
        bench.report.note("floor: not available: the psql client is not installed (apt-get install postgresql-client)")
        return None
    copy = f"COPY (SELECT row_to_json(t) FROM ({FLOOR_QUERY}) t) TO STDOUT"
    run = proc.run(
        [exe, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", copy],
        out_dir=bench.work / "out",
        discard_stdout=True,
    )
    if not run.ok:
        bench.report.note(f"floor: not available: {run.failure()}")
        return None
    return Figure("psql COPY row_to_json (floor)", run.seconds, "s", f"peak RSS {run.peak_rss_mb:.0f} MB")


def _driver_floor(bench: Bench, database: str) -> Figure | None:
    argv = [proc.python(), "-m", "bench.listing_floor", database]
    cwd = Path(__file__).parent.parent
    run = proc.run(argv, cwd=cwd, out_dir=bench.work / "out", timeout=bench.timeout, discard_stdout=True)
    if not run.ok:
        bench.report.note(f"floor: not available: driver alone: {run.failure()}")
        return None
    return Figure("driver alone (floor)", run.seconds, "s", f"peak RSS {run.peak_rss_mb:.0f} MB")


def _label(database: str) -> str:
    return "PostgreSQL" if database.startswith("postgres") else "SQLite"


def _target(label: str, rss: float | None, note: str) -> Target:
    return Target(f"listing peak RSS, {label}", RSS_TARGET_MB, "MB", False, rss, note)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
