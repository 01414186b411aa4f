"""Running the commands under test: wall time, exit code, output and the child's peak RSS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    peak_rss_mb: float  # of the child and the descendants it waited for
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self) -> str:
        """One line saying why the command failed, for a "not available: ..." note."""
        lines = [line.strip() for line in (self.stderr or self.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        return f"`{' '.join(_short(a) for a in self.argv)}` exited {self.returncode}: {last[:300]}"


def python() -> str:
    return sys.executable


def cm() -> str:
    """The `cm` console script installed beside this interpreter (so both use the same Python)."""
    beside = Path(sys.executable).with_name("cm")
    if beside.exists():
        return str(beside)
    return shutil.which("cm") or "cm"


def isolated_env(home: Path) -> dict[str, str]:
    """The environment for `cm` runs: no CM_* settings and XDG folders inside home, so a user's config or
    database is never read or touched; bytecode may be written, as for any installed program."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    # An installed cm runs from compiled bytecode; where PYTHONDONTWRITEBYTECODE is set (some sandboxes and CI
    # images set it) every run would compile cm's modules from source again, and time that.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["XDG_DATA_HOME"] = str(home / "data")
    return env


def run(
    argv: Sequence[str],
    *,
    out_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900.0,
    discard_stdout: bool = False,
) -> Run:
    """Run argv to completion, timing it and reading its peak RSS from wait4; kill it after timeout seconds.

    Output goes to files rather than pipes, so a chatty command can never block on a full pipe and stall the clock;
    with discard_stdout, stdout goes to /dev/null (a listing of a million rows). The peak RSS is the child's as
    Linux counts it, which carries over this process's own peak at the fork: keep this process small.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = out_dir / "stdout.txt", out_dir / "stderr.txt"
    with (Path(os.devnull) if discard_stdout else out_path).open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        except OSError as exc:
            return Run(tuple(argv), 127, 0.0, 0.0, "", str(exc))
        # wait4 rather than Popen.wait: it also returns the child's rusage, whose ru_maxrss is the peak RSS.
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it does not wait again
    stderr = err_path.read_text(errors="replace")
    if proc.returncode == -signal.SIGKILL and seconds >= timeout:
        stderr += f"\ntimed out after {timeout:.0f} s"
    return Run(
        argv=tuple(argv),
        returncode=proc.returncode,
        seconds=seconds,
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux reports kilobytes
        stdout="" if discard_stdout else out_path.read_text(errors="replace"),
        stderr=stderr,
    )


# A parent of its own for the command: it forks, execs argv in the child, and writes the child's exit code and the
# peak RSS wait4 gives for it (KB) to a file. Linux carries a parent's peak RSS into a child it forks (exec keeps the
# old address space's high-water mark), so the benchmark, which may hold 100,000 rendered messages, cannot be that
# parent. PR_SET_PDEATHSIG: a timeout kills this small parent, and the command goes with it. SIGINT is left to the
# command (it shares the terminal's process group), which may want to record what it did before it exits.
_APART = """
import ctypes, json, os, signal, sys
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    os.execv(sys.argv[2], sys.argv[2:])
signal.signal(signal.SIGINT, signal.SIG_IGN)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump([code, usage.ru_maxrss], out)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_apart(
    argv: Sequence[str], *, out_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float
) -> Run:
    """`run`, with argv's peak RSS measured in a small parent of its own rather than under this process (see
    _APART); argv[0] must be a path. The time includes that parent's start (~20 ms)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "rusage.json"
    result.unlink(missing_ok=True)
    apart = [sys.executable, "-c", _APART, str(result), *argv]
    wrapped = run(apart, out_dir=out_dir, env=env, cwd=cwd, timeout=timeout)
    try:
        code, rss_kb = json.loads(result.read_text())
    except (OSError, ValueError):  # the parent was killed or failed to start the command
        return replace(wrapped, argv=tuple(argv), peak_rss_mb=0.0)
    return replace(wrapped, argv=tuple(argv), returncode=int(code), peak_rss_mb=rss_kb / 1024)


def time_quietly(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Seconds argv took, output discarded; raises CalledProcessError when it fails."""
    started = time.perf_counter()
    subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd, check=True
    )
    return time.perf_counter() - started


def redact(url: str) -> str:
    """url with any password masked, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def _short(arg: str) -> str:
    # Temp paths make the notes long without saying anything; URLs may carry a password.
    if "://" in arg:
        return redact(arg)
    return Path(arg).name if arg.startswith("/") else arg
