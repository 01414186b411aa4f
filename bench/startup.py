"""Start-up time: `cm --help`, `cm group list` and `cm recipient list` (on a small database) beside a bare
interpreter, a bare `import typer` and the stack a database command cannot do without (`import sqlmodel, typer,
rich`), all measured in the same run, interleaved."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path

from bench import proc
from bench.report import Baseline, Figure, Report, Target

HELP_TARGET_MS = 80.0
# A command that reads the database may cost this much more than importing its stack: the rest (cm's own modules,
# the SQLite driver, the tables, opening the database, one query) must fit in 15%.
LIST_TARGET_RATIO = 1.15
PASS = 'python -c "pass"'
TYPER = 'python -c "import typer"'
STACK = 'python -c "import sqlmodel, typer, rich"'
LISTS = ("cm group list", "cm recipient list")


def bench_startup(report: Report, *, runs: int, work: Path) -> None:
    report.section(f"start-up (median of {runs} runs each, interleaved; wall time of the whole process)")
    work.mkdir(parents=True, exist_ok=True)
    env = proc.isolated_env(work)
    db = work / "startup.db"
    commands: dict[str, list[str]] = {
        PASS: [proc.python(), "-c", "pass"],
        TYPER: [proc.python(), "-c", "import typer"],
        STACK: [proc.python(), "-c", "import sqlmodel, typer, rich"],
        "cm --help": [proc.cm(), "--help"],
        "cm group list": [proc.cm(), "--database", str(db), "group", "list"],
        "cm recipient list": [proc.cm(), "--database", str(db), "recipient", "list"],
    }
    setup = _make_small_db(db, env=env, work=work)
    if setup:
        for name in LISTS:
            report.note(f"{name}: not available: {setup}")
            del commands[name]
    for name, argv in list(commands.items()):
        check = proc.run(argv, env=env, cwd=work, out_dir=work / "out", timeout=60)
        if not check.ok:
            report.note(f"{name}: not available: {check.failure()}")
            del commands[name]

    samples = _sample(commands, runs=runs, env=env, cwd=work)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    floors = [Baseline(name, medians[name]) for name in (PASS, TYPER, STACK) if name in medians]
    figures = []
    for name, values in samples.items():
        detail = f"min {min(values):.1f}, max {max(values):.1f}"
        # Each figure beside the floors below it: the bare interpreter, Typer on top of it, then the whole stack a
        # database command needs (for the commands that need it).
        below = {PASS: (), TYPER: (PASS,), STACK: (PASS, TYPER), "cm --help": (PASS, TYPER)}.get(name, (PASS, STACK))
        baselines = tuple(b for b in floors if b.name in below)
        figures.append(Figure(name, medians[name], "ms", detail, baselines))
    report.table(figures)
    report.target(
        Target(
            "cm --help median start-up",
            HELP_TARGET_MS,
            "ms",
            higher_is_better=False,
            measured=medians.get("cm --help"),
            note="" if "cm --help" in medians else "cm --help failed",
        )
    )
    for name in LISTS:
        report.target(_ratio_target(name, samples))
    _instructions(report, {name: commands[name] for name in (STACK, *LISTS) if name in commands}, env=env, cwd=work)


def _instructions(report: Report, commands: dict[str, list[str]], *, env: dict[str, str], cwd: Path) -> None:
    """The same commands' instructions, counted by valgrind (the same count on every run, however busy the machine:
    the ratio wall time cannot settle here). Skipped with a note when valgrind is not installed."""
    valgrind = shutil.which("valgrind")
    if valgrind is None or STACK not in commands:
        report.note("instructions: valgrind is not installed (apt-get install valgrind); wall time only")
        return
    report.section("start-up in instructions (valgrind --tool=cachegrind, PYTHONHASHSEED=0; one run each)")
    counts: dict[str, float] = {}
    for name, argv in commands.items():
        done = subprocess.run(
            [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *argv],
            env={**env, "PYTHONHASHSEED": "0"},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or found is None:
            report.note(f"{name}: valgrind failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        counts[name] = int(found.group(1).replace(",", "")) / 1e6
    floor = [Baseline(STACK, counts[STACK])] if STACK in counts else []
    report.table(
        [Figure(name, value, "M instr", "", tuple(floor) if name != STACK else ()) for name, value in counts.items()]
    )
    for name in LISTS:
        if name in counts and STACK in counts:
            title = f"{name} / import sqlmodel, typer, rich, in instructions"
            ratio = counts[name] / counts[STACK]
            report.target(Target(title, LIST_TARGET_RATIO, "x", higher_is_better=False, measured=ratio))


def _ratio_target(name: str, samples: dict[str, list[float]]) -> Target:
    """`name`'s median over the stack's median, at most LIST_TARGET_RATIO; the note gives the spread of the ratio
    run by run (each run of the command against the stack's run of the same round)."""
    title = f"{name} / import sqlmodel, typer, rich"
    if name not in samples or STACK not in samples:
        return Target(title, LIST_TARGET_RATIO, "x", higher_is_better=False, note=f"{name} or the stack failed")
    ratio = statistics.median(samples[name]) / statistics.median(samples[STACK])
    rounds = [a / b for a, b in zip(samples[name], samples[STACK], strict=False)]
    note = f"round by round {min(rounds):.2f}x-{max(rounds):.2f}x, median {statistics.median(rounds):.2f}x"
    return Target(title, LIST_TARGET_RATIO, "x", higher_is_better=False, measured=ratio, note=note)


def _make_small_db(db: Path, *, env: dict[str, str], work: Path) -> str:
    """A database with one group of 50 recipients; returns why it could not be made, or ''."""
    emails = [arg for i in range(50) for arg in ("--email", f"person{i}@example.com")]
    for argv in (
        [proc.cm(), "--database", str(db), "db", "upgrade"],
        [proc.cm(), "--database", str(db), "group", "create", "bench"],
        [proc.cm(), "--database", str(db), "group", "add-recipients", "bench", *emails],
    ):
        result = proc.run(argv, env=env, cwd=work, out_dir=work / "out", timeout=120)
        if not result.ok:
            return result.failure()
    return ""


def _sample(commands: dict[str, list[str]], *, runs: int, env: dict[str, str], cwd: Path) -> dict[str, list[float]]:
    """Milliseconds per run for each command. Runs are interleaved so that a noisy moment on the machine
    lands on every command alike rather than on whichever was being measured; two warm-up rounds fill the
    page cache (and write cm's bytecode) and are discarded. A round in which any command failed is dropped
    whole, so that the i-th samples of two commands always come from the same round."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 2):
        times: dict[str, float] = {}
        for name, argv in commands.items():
            try:
                times[name] = proc.time_quietly(argv, env=env, cwd=cwd) * 1000
            except subprocess.CalledProcessError:
                continue
        if round_ >= 2 and len(times) == len(commands):
            for name, ms in times.items():
                samples[name].append(ms)
    return {name: values for name, values in samples.items() if values}
