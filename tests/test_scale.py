"""Every command that handles "all" of something, on a database of more recipients than either backend can bind
as parameters (SQLite: 250,000; PostgreSQL: 65,535), checked for its results and, in a real process, its memory.

The database (tests/bigdb.py, built once per session and backend, copied for each test) holds BIG recipients, all
in group `everyone`, 1, 1001, 2001, ... also in `vip`, every 50th opted out, campaign 1 aimed at `everyone` that
also names each of them, and BIG erased addresses' hashes.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bigdb import BIG, EXPECTED, OPTED_OUT_EVERY, copy_postgres, copy_sqlite
from conftest import CM_BIN, POSTGRES_URL, Run, make_cm

E = EXPECTED
RSS_LIMIT_MB = 150
ACTIVE_IDS = [i for i in range(1, BIG + 1) if i % OPTED_OUT_EVERY]


def _env() -> dict[str, str]:
    # COLUMNS: a terminal of a known width for Rich (a new pseudo-terminal reports none).
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CM_")}, "COLUMNS": "160"}


# Runs a command as its own child and writes the child's exit code and peak RSS (KB) to a file. A child of pytest
# itself would not do: Linux carries the parent's peak RSS into the child's (exec records the old address space's
# high-water mark), and pytest may be holding a parsed listing of 260,000 rows.
_MEASURE = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], out)
"""


