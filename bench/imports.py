"""Import throughput of `cm group add-recipients --csv`, through the queue and the worker or with `--wait`.

Every figure stands beside the same run's floors: `sqlite3 .import` of the same file into a fresh database (no
validation, no de-duplication), for PostgreSQL also `psql \\copy` into a plain table, and the SQL alone on cm's own
tables (bench/schema_floor.py). After each import the job's counts are read back with `cm jobs list --json`, so a
broken import cannot look fast.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import pg, proc
from bench.gen import Dataset, describe
from bench.report import Baseline, Figure, Report, Target

SQLITE_TARGET = 140_000.0
POSTGRES_TARGET = 55_000.0
WAIT_TARGET = 85_000.0
RSS_TARGET_MB = 150.0
LOCK_TARGET_MS = 1_000.0
GROUP = "bench"


@dataclass(frozen=True)
class Bench:
    report: Report
    work: Path
    timeout: float

    @property
    def env(self) -> dict[str, str]:
        return proc.isolated_env(self.work)

    def cm(self, database: str, *args: str) -> proc.Run:
        argv = [proc.cm(), "--database", database, *args]
        return proc.run(argv, env=self.env, cwd=self.work, out_dir=self.work / "out", timeout=self.timeout)

    @contextmanager
    def fresh_dir(self, name: str) -> Iterator[Path]:
        """A new folder for one benchmark's databases, removed at once after it (a 1M-row database is large)."""
        path = self.work / name
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Check:
    ok: bool
    problem: str = ""
    rss_mb: float | None = None  # peak RSS of `cm jobs list`: a cm process that loads the database layer


def bench_queued_sqlite(bench: Bench, data: Dataset) -> None:
    bench.report.section(
        f"queued import, SQLite, {data.rows:,} rows: `add-recipients --csv` until `worker --drain` exits"
    )
    bench.report.note(f"data: {data.path.name}: {describe(data)}")
    floors = [f for f in (sqlite_floor(bench, data), schema_floor_sqlite(bench, data)) if f]
    with bench.fresh_dir("sqlite") as folder:
        _queued_import(bench, data, database=str(folder / "cm.db"), label="SQLite", floors=floors, rate=SQLITE_TARGET)


def bench_queued_postgres(bench: Bench, data: Dataset, *, server_url: str) -> None:
    bench.report.section(
        f"queued import, PostgreSQL, {data.rows:,} rows: `add-recipients --csv` until `worker --drain` exits"
    )
    bench.report.note(f"data: {data.path.name}: {describe(data)}")
    try:
        with pg.throwaway_database(server_url) as url:
            bench.report.note(f"throwaway database {url.rsplit('/', 1)[-1]} (dropped afterwards); queue in the same")
            with pg.throwaway_database(server_url) as scratch:
                schema = schema_floor(bench, data, scratch, label="PostgreSQL")
            floors = [f for f in (sqlite_floor(bench, data), psql_floor(bench, data, url=url), schema) if f]
            _queued_import(bench, data, database=url, label="PostgreSQL", floors=floors, rate=POSTGRES_TARGET)
    except pg.Unavailable as exc:
        bench.report.note(f"skipped: {exc}")
        bench.report.note("set --postgres URL or CM_BENCH_POSTGRES_URL to a server where you may create databases")
        for target in _targets("PostgreSQL", POSTGRES_TARGET, None, None, note="PostgreSQL not reachable"):
            bench.report.target(target)


def bench_wait(bench: Bench, data: Dataset) -> None:
    bench.report.section(f"import with --wait, SQLite, {data.rows:,} rows (one process, start-up included)")
    bench.report.note(f"data: {data.path.name}: {describe(data)}")
    floors = [f for f in (sqlite_floor(bench, data), schema_floor_sqlite(bench, data)) if f]
    target = Target("import --wait, SQLite", WAIT_TARGET, "rows/s", higher_is_better=True)
    with bench.fresh_dir("wait") as folder:
        db = str(folder / "cm.db")
        setup = _setup(bench, db)
        run = bench.cm(db, "group", "add-recipients", GROUP, "--csv", str(data.path), "--wait") if setup.ok else setup
        if not run.ok:
            bench.report.note(f"not available: {run.failure()}")
            bench.report.table(floors)
            bench.report.target(_missing(target, "command failed"))
            return
        check = check_import(bench, db, data)
        rate = data.rows / run.seconds
        figure = Figure(
            "cm add-recipients --csv --wait" + ("" if check.ok else " (CHECK FAILED)"),
            rate,
            "rows/s",
            f"{run.seconds:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB",
            tuple(Baseline(f.name, f.value) for f in floors),
        )
        bench.report.table([*floors, figure])
        bench.report.target(_measured(target, rate, check))


