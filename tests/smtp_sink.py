"""postfix's smtp-sink as a test server (scripts/smtp-sink.sh fetches it into .cache/postfix; `make test` does that
first). It answers pipelined commands in one segment, unlike aiosmtpd. conftest.py exposes the fixture:

    def test_x(smtp_sink_factory):
        sink = smtp_sink_factory()          # PIPELINING offered; smtp_sink_factory("-p") does not offer it
        ... send to sink.host, sink.port ...
        sink.messages()                     # what it received: [SinkMessage(mail_from, rcpt, data), ...]

`data` is the message as the client meant it, dot-stuffing undone, with CRLF line ends (smtp-sink's dump files
have LF: a message with a bare CR or LF cannot be compared exactly). A missing smtp-sink that cannot be fetched
fails the test, saying why: it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smtp_server import HOST, free_port

SCRIPT = Path(__file__).parent.parent / "scripts" / "smtp-sink.sh"


@dataclass
class SinkMessage:
    mail_from: str
    rcpt: list[str]
    data: bytes


@dataclass
class SmtpSink:
    port: int
    process: subprocess.Popen[bytes]
    dumps: Path
    host: str = HOST

    def messages(self) -> list[SinkMessage]:
        """Every message received so far, parsed from smtp-sink's dump files (one a message)."""
        found = []
        for path in sorted(self.dumps.iterdir()):
            head, _, body = path.read_bytes().partition(b"\nReceived: ")
            fields = [line.split(b": ", 1) for line in head.split(b"\n")]
            # The Received header smtp-sink adds is three lines; the message follows, then one empty line.
            body = body.split(b"\n", 3)[3]
            assert body.endswith(b"\n"), path
            found.append(
                SinkMessage(
                    next(v.decode().strip("<>") for k, v in fields if k == b"X-Mail-Args"),
                    [v.decode().strip("<>") for k, v in fields if k == b"X-Rcpt-Args"],
                    body[:-1].replace(b"\n", b"\r\n"),
                )
            )
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def sink_binary() -> Path:
    """The smtp-sink binary, fetched the first time; a failure to fetch fails the test with the script's words."""
    done = subprocess.run(["bash", str(SCRIPT), "fetch"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"postfix's smtp-sink is needed and could not be fetched: {done.stderr.strip()}", pytrace=False)
    return Path(done.stdout.strip())


def start_sink(*flags: str, dumps: Path | None = None) -> SmtpSink:
    """smtp-sink on a free port of 127.0.0.1, with `flags` (`-p`: no PIPELINING); `dumps`: a folder where each
    message is written (it must be writable by `nobody` when running as root)."""
    sink_binary()
    port = free_port()
    args = ["bash", str(SCRIPT), *flags]
    if dumps is not None:
        args += ["-d", f"{dumps}/%H%M%S."]
    process = subprocess.Popen([*args, f"{HOST}:{port}", "1000"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.fail(f"smtp-sink did not start: {err.decode().strip()}", pytrace=False)
            time.sleep(0.02)
    return SmtpSink(port, process, dumps or Path(os.devnull))


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """smtp_sink_factory(*flags) starts smtp-sink recording every message; stopped after the test."""
    started: list[tuple[SmtpSink, Path]] = []

    def start(*flags: str) -> SmtpSink:
        # Under /tmp and open to all: smtp-sink drops root for `nobody`, who cannot enter pytest's tmp_path.
        dumps = Path(tempfile.mkdtemp(prefix="cm-sink-"))
        dumps.chmod(0o777)
        sink = start_sink(*flags, dumps=dumps)
        started.append((sink, dumps))
        return sink

    yield start
    for sink, dumps in started:
        sink.stop()
        shutil.rmtree(dumps, ignore_errors=True)