def run_measured(
    args: list[str], *, stdout: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> tuple[int, float, str]:
    """`cm ARGS > stdout` in a real process: exit code, peak RSS in MB and stderr."""
    result = stdout.with_suffix(".rusage")
    argv = [sys.executable, "-c", _MEASURE, str(result), str(CM_BIN), *args]
    with stdout.open("wb") as out:
        # A session of its own, so that a timeout stops cm too, not only the wrapper.
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.PIPE, env={**_env(), **(env or {})}, start_new_session=True
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    assert proc.returncode == 0, stderr
    code, rss_kb = json.loads(result.read_text())
    return code, rss_kb / 1024, stderr.decode()


def run_in_terminal(args: list[str], *, timeout: float = 300) -> tuple[int, str, str]:
    """`cm ARGS` with stdout on a pseudo-terminal (as a person runs it): exit code, what the terminal showed and
    stderr (a pipe)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(CM_BIN), *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=_env()
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    proc.wait(timeout)
    return proc.returncode, b"".join(chunks).decode(), stderr


def _table_ids(text: str) -> list[int]:
    """The ids of a table's rows (the first column), header and blank lines skipped."""
    ids = []
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if first.isdigit():
            ids.append(int(first))
    return ids


@pytest.fixture
def big_cm(big_url: str) -> Callable[..., Run]:
    return make_cm(big_url)


def test_list_json_streams_every_recipient_in_bounded_memory(
    big_url: str, big_cm: Callable[..., Run], tmp_path: Path
) -> None:
    out = tmp_path / "list.json"
    code, rss_mb, stderr = run_measured(["--database", big_url, "recipient", "list", "--json"], stdout=out)
    assert code == 0, stderr
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert len(rows) == E.recipients
    assert [row["id"] for row in rows] == list(range(1, BIG + 1))
    assert rows[0]["email"] == E.email(1) and rows[-1]["email"] == E.email(BIG)
    assert (rows[0]["groups"], rows[1]["groups"]) == (["everyone", "vip"], ["everyone"])
    assert sum(row["status"] == "opted_out" for row in rows) == E.opted_out
    # The same objects `show` prints, dates and attributes included.
    for i in (1, OPTED_OUT_EVERY, BIG):
        assert rows[i - 1] == big_cm(f"recipient show {i} --json").json()
    assert rss_mb < RSS_LIMIT_MB, f"peak RSS {rss_mb:.0f} MB"


def test_a_table_into_a_pipe_has_every_row(big_sqlite_template: Path, tmp_path: Path) -> None:
    # On SQLite only (15-20 s a backend): the table is drawn the same way from either, and PostgreSQL lists a big
    # group in full in test_a_group_listing_reads_each_membership_about_once.
    run = make_cm(copy_sqlite(big_sqlite_template, tmp_path))("group recipients everyone --active")
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["id", "email", "name", "status", "groups"]
    assert _table_ids(run.stdout) == ACTIVE_IDS
    assert len(lines) == 1 + E.active  # one line a row, however long the table
    assert lines[1].split() == ["1", E.email(1), "Person", "0000001", "active", "everyone,", "vip"]
    assert run.stderr == ""


def test_a_table_on_a_terminal_shows_the_first_thousand_and_says_how_to_see_the_rest(big_url: str) -> None:
    db = ["--database", big_url]
    code, shown, stderr = run_in_terminal([*db, "recipient", "list"])
    assert code == 0
    assert _table_ids(shown) == list(range(1, 1001))
    assert stderr.splitlines() == [
        f"showed the first 1,000 of {BIG:,} recipients; see the rest with --limit and --offset, "
        "or all of them with --json or through a pipe (cm ... | less)"
    ]
    # With --limit, or fewer than 1,000 left: everything asked for, and nothing on stderr.
    for args, expected in [
        (["--limit", "5", "--offset", "10"], list(range(11, 16))),
        (["--offset", str(BIG - 5)], list(range(BIG - 4, BIG + 1))),
        (["--group", "vip"], list(range(1, BIG + 1, 1000))),
    ]:
        code, shown, stderr = run_in_terminal([*db, "recipient", "list", *args])
        assert (code, _table_ids(shown), stderr) == (0, expected, ""), args


def test_filters_limit_and_offset_run_in_sql(big_cm: Callable[..., Run]) -> None:
    def ids(args: str) -> list[int]:
        return [row["id"] for row in big_cm(f"{args} --json").json()]

    assert ids("recipient list --opted-out") == list(range(OPTED_OUT_EVERY, BIG + 1, OPTED_OUT_EVERY))
    assert ids("recipient list --group vip") == list(range(1, BIG + 1, 1000))
    assert ids("recipient list --search USER025999") == list(range(259990, 260000))
    assert ids(f"recipient list --limit 3 --offset {BIG - 3}") == [BIG - 2, BIG - 1, BIG]
    assert ids("recipient list --active --limit 2 --offset 250000") == ACTIVE_IDS[250000:250002]
    assert ids("recipient active --group everyone --limit 2 --offset 250000") == ACTIVE_IDS[250000:250002]
    assert ids(f"recipient list --offset {BIG}") == []


def test_group_counts_and_delete_of_a_big_group(big_cm: Callable[..., Run]) -> None:
    counts = {g["name"]: (g["members"], g["active_members"]) for g in big_cm("group list --json").json()}
    assert counts == {"everyone": (BIG, E.active), "vip": (E.vip, E.vip)}
    assert f"{BIG}" in big_cm("group list").stdout
    deleted = big_cm("group delete everyone --json")
    assert (deleted.json()["members"], deleted.json()["active_members"]) == (BIG, E.active)
    assert f"{BIG} members kept" in deleted.stderr
    assert [g["name"] for g in big_cm("group list --json").json()] == ["vip"]
    assert big_cm(f"recipient show {BIG} --json").json()["groups"] == []
    # The campaign loses the group but still names everyone.
    shown = big_cm("campaign show 1 --json").json()
    assert (shown["groups"], shown["named_recipients"], shown["audience"]) == ([], BIG, E.active)


def test_campaign_list_and_show_count_the_people_they_name(big_url: str, tmp_path: Path) -> None:
    # Real processes, with a timeout: PostgreSQL used to plan the audience as a test of every recipient against
    # a list of all the others once those no longer fit in work_mem (hours, at a million recipients and the
    # default 4 MB; here 260,000 and 1 MB), and `show` listed every named address.
    db = ["--database", big_url]
    out = tmp_path / "show.json"
    small = {"PGOPTIONS": "-c work_mem=1MB"}
    code, rss_mb, stderr = run_measured([*db, "campaign", "show", "1", "--json"], stdout=out, timeout=120, env=small)
    assert code == 0, stderr
    shown = json.loads(out.read_text(encoding="utf-8"))
    assert (shown["groups"], shown["named_recipients"], shown["audience"]) == (["everyone"], BIG, E.active)
    assert rss_mb < RSS_LIMIT_MB
    code, _, stderr = run_measured([*db, "campaign", "list", "--json"], stdout=out, timeout=120, env=small)
    assert code == 0, stderr
    listed = json.loads(out.read_text(encoding="utf-8"))
    assert [(c["id"], c["named_recipients"], c["audience"]) for c in listed] == [(1, BIG, E.active)]
    code, _, stderr = run_measured([*db, "campaign", "list"], stdout=out, timeout=120)
    assert code == 0 and str(E.active) in out.read_text(encoding="utf-8")


def test_one_member_of_a_big_group(big_cm: Callable[..., Run]) -> None:
    def everyone() -> tuple[int, int]:
        group = big_cm("group show everyone --json").json()
        return group["members"], group["active_members"]

    def campaign() -> tuple[int, int]:
        shown = big_cm("campaign show 1 --json").json()
        return shown["named_recipients"], shown["audience"]

    a, b, c = E.email(130002), E.email(130003), E.email(130004)  # active, in `everyone` only
    exported = big_cm(f"recipient export {a}").json()
    assert (exported["groups"], exported["status"], exported["consent_history"]) == (["everyone"], "active", [])

    assert big_cm(f"recipient opt-out {a} --json").json()["status"] == "opted_out"
    assert everyone() == (BIG, E.active - 1)
    assert campaign() == (BIG, E.active - 1)

    removed = big_cm(f"group remove-recipients everyone --email {b} --json").json()
    assert [r["outcome"] for r in removed] == ["removed"]
    assert everyone() == (BIG - 1, E.active - 2)
    assert campaign() == (BIG, E.active - 1)  # still named

    added = big_cm(f"group add-recipients everyone --email {b} --email new@example.com --json").json()
    assert [r["outcome"] for r in added] == ["added", "created"]
    assert everyone() == (BIG + 1, E.active)
    assert campaign() == (BIG, E.active)  # the new member is in the audience

    assert big_cm(f"recipient forget {c} --json").json()["forgotten"] is True
    assert everyone() == (BIG, E.active - 1)
    assert campaign() == (BIG - 1, E.active - 1)
    assert big_cm(f"recipient list --search {c} --json").json() == []
    again = big_cm(f"group add-recipients everyone --email {c} --json").json()
    assert [(r["outcome"], r["reason"]) for r in again] == [("suppressed", "forgotten on request")]


def test_adding_a_few_addresses_does_not_read_every_erased_one(big_url: str, tmp_path: Path) -> None:
    db = ["--database", big_url]
    code, baseline_mb, stderr = run_measured([*db, "group", "show", "everyone"], stdout=tmp_path / "show.txt")
    assert code == 0, stderr
    out = tmp_path / "added.json"
    args = [*db, "group", "add-recipients", "everyone", "--email", "new@example.com", "--json"]
    code, rss_mb, stderr = run_measured(args, stdout=out)
    assert code == 0, stderr
    assert [r["outcome"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["created"]
    # The database holds BIG erased addresses' hashes: a set of them all took 65-90 MB more.
    assert rss_mb < baseline_mb + 15, f"{rss_mb:.0f} MB against {baseline_mb:.0f} MB for `group show`"


@pytest.mark.parametrize("args", [["recipient", "list"], ["recipient", "list", "--json"]])
def test_a_reader_that_stops_early_ends_the_listing_quietly(big_url: str, args: list[str]) -> None:
    proc = subprocess.Popen(
        [str(CM_BIN), "--database", big_url, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(120) == 1
    assert first.strip() and stderr == ""


@pytest.mark.postgres
def test_a_group_listing_reads_each_membership_about_once(big_postgres_template: str) -> None:
    # PostgreSQL does not carry a page's `recipient.id > last` over to group_member: merging from the group's
    # first member, every page read all the memberships before it again (a million members: 250 million reads).
    import psycopg

    assert POSTGRES_URL is not None
    server = POSTGRES_URL.rpartition("/")[0] + "/postgres"
    with copy_postgres(big_postgres_template, server) as url, psycopg.connect(url, autocommit=True) as con:
        listed = subprocess.run(
            [str(CM_BIN), "--database", url, "group", "recipients", "everyone", "--json"],
            capture_output=True,
            env=_env(),
            timeout=300,
        )
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.decode().splitlines()  # one element a line: "[{...},", " {...},", ..., " {...}]"
        assert len(lines) == BIG
        first, last = json.loads(lines[0][1:-1]), json.loads(lines[-1][1:-1])
        assert (first["id"], first["groups"], last["id"], last["groups"]) == (1, ["everyone", "vip"], BIG, ["everyone"])
        # A backend's statistics reach the views when it ends, just after cm has.
        reads = 0
        for _ in range(100):
            con.execute("SELECT pg_stat_clear_snapshot()")
            row = con.execute(
                "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'group_member_pkey'"
            ).fetchone()
            reads = row[0] if row else 0
            if reads:
                break
            time.sleep(0.1)
    # Each membership twice (once to find the page's members, once for their groups' names), not once a page.
    assert 0 < reads < 3 * BIG, f"{reads:,} reads of group_member's index to list {BIG:,} members"


def test_sending_to_everyone_writes_the_ledger_and_sends_in_bounded_memory(big_url: str, tmp_path: Path) -> None:
    # The whole send in a real process, to postfix's smtp-sink: the ledger written in segments (no statement binds
    # more than a claimed batch), every active recipient mailed once, the opted-out skipped, memory flat.
    from smtp_sink import start_sink

    sink = start_sink()
    try:
        config = tmp_path / "campaign.toml"
        config.write_text(
            '[send]\nnotifier = "email"\nfrom = "News <news@example.com>"\n\n'
            f'[notifiers.email]\nhost = "{sink.host}"\nport = {sink.port}\ntls = "none"\nconnections = 8\n',
            encoding="utf-8",
        )
        args = ["--config", str(config), "--database", big_url, "campaign", "send", "1", "--wait"]
        code, rss_mb, stderr = run_measured([*args, "--no-unsubscribe-link"], stdout=tmp_path / "send.out", timeout=900)
        assert code == 0, stderr
        assert rss_mb < RSS_LIMIT_MB
    finally:
        sink.stop()
    stats = make_cm(big_url)("campaign stats 1 --json").json()
    assert (stats["status"], stats["sent"], stats["skipped"], stats["pending"]) == ("sent", E.active, BIG - E.active, 0)
    assert stats["attempts"] == E.active