def sqlite_floor(bench: Bench, data: Dataset) -> Figure | None:
    """`sqlite3 .import --csv` of the file into a fresh database: what writing the rows costs with no checks."""
    exe = shutil.which("sqlite3")
    if exe is None:
        bench.report.note("floor: not available: the sqlite3 CLI is not installed (apt-get install sqlite3)")
        return None
    with bench.fresh_dir("floor-sqlite") as folder:
        db = str(folder / "floor.db")
        out = bench.work / "out"
        run = proc.run([exe, db, f'.import --csv "{data.path}" t'], out_dir=out, timeout=bench.timeout)
        count = proc.run([exe, db, "SELECT count(*) FROM t"], out_dir=out)
    if not run.ok or count.stdout.strip() != str(data.rows):
        problem = run.failure() if not run.ok else f"imported {count.stdout.strip() or '?'} rows"
        bench.report.note(f"floor: not available: sqlite3 .import: {problem}")
        return None
    return Figure("sqlite3 .import (floor)", data.rows / run.seconds, "rows/s", f"{run.seconds:.2f} s")


def psql_floor(bench: Bench, data: Dataset, *, url: str) -> Figure | None:
    """`psql \\copy` of the file into a plain table with no constraints: PostgreSQL's floor."""
    exe = shutil.which("psql")
    if exe is None:
        bench.report.note("floor: not available: the psql client is not installed (apt-get install postgresql-client)")
        return None
    psql = [exe, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c"]
    out = bench.work / "out"
    path = str(data.path).replace("'", "''")
    create = proc.run([*psql, "CREATE TABLE bench_floor (email text, name text, city text, plan text)"], out_dir=out)
    copy = proc.run([*psql, f"\\copy bench_floor FROM '{path}' WITH (FORMAT csv, HEADER true)"], out_dir=out)
    # Dropped at once so that cm works in a database holding only its own tables.
    proc.run([*psql, "DROP TABLE IF EXISTS bench_floor"], out_dir=out)
    if not copy.ok:
        bench.report.note(f"floor: not available: {(copy if create.ok else create).failure()}")
        return None
    return Figure("psql \\copy (floor)", data.rows / copy.seconds, "rows/s", f"{copy.seconds:.2f} s")


def schema_floor_sqlite(bench: Bench, data: Dataset) -> Figure | None:
    with bench.fresh_dir("floor-schema") as folder:
        return schema_floor(bench, data, str(folder / "floor.db"), label="SQLite")


def schema_floor(bench: Bench, data: Dataset, database: str, *, label: str) -> Figure | None:
    """bench/schema_floor.py in a database cm created: the database's own share of an import on cm's tables, with
    rows already parsed and no checks, which any import into these tables must at least run. Its steps go in a
    note."""
    setup = _setup(bench, database)
    run = setup
    if setup.ok:
        argv = [proc.python(), "-m", "bench.schema_floor", database, str(data.path)]
        run = proc.run(argv, cwd=Path(__file__).parent.parent, out_dir=bench.work / "out", timeout=bench.timeout)
    result = _json(run.stdout) if run.ok else None
    if not isinstance(result, dict) or not isinstance(result.get("seconds"), float | int):
        bench.report.note(f"floor: not available: {label} SQL alone: {run.failure() if not run.ok else run.stdout}")
        return None
    seconds = float(result["seconds"])
    steps = ", ".join(f"{name} {value:.2f}" for name, value in result.get("steps", {}).items())
    bench.report.note(f"{label} SQL alone on cm's tables (rows already parsed): {seconds:.2f} s: {steps}")
    return Figure(f"{label} SQL alone (floor)", data.rows / seconds, "rows/s", f"{seconds:.2f} s")


def check_import(bench: Bench, database: str, data: Dataset) -> Check:
    """Read the last job back, compare its counts with what the generator wrote into the file, and count the
    group's members (the database's own word, not the job's)."""
    run = bench.cm(database, "jobs", "list", "--json")
    if not run.ok:
        bench.report.note(f"check: not available: {run.failure()}")
        return Check(False, "cm jobs list failed")
    problem = _check_job(bench.report, _json(run.stdout), data) or _check_group(bench, database, data)
    return Check(not problem, problem, run.peak_rss_mb)


def _check_job(report: Report, jobs: Any, data: Dataset) -> str:
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        report.note(f"check: `cm jobs list --json` did not print a list of jobs: {str(jobs)[:120]!r}")
        return "no job found"
    job: dict[str, Any] = max(jobs, key=_job_order)
    status, counts = job.get("status"), job.get("counts")
    counts = counts if isinstance(counts, dict) else {}
    shown = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v!r}" for k, v in counts.items())
    report.note(f"check: job {job.get('id')} {status}; {shown or 'no counts'}")
    if job.get("error"):
        report.note(f"check: job error: {str(job['error'])[:300]}")
    expected = {
        "read": data.rows,
        "created": data.unique_valid,
        "added": data.unique_valid,
        "duplicates": data.duplicates,
        "invalid": data.invalid,
        "updated": 0,
        "already_member": 0,
        "suppressed": 0,
    }
    differ = [f"{k} {counts[k]!r} (file: {v:,})" for k, v in expected.items() if k in counts and counts[k] != v]
    if differ:
        report.note("check: counts differ from what the generator wrote: " + ", ".join(differ))
    if missing := [k for k in expected if k not in counts]:
        report.note(f"check: counts lack {', '.join(missing)}")
    if status == "done" and counts.get("read") == data.rows:
        return ""
    return f"job {status!r} with read={counts.get('read')!r}, not done with {data.rows:,}"


