"""`python -m bench` (`make bench`): cm's start-up, import, listing and sending speed, each figure beside a floor
measured in the same run, as absolute numbers and ratios, then every target as PASS or MISS. Targets are reported,
never enforced: the exit code is 0 unless the options are wrong.

Examples:
  python -m bench                      # everything: start-up, imports (--wait, queued), listing 1,000,000 recipients
  python -m bench --only listing       # `cm recipient list --json` over 1,000,000 recipients, SQLite and PostgreSQL
  python -m bench --only startup       # just start-up
  python -m bench --only send          # the email notifier, then a campaign to 100,000 and one to 1,000,000
  python -m bench --only send --no-send-million   # the same without the 1,000,000 (which takes minutes)
  python -m bench --only serve         # cm serve's latency, 50 clients, 1,000,000 recipients, SQLite and PostgreSQL
  python -m bench --quick              # small sizes, a smoke run of every benchmark in well under a minute
  python -m bench --only sqlite --rows 200000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import campaign, imports, listing, proc, send, serve, startup
from bench.gen import Dataset, ensure_dataset
from bench.imports import Bench
from bench.report import Report

BENCHMARKS = ("startup", "wait", "sqlite", "postgres", "listing", "send", "serve")
ALIASES = {"import": ("wait", "sqlite", "postgres"), "all": BENCHMARKS}
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    selected = _select(args.only)
    queued_rows = args.rows or (50_000 if args.quick else 1_000_000)
    wait_rows = args.rows or (10_000 if args.quick else 100_000)
    runs = args.runs or (7 if args.quick else 21)
    listing_rows = args.rows or (50_000 if args.quick else 1_000_000)
    send_messages = args.rows or (2_000 if args.quick else 100_000)
    campaign_recipients = args.rows or (1_000 if args.quick else 100_000)
    send_million = not args.quick if args.send_million is None else args.send_million
    serve_rows = args.rows or (50_000 if args.quick else 1_000_000)
    serve_seconds = args.serve_seconds or (2 if args.quick else 10)
    serve_rounds = args.serve_rounds or (1 if args.quick else 3)

    report = Report()
    _print_header(
        selected,
        queued_rows=queued_rows,
        wait_rows=wait_rows,
        listing_rows=listing_rows,
        send_messages=send_messages,
        campaign_recipients=campaign_recipients,
        send_million=send_million,
        serve_rows=serve_rows,
        runs=runs,
        quick=args.quick,
    )
    datasets: dict[int, Dataset] = {}

    def dataset(rows: int) -> Dataset:
        if rows not in datasets:
            datasets[rows] = ensure_dataset(rows=rows, seed=args.seed)
        return datasets[rows]

    with tempfile.TemporaryDirectory(prefix="cm-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(report=report, work=work, timeout=args.timeout)
        steps: dict[str, Callable[[], None]] = {
            "startup": lambda: startup.bench_startup(report, runs=runs, work=work / "startup"),
            "wait": lambda: imports.bench_wait(bench, dataset(wait_rows)),
            "sqlite": lambda: imports.bench_queued_sqlite(bench, dataset(queued_rows)),
            "postgres": lambda: imports.bench_queued_postgres(bench, dataset(queued_rows), server_url=args.postgres),
            "listing": lambda: listing.bench_listing(bench, rows=listing_rows, server_url=args.postgres),
            "serve": lambda: serve.bench_serve(
                bench, rows=serve_rows, seconds=serve_seconds, rounds=serve_rounds, server_url=args.postgres
            ),
        }

        def send_step() -> None:
            send.bench_send(report, messages=send_messages, rounds=args.send_rounds, connections=args.connections)
            campaign.bench_campaign(
                bench, recipients=campaign_recipients, rounds=args.send_rounds, connections=args.connections
            )
            if send_million:
                campaign.bench_million(bench, connections=args.connections)

        steps["send"] = send_step
        for name in BENCHMARKS:
            if name in selected:
                steps[name]()
    report.summary()
    if args.quick:
        report.note("--quick: the sizes are too small for the throughput targets to mean much (start-up dominates)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
    )
    names = "|".join((*BENCHMARKS, *ALIASES))
    parser.add_argument(
        "--only",
        action="append",
        metavar=names,
        help="run only these (repeatable or comma-separated; import = wait,sqlite,postgres)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        help="rows for every import benchmark, recipients for the listing and serve, messages and campaign recipients "
        "for send (default 1,000,000; 100,000 for the --wait import and send)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer runs, for a smoke run")
    parser.add_argument("--runs", type=int, help="start-up runs per command (default 21, 7 with --quick)")
    parser.add_argument("--send-rounds", type=int, default=3, help="interleaved rounds of the send benchmark (3)")
    parser.add_argument("--connections", type=int, default=8, help="SMTP connections of the send benchmark (8)")
    parser.add_argument("--serve-seconds", type=int, help="seconds of each serve run (default 10, 2 with --quick)")
    parser.add_argument(
        "--serve-rounds", type=int, help="interleaved rounds of the serve benchmark (3, 1 with --quick)"
    )
    parser.add_argument(
        "--send-million",
        action=argparse.BooleanOptionalAction,
        help="with send, also a campaign to 1,000,000 recipients for its peak RSS (minutes; default on, off with "
        "--quick)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated CSV files (default 42)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("CM_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        metavar="URL",
        help="a server where a throwaway database may be created and dropped "
        "(default $CM_BENCH_POSTGRES_URL or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a command is killed (900)")
    return parser


def _select(only: list[str] | None) -> set[str]:
    if not only:
        return set(BENCHMARKS)
    selected: set[str] = set()
    for name in (part.strip() for item in only for part in item.split(",") if part.strip()):
        if name in ALIASES:
            selected.update(ALIASES[name])
        elif name in BENCHMARKS:
            selected.add(name)
        else:
            _parser().error(f"--only: unknown benchmark {name!r} (choose from {', '.join((*BENCHMARKS, *ALIASES))})")
    return selected


def _print_header(
    selected: set[str],
    *,
    queued_rows: int,
    wait_rows: int,
    listing_rows: int,
    send_messages: int,
    campaign_recipients: int,
    send_million: bool,
    serve_rows: int,
    runs: int,
    quick: bool,
) -> None:
    print(f"cm benchmarks{' (--quick)' if quick else ''}: {', '.join(b for b in BENCHMARKS if b in selected)}")
    print(f"   python {platform.python_version()} at {sys.executable}; cm at {proc.cm()}")
    print(f"   {platform.platform()}, {os.cpu_count()} CPUs; load average {_load()}")
    sizes = [f"start-up {runs} runs"] if "startup" in selected else []
    sizes += [f"--wait import {wait_rows:,} rows"] if "wait" in selected else []
    sizes += [f"queued imports {queued_rows:,} rows"] if selected & {"sqlite", "postgres"} else []
    sizes += [f"listing {listing_rows:,} recipients"] if "listing" in selected else []
    if "send" in selected:
        million = f", {campaign.MILLION:,} for the peak RSS" if send_million else ""
        sizes += [f"send {send_messages:,} messages, a campaign to {campaign_recipients:,}{million}"]
    sizes += [f"serve {serve_rows:,} recipients"] if "serve" in selected else []
    print(f"   sizes: {', '.join(sizes)}")
    print("   ratio = figure / baseline; the baselines are measured in this same run, next to the figure")
    busy = _busy()
    if busy:
        print(f"   note: {busy}; absolute figures will be inflated, the ratios hold up better")


def _busy() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cpus = os.cpu_count() or 1
    return f"the machine is busy (load {load:.1f} on {cpus} CPUs)" if load >= cpus * 0.75 else ""


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # Output piped into `head` and cut short: stop quietly (the temp folder and databases are already cleaned).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
