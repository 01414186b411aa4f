"""`cm serve` under load: p50 and p99 latency of the REST API's recipient listing (the first page and a deep one)
and of the one-click unsubscribe, with 50 concurrent keep-alive clients on loopback, beside the same run's
`GET /openapi.json` (the framework floor: FastAPI and uvicorn answering with nothing of cm's behind them).

- The database holds N recipients (1,000,000; `--quick`: 50,000), filled with bench/listing.py's set-based SQL after
  `cm db upgrade` (every 50th opted out), and one draft campaign, made by `cm campaign create`, whose id the
  unsubscribe tokens carry. SQLite, then PostgreSQL when the server is reachable (`--postgres`).
- `cm serve` runs as a real process (uvicorn, one process) with CM_API_TOKEN set; the GETs send its bearer token.
- The load is Debian's `wrk` (C, one thread, 50 connections, HTTP/1.1 keep-alive; `apt-get install wrk`), so the
  client takes little of the CPU the server needs. Every one-click POST (`List-Unsubscribe=One-Click`) carries a
  token of its own, for a recipient not yet opted out, drawn at random across the table (tokens made beforehand
  with `sending.tokens.make_token` and the database's secret from `sending.ledger.identity`).
- Interleaved rounds (each round runs every case once, after one warm-up run of each); the figures are the medians
  of the rounds. wrk's latencies are those of a closed loop: each client sends its next request when the last is
  answered.

Nothing counts unless checked: before the runs each URL is fetched once (200; for the listings, 100 recipients from
the right part of the table and a Link rel=next); any error or non-2xx answer during a run fails the run; and
afterwards the database must hold one more opted-out recipient per one-click POST answered (and at most one more per
client and run: wrk does not count the answers still in flight when it stops).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.error import HTTPError

from bench import listing, pg, proc
from bench.imports import Bench
from bench.report import Baseline, Figure
from campaign_manager.api import count_recipients, open_session, select_recipients
from campaign_manager.db import dispose_engines
from campaign_manager.sending.ledger import identity
from campaign_manager.sending.tokens import Purpose, make_token

CLIENTS = 50
PAGE = 100
API_TOKEN = "bench-api-token"
ONE_CLICK = "List-Unsubscribe=One-Click"
FLOOR = "GET /openapi.json"
TOKENS_PER_SECOND = 10_000  # tokens made per second of a POST run: several times what one process answers

# wrk's script: `setup` numbers the threads, `done` prints what the bench reads (latencies in microseconds).
_LUA_COMMON = """
threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local e = summary.errors
  local wrapped = 0
  for _, t in ipairs(threads) do wrapped = wrapped + (t:get("wrapped") or 0) end
  io.write(string.format("CM-BENCH %d %d %.0f %.0f %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout, wrapped))
end
"""
# The one-click POST: thread `id` of `n` takes every n-th token of the file; `wrapped` counts tokens used twice.
_LUA_POST = """
local tokens, next_token = {}, 0
wrapped = 0
function init(args)
  local n, i = tonumber(args[2]), 0
  for line in io.lines(args[1]) do
    if i % n == id then tokens[#tokens + 1] = line end
    i = i + 1
  end
end
local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
function request()
  next_token = next_token + 1
  if next_token > #tokens then next_token, wrapped = 1, wrapped + 1 end
  return wrk.format("POST", "/u/" .. tokens[next_token], headers, "ONE_CLICK")
end
"""


@dataclass(frozen=True)
class Sample:
    """One wrk run."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # connect, read, write, timeout, and answers of status 400 or more
    wrapped: int  # times a thread ran out of tokens (a POST run that reused a token)
    cpu_seconds: float = 0.0  # the server's CPU time (user and system, all its threads) during the run

    @property
    def latency(self) -> tuple[float, float]:
        """p50 and p99, in ms."""
        return self.p50_ms, self.p99_ms

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        """The server's CPU time per answer (those in flight at the end make it a little high)."""
        return self.cpu_seconds * 1000 / self.requests


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # the request's path and query; for the POST, the tokens go after /u/
    post: bool = False


def bench_serve(bench: Bench, *, rows: int, seconds: int, rounds: int, server_url: str) -> None:
    wrk = shutil.which("wrk")
    many = "rounds" if rounds != 1 else "round"
    title = f"cm serve, {rows:,} recipients, {CLIENTS} clients, median of {rounds} {many} of {seconds} s"
    if wrk is None:
        bench.report.section(f"{title}: SQLite")
        bench.report.note("not available: wrk is not installed (apt-get install wrk)")
        return
    bench.report.section(f"{title}: SQLite")
    with bench.fresh_dir("serve-sqlite") as folder:
        path = folder / "cm.db"
        _run(bench, wrk, f"sqlite:///{path}", lambda: listing.fill_sqlite(path, rows), rows, seconds, rounds, folder)
    bench.report.section(f"{title}: PostgreSQL")
    try:
        with pg.throwaway_database(server_url) as url, bench.fresh_dir("serve-postgres") as folder:
            bench.report.note(f"throwaway database {url.rsplit('/', 1)[-1]} (dropped afterwards)")
            _run(bench, wrk, url, lambda: listing.fill_postgres(url, rows), rows, seconds, rounds, folder)
    except pg.Unavailable as exc:
        bench.report.note(f"skipped: {exc}")


def _run(
    bench: Bench,
    wrk: str,
    database: str,
    fill: Callable[[], None],
    rows: int,
    seconds: int,
    rounds: int,
    folder: Path,
) -> None:
    report = bench.report
    try:
        started = time.perf_counter()
        campaign_id = _prepare(bench, database, fill)
        report.note(f"filled with {rows:,} recipients and a campaign in {time.perf_counter() - started:.1f} s")
        cases = [
            Case(FLOOR, "/openapi.json"),
            Case(f"GET /recipients/?limit={PAGE}, first page", f"/recipients/?limit={PAGE}"),
            Case(f"GET /recipients/?limit={PAGE}, deep page", _deep_path(rows)),
            Case(f"POST /u/{{token}} ({ONE_CLICK})", "/u/", post=True),
        ]
        runs = rounds + 1  # and a warm-up run
        ids = _active_ids(rows, min(int(TOKENS_PER_SECOND * seconds) * runs + 1, rows * 9 // 10))
        check_token, token_files = _tokens(database, folder, ids, campaign_id, runs)
        scripts = _scripts(folder)
        with serving(bench, database, folder) as server:
            opted_out = _opted_out(database)
            for case in cases:
                _check(server.url, case, rows, check_token)
            checked = 1  # the check's own one-click POST
            samples: dict[str, list[Sample]] = {case.name: [] for case in cases}
            for n in range(runs):
                for case in cases[n % len(cases) :] + cases[: n % len(cases)]:  # a rotating order
                    cpu = server.cpu_seconds()
                    sample = _wrk(wrk, server.url, case, scripts, token_files[n], seconds if n else 1)
                    sample = replace(sample, cpu_seconds=server.cpu_seconds() - cpu)
                    if n:
                        samples[case.name].append(sample)
                    elif case.post:
                        checked += sample.requests
            rss = server.peak_rss_mb()
        posted = checked + sum(s.requests for s in samples[cases[-1].name])
        gained = _opted_out(database) - opted_out
        # wrk counts the answers within its time; those in flight when it stops (one a client at most) are not.
        if not posted <= gained <= posted + CLIENTS * runs:
            raise RuntimeError(f"{posted:,} one-click POSTs answered, but {gained:,} more recipients opted out")
    except Exception as exc:  # a failed run: say so, keep the other benchmarks going
        report.note(f"failed: {type(exc).__name__}: {exc}")
        return
    figures = []
    for n, label in enumerate(("p50", "p99")):
        floor = Baseline(f"{FLOOR} {label}", statistics.median(s.latency[n] for s in samples[FLOOR]))
        for case in cases:
            done = samples[case.name]
            each = ", ".join(f"{s.latency[n]:.1f}" for s in done)
            rate, cpu = statistics.median(s.rate for s in done), statistics.median(s.cpu_ms for s in done)
            detail = f"{rate:,.0f} req/s, CPU {cpu:.1f} ms/req; rounds {each}" if n == 0 else f"rounds {each}"
            base = () if case.name == FLOOR else (floor,)
            figures.append(
                Figure(f"{case.name} {label}", statistics.median(s.latency[n] for s in done), "ms", detail, base)
            )
    report.table(figures)
    report.note(
        f"checked: every answer 2xx; {posted:,} one-click POSTs answered in time, {gained:,} recipients opted out;"
        f" cm serve's peak RSS {rss:.0f} MB"
    )


def _prepare(bench: Bench, database: str, fill: Callable[[], None]) -> int:
    """The schema, the recipients, and a draft campaign to them (the unsubscribe tokens name it)."""
    upgrade = bench.cm(database, "db", "upgrade")
    if not upgrade.ok:
        raise RuntimeError(upgrade.failure())
    fill()
    create = ("campaign", "create", "--title", "bench", "--subject", "News", "--text", "{{ unsubscribe_url }}")
    made = bench.cm(database, *create, "--group", "bench", "--json")
    if not made.ok:
        raise RuntimeError(made.failure())
    return int(json.loads(made.stdout)["id"])


def _deep_path(rows: int) -> str:
    """A page near the end of the table: the one after recipient rows - 1,000."""
    return f"/recipients/?limit={PAGE}&after={rows - 1_000}"


def _active_ids(rows: int, count: int) -> list[int]:
    """`count` recipients not opted out (bench/listing.py opts out every 50th), in random order, none twice."""
    wanted = count + count // 40 + 1
    picked = random.Random(7).sample(range(1, rows + 1), min(wanted, rows))
    return [i for i in picked if i % listing.OPTED_OUT_EVERY][:count]


def _tokens(database: str, folder: Path, ids: list[int], campaign_id: int, runs: int) -> tuple[str, list[Path]]:
    """The one-click tokens of `ids` (each recipient's link for the campaign): the first for the check, the others
    split into one file per run."""
    try:
        with open_session(database) as session:
            secret = identity(session)[1]
    finally:
        dispose_engines()
    files = []
    share = (len(ids) - 1) // runs
    for n in range(runs):
        path = folder / f"tokens-{n}.txt"
        chunk = ids[1 + n * share : 1 + (n + 1) * share]
        path.write_text("".join(make_token(secret, Purpose.UNSUBSCRIBE, i, campaign_id) + "\n" for i in chunk))
        files.append(path)
    return make_token(secret, Purpose.UNSUBSCRIBE, ids[0], campaign_id), files


def _scripts(folder: Path) -> dict[bool, Path]:
    get, post = folder / "get.lua", folder / "post.lua"
    get.write_text(_LUA_COMMON)
    post.write_text(_LUA_COMMON + _LUA_POST.replace("ONE_CLICK", ONE_CLICK))
    return {False: get, True: post}


def _wrk(wrk: str, url: str, case: Case, scripts: dict[bool, Path], tokens: Path, seconds: int) -> Sample:
    argv = [wrk, "-t1", f"-c{CLIENTS}", f"-d{seconds}s", "--timeout", "60s", "-s", str(scripts[case.post])]
    argv += ["-H", f"Authorization: Bearer {API_TOKEN}", url + case.path]
    if case.post:
        argv += ["--", str(tokens), "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    found = re.search(r"^CM-BENCH (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"wrk on {case.name} exited {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
    requests, micros, p50, p99, errors, wrapped = (int(x) for x in found.groups())
    sample = Sample(requests, micros / 1e6, p50 / 1e3, p99 / 1e3, errors, wrapped)
    if sample.errors or sample.wrapped or not sample.requests:
        problem = f"{sample.errors:,} errors or non-2xx answers, tokens reused {sample.wrapped} times"
        raise RuntimeError(f"{case.name}: {sample.requests:,} requests, {problem}")
    return sample


def _check(url: str, case: Case, rows: int, token: str) -> None:
    """One request of the case, checked, so that a server answering the wrong thing cannot look fast."""
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    if case.post:
        request = urllib.request.Request(url + case.path + token, data=ONE_CLICK.encode(), headers=headers)
    else:
        request = urllib.request.Request(url + case.path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, body, link = answer.status, answer.read(), answer.headers.get("Link", "")
    except HTTPError as exc:
        raise RuntimeError(f"{case.name}: HTTP {exc.code}: {exc.read()[:200]!r}") from None
    if status // 100 != 2:
        raise RuntimeError(f"{case.name}: HTTP {status}")
    if case.path.startswith("/recipients/"):
        items = json.loads(body)
        items = items.get("items", items) if isinstance(items, dict) else items
        first = int(items[0]["id"]) if items else 0
        deep = "after=" in case.path
        if len(items) != PAGE or (deep and first <= rows - 1_000) or (not deep and first != 1):
            raise RuntimeError(f"{case.name}: {len(items)} recipients from id {first}, not {PAGE}")
        if 'rel="next"' not in link:
            raise RuntimeError(f"{case.name}: no Link rel=next header: {link!r}")


def _opted_out(database: str) -> int:
    try:
        with open_session(database, write=False) as session:
            return count_recipients(session, select_recipients(session, status="opted_out"))
    finally:
        dispose_engines()


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """The server's CPU time so far, user and system, all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory so far (VmHWM), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) / 1024 if found else 0.0


@contextmanager
def serving(bench: Bench, database: str, folder: Path) -> Iterator[Server]:
    """`cm serve` on a free port of 127.0.0.1 with the API on, until the block ends (then SIGTERM, as a service
    manager stops it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    argv = [proc.cm(), "--database", database, "serve", "--port", str(port)]
    log = folder / "serve.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            argv, env={**bench.env, "CM_API_TOKEN": API_TOKEN}, cwd=bench.work, stdout=subprocess.DEVNULL, stderr=err
        )
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"cm serve exited {process.returncode}: {log.read_text()[-300:]}")
            try:
                with urllib.request.urlopen(server.url + "/", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cm serve did not answer within 60 s: {log.read_text()[-300:]}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