def _check_group(bench: Bench, database: str, data: Dataset) -> str:
    run = bench.cm(database, "group", "show", GROUP, "--json")
    group = _json(run.stdout) if run.ok else None
    members = group.get("members") if isinstance(group, dict) else None
    if not isinstance(members, int):
        bench.report.note(
            f"check: cannot count the group's members: {run.failure() if not run.ok else run.stdout[:120]}"
        )
        return "group members unknown"
    bench.report.note(f"check: group {GROUP!r} has {members:,} members (file: {data.unique_valid:,} distinct valid)")
    # Within 1%: an import may judge a rare address differently from email-validator, but not lose rows.
    if abs(members - data.unique_valid) > data.unique_valid / 100:
        return f"group has {members:,} members, expected about {data.unique_valid:,}"
    return ""


def _queued_import(
    bench: Bench, data: Dataset, *, database: str, label: str, floors: list[Figure], rate: float
) -> None:
    report = bench.report
    setup = _setup(bench, database)
    idle = _probe(bench, database, limit=20) if setup.ok else None
    started = time.perf_counter()
    add = bench.cm(database, "group", "add-recipients", GROUP, "--csv", str(data.path)) if setup.ok else setup
    with _probing(bench, database) as during:
        drain = bench.cm(database, "worker", "--drain") if add.ok else add
    elapsed = time.perf_counter() - started
    if not drain.ok:
        report.note(f"not available: {drain.failure()}")
        if add.ok:  # the job exists: show what became of it
            check_import(bench, database, data)
        report.table(floors)
        for target in _targets(label, rate, None, None, note="command failed"):
            report.target(target)
        return
    queued = add.stdout.strip().splitlines()[:1] or ["(nothing on stdout)"]
    report.note(f"queued in {add.seconds:.2f} s, printed {queued[0][:80]!r}; worker --drain took {drain.seconds:.2f} s")
    check = check_import(bench, database, data)
    suffix = "" if check.ok else " (CHECK FAILED)"
    speed = data.rows / elapsed
    rss_base = () if check.rss_mb is None else (Baseline("cm jobs list (same db)", check.rss_mb),)
    figures = [
        *floors,
        Figure(f"cm import via queue{suffix}", speed, "rows/s", f"{elapsed:.2f} s", tuple(_bases(floors))),
        Figure("cm worker --drain peak RSS", drain.peak_rss_mb, "MB", "", rss_base),
    ]
    report.table(figures)
    for target in _targets(label, rate, speed, drain.peak_rss_mb, note="" if check.ok else check.problem):
        report.target(target)
    _report_lock(bench, database, label, idle, during)


