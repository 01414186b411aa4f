"""A real `cm serve` process for tests (`serve_factory`): started on a free port of 127.0.0.1 over a test database,
waited for until `/` answers, stopped with SIGTERM at the end of the test (its exit code checked: 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CM_BIN = Path(sys.executable).parent / "cm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServeProcess:
    url: str
    process: subprocess.Popen[str]
    log: Path
    stopped: bool = field(default=False)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if not self.stopped:
            self.stopped = True
            self.process.send_signal(signum)
            self.process.wait(timeout)
        return int(self.process.returncode)

    def stderr(self) -> str:
        return self.log.read_text()


def start_serve(
    database_url: str, folder: Path, *, env: dict[str, str] | None = None, config: str | None = None
) -> ServeProcess:
    """`cm serve` in a real process; `config` is written to campaign.toml in `folder` (its working folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "campaign.toml").write_text(config)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    log = folder / f"serve-{port}.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [str(CM_BIN), "--database", database_url, "serve", "--port", str(port)],
            env={**clean, **(env or {})},
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    server = ServeProcess(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"cm serve exited {process.returncode}: {server.stderr()}")
        try:
            with urllib.request.urlopen(server.url + "/", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"cm serve did not answer within 30 s: {server.stderr()}")
        time.sleep(0.05)


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(database_url: str, **kwargs: object) -> ServeProcess:
        server = start_serve(database_url, tmp_path / f"serve{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        if not server.stopped:
            code = server.stop()
            assert code == 0, f"cm serve exited {code} on SIGTERM: {server.stderr()}"
