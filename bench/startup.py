"""Start-up time: `cm --help` and `cm recipient list` beside a bare interpreter and a bare `import typer`."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from bench import proc
from bench.report import Baseline, Figure, Report, Target

HELP_TARGET_MS = 80.0
PASS = 'python -c "pass"'
TYPER = 'python -c "import typer"'


def bench_startup(report: Report, *, runs: int, work: Path) -> None:
    report.section(f"start-up (median of {runs} runs each, interleaved; wall time of the whole process)")
    work.mkdir(parents=True, exist_ok=True)
    env = proc.isolated_env(work)
    db = work / "startup.db"
    commands: dict[str, list[str]] = {
        PASS: [proc.python(), "-c", "pass"],
        TYPER: [proc.python(), "-c", "import typer"],
        "cm --help": [proc.cm(), "--help"],
        "cm recipient list": [proc.cm(), "--database", str(db), "recipient", "list"],
    }
    setup = _make_small_db(db, env=env, work=work)
    if setup:
        report.note(f"cm recipient list: not available: {setup}")
        del commands["cm recipient list"]
    for name, argv in list(commands.items()):
        check = proc.run(argv, env=env, cwd=work, out_dir=work / "out", timeout=60)
        if not check.ok:
            report.note(f"{name}: not available: {check.failure()}")
            del commands[name]

    samples = _sample(commands, runs=runs, env=env, cwd=work)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    floors = [Baseline(name, medians[name]) for name in (PASS, TYPER) if name in medians]
    figures = []
    for name, values in samples.items():
        detail = f"min {min(values):.1f}, max {max(values):.1f}"
        # Each figure is compared with the floors below it: the bare interpreter, then Typer on top of it.
        below = {PASS: (), TYPER: (PASS,)}.get(name, (PASS, TYPER))
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
    page cache and are discarded."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 2):
        for name, argv in commands.items():
            try:
                ms = proc.time_quietly(argv, env=env, cwd=cwd) * 1000
            except subprocess.CalledProcessError:
                continue
            if round_ >= 2:
                samples[name].append(ms)
    return {name: values for name, values in samples.items() if values}