def _probe(bench: Bench, database: str, *, limit: int = 0, stop: Path | None = None) -> list[float] | None:
    """Opt-out latencies from bench/lock_probe.py (None if it failed)."""
    stop = stop or bench.work / "no-stop"
    argv = [proc.python(), "-m", "bench.lock_probe", database, str(stop), str(limit)]
    run = proc.run(argv, cwd=Path(__file__).parent.parent, out_dir=bench.work / "out", timeout=bench.timeout)
    found = _json(run.stdout) if run.ok else None
    if not isinstance(found, list) or not found:
        bench.report.note(f"opt-out probe: not available: {run.failure() if not run.ok else run.stdout[:120]}")
        return None
    return [float(x) for x in found]


@contextmanager
def _probing(bench: Bench, database: str) -> Iterator[list[list[float] | None]]:
    """Opt-outs every 50 ms in another process while the body runs; their latencies land in the yielded list."""
    stop = bench.work / "probe-stop"
    stop.unlink(missing_ok=True)
    found: list[list[float] | None] = []
    thread = threading.Thread(target=lambda: found.append(_probe(bench, database, stop=stop)), daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.touch()
        thread.join(timeout=60)


def _report_lock(
    bench: Bench, database: str, label: str, idle: list[float] | None, during: list[list[float] | None]
) -> None:
    """An opt-out's latency during the import (the longest, and the median), beside the same opt-out on the idle
    database, and the longest time one of the import's segments held its transaction (SQLite: the write lock)."""
    report = bench.report
    target = Target(f"opt-out latency during the import, {label}", LOCK_TARGET_MS, "ms", higher_is_better=False)
    latencies = during[0] if during else None
    if not latencies or not idle:
        report.target(_missing(target, "the opt-out probe failed"))
        return
    idle_ms = statistics.median(idle) * 1000
    held = _longest_segment(bench, database)
    base = (Baseline("the same opt-out, idle database (median)", idle_ms),)
    worst = max(latencies) * 1000
    figures = [
        Figure("opt-out during the import, longest", worst, "ms", f"{len(latencies)} opt-outs", base),
        Figure("opt-out during the import, median", statistics.median(latencies) * 1000, "ms", "", base),
    ]
    if held is not None:
        figures.append(Figure("longest segment transaction of the import", held * 1000, "ms", "the lock held"))
    report.table(figures)
    report.target(Target(target.name, target.limit, target.unit, False, worst))


def _longest_segment(bench: Bench, database: str) -> float | None:
    """The import's own record of its longest segment transaction (job.result.max_lock_seconds)."""
    argv = [proc.python(), "-m", "bench.lock_probe", "--longest", database]
    run = proc.run(argv, cwd=Path(__file__).parent.parent, out_dir=bench.work / "out", timeout=bench.timeout)
    found = _json(run.stdout) if run.ok else None
    return float(found) if isinstance(found, int | float) else None


def _setup(bench: Bench, database: str) -> proc.Run:
    """Create the database (cm creates a database it is given by name only in `cm db upgrade`) and the group the
    import goes into."""
    created = bench.cm(database, "db", "upgrade")
    return bench.cm(database, "group", "create", GROUP) if created.ok else created


def _targets(label: str, rate: float, speed: float | None, rss: float | None, *, note: str) -> list[Target]:
    """The throughput and memory targets of a queued import; a failed check leaves them unmeasured."""
    measured = note == ""
    return [
        Target(f"queued import, {label}", rate, "rows/s", True, speed if measured else None, note),
        Target(f"worker peak RSS, {label}", RSS_TARGET_MB, "MB", False, rss if measured else None, note),
    ]


def _measured(target: Target, value: float, check: Check) -> Target:
    if not check.ok:
        return _missing(target, f"import result wrong: {check.problem}")
    return Target(target.name, target.limit, target.unit, target.higher_is_better, value)


def _missing(target: Target, note: str) -> Target:
    return Target(target.name, target.limit, target.unit, target.higher_is_better, None, note)


def _bases(floors: list[Figure]) -> Iterator[Baseline]:
    for floor in floors:
        yield Baseline(floor.name, floor.value)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _job_order(job: dict[str, Any]) -> tuple[str, int]:
    """Newest last: by created_at, then by a numeric id."""
    job_id = job.get("id")
    return str(job.get("created_at") or ""), job_id if isinstance(job_id, int) else -1
