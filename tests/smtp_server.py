"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 (a free port, its own thread) that records every message it
receives and injects faults. conftest.py exposes its fixtures:

    def test_send(smtp_server):                       # started; PIPELINING offered, no TLS, no AUTH
        ... send to smtp_server.host, smtp_server.port (tls = "none") ...
        [m.rcpt for m in smtp_server.messages]        # ["a@example.com"], in the order received
        smtp_server.messages[0].data                  # the bytes the client meant (dot-stuffing undone), CRLF
        smtp_server.messages[0].message_id            # its Message-ID header, "<...>"
        smtp_server.messages[0].session               # which connection brought it (1, 2, ...)
        smtp_server.commands                          # every command: Command(session, verb, arg, followed)
        smtp_server.connections                       # how many connections said EHLO

    def test_other(smtp_server_factory):
        server = smtp_server_factory(pipelining=False, starttls=True, auth=True)

Options (of SmtpServer, and so of the factory), all keyword-only:
    pipelining=True          offer PIPELINING (aiosmtpd itself does not; it reads pipelined commands either way)
    starttls=False           offer STARTTLS, with a self-signed certificate (`tls_certificate`; trust its .cert)
    implicit_tls=False       TLS from the first byte
    auth=False               offer AUTH PLAIN LOGIN (also without TLS); `password` is the one accepted ("secret");
                             every attempt is recorded in `auth_attempts` as (login, password)
    replies="each"           how replies are written: "each" on its own (aiosmtpd's way: pipelined replies arrive
                             in separate segments), "bytes" one byte per segment with a pause between them,
                             "together" held while more commands are waiting (Postfix's way: one segment)
    idle_timeout=300         seconds of silence after which the server closes a connection

`followed` says whether more of the client's input was already waiting when the server read the command: the
client pipelined it (for ".", the end of a message's data: the next commands came with it).

Faults, checked in the order given; each may be limited to messages to one recipient (`to`), to the time after
`after` messages were received, and to a number of uses (`times`). The commands are "EHLO", "MAIL", "RCPT",
"DATA" (the command) and "." (the end of the data: the reply that says whether the message was taken).
    server.reply("RCPT", "550 5.1.1 no such user", to="bob@example.com")
    server.reply(".", "451 4.3.0 try again later")
    server.reply("MAIL", "421 4.3.2 shutting down", after=5)   # a 421 reply also closes the connection
    server.disconnect("MAIL", times=1)                         # closes the connection instead of replying
    server.disconnect(".")          # after the data, before the final reply: recorded with acknowledged=False
    server.stall("RCPT", 5.0)       # waits that long before replying
Down then up: `server.stop()` (open connections are closed too), `server.start()` again on the same port.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

HOST = "127.0.0.1"
COMMANDS = ("EHLO", "MAIL", "RCPT", "DATA", ".")


@dataclass
class Received:
    mail_from: str
    rcpt: list[str]
    data: bytes
    message_id: str | None
    session: int
    acknowledged: bool = False  # the server said 250 to it (False: it disconnected or stalled before)


class Command(NamedTuple):
    session: int
    verb: str  # "EHLO", "MAIL", ..., and "." for the end of a message's data
    arg: str
    followed: bool  # more input was waiting behind it (it was pipelined)


@dataclass
class Fault:
    command: str
    action: str  # "reply", "disconnect" or "stall"
    reply: str = ""
    seconds: float = 0.0
    to: str | None = None
    after: int = 0
    times: int | None = None


@dataclass
class SmtpServer:
    pipelining: bool = True
    starttls: bool = False
    implicit_tls: bool = False
    auth: bool = False
    password: str = "secret"
    replies: str = "each"
    idle_timeout: float = 300.0  # seconds a connection may say nothing before the server closes it
    certificate: tuple[Path, Path] | None = None  # (cert, key), needed for TLS
    port: int = 0
    host: str = HOST
    messages: list[Received] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    sessions: int = 0  # connections accepted, the controller's own probe at start included (numbers them)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._controller: _Controller | None = None
        self._live: set[_Session] = set()
        self.port = self.port or free_port()

    @property
    def connections(self) -> int:
        """Connections that said EHLO or HELO (the controller's probe at start does not)."""
        return len({c.session for c in self.commands if c.verb in ("EHLO", "HELO")})

    # --- faults

    def reply(self, command: str, reply: str, **limits: Any) -> None:
        self._add(Fault(command, "reply", reply=reply, **limits))

    def disconnect(self, command: str, **limits: Any) -> None:
        self._add(Fault(command, "disconnect", **limits))

    def stall(self, command: str, seconds: float, **limits: Any) -> None:
        self._add(Fault(command, "stall", seconds=seconds, **limits))

    def _add(self, fault: Fault) -> None:
        assert fault.command in COMMANDS, fault.command
        with self._lock:
            self.faults.append(fault)

    def fault_for(self, command: str, recipients: list[str]) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.command != command or len(self.messages) < fault.after:
                    continue
                if fault.to is not None and fault.to not in recipients:
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                return fault
        return None

    # --- running

    def start(self) -> SmtpServer:
        assert self._controller is None, "already running"
        context = None
        if self.starttls or self.implicit_tls:
            assert self.certificate is not None, "TLS needs a certificate (the tls_certificate fixture)"
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, self.certificate))
        kwargs: dict[str, Any] = {"server_hostname": "smtp.test", "enable_SMTPUTF8": False}
        kwargs["timeout"] = self.idle_timeout
        if self.starttls:
            kwargs["tls_context"] = context
        if self.auth:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        controller = _Controller(
            _Handler(self),
            hostname=HOST,
            port=self.port,
            ssl_context=context if self.implicit_tls else None,
            **kwargs,
        )
        controller.owner = self
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return
        done = threading.Event()

        def close_all() -> None:
            for session in list(self._live):
                if session.transport is not None:
                    session.transport.close()
            done.set()

        controller.loop.call_soon_threadsafe(close_all)
        done.wait(5)
        controller.stop()

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        login = data.login.decode() if isinstance(data.login, bytes) else str(data.login)
        password = data.password.decode() if isinstance(data.password, bytes) else str(data.password)
        with self._lock:
            self.auth_attempts.append((login, password))
        return AuthResult(success=password == self.password, handled=False)  # aiosmtpd replies 535 on failure


class _Controller(Controller):
    owner: SmtpServer

    def factory(self) -> SMTP:
        return _Session(self.owner, self.handler, **self.SMTP_kwargs)


class _Session(SMTP):
    """aiosmtpd's server session, recording every command, applying the command faults and writing its replies
    the configured way."""

    def __init__(self, owner: SmtpServer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = owner
        self.number = 0
        self._held = b""
        self._smtp_methods = {verb: self._wrap(verb, method) for verb, method in self._smtp_methods.items()}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.number == 0:  # not again after STARTTLS
            with self.owner._lock:
                self.owner.sessions += 1
                self.number = self.owner.sessions
            self.owner._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._live.discard(self)
        super().connection_lost(error)

    def _wrap(self, verb: str, method: Callable[[str], Any]) -> Callable[[str], Any]:
        async def run(arg: str) -> None:
            self.record(verb, arg or "")
            recipients = list(self.envelope.rcpt_tos) if self.envelope else []
            if verb == "RCPT" and arg:
                recipients = [arg.partition(":")[2].strip().strip("<>")]
            fault = self.owner.fault_for(verb, recipients) if verb in COMMANDS else None
            if fault is None or not await self.apply(fault):
                await method(arg)

        return run

    def record(self, verb: str, arg: str) -> None:
        with self.owner._lock:
            self.owner.commands.append(Command(self.number, verb, arg, bool(self._reader._buffer)))

    async def apply(self, fault: Fault) -> bool:
        """Carries out `fault`; True when it replied (or closed) in place of the command."""
        if fault.action == "stall":
            await asyncio.sleep(fault.seconds)
            return False
        if fault.action == "reply":
            await self.push(fault.reply)
            if not fault.reply.startswith("421"):
                return True
        assert self.transport is not None
        self.transport.close()
        await asyncio.Event().wait()  # cancelled when the connection is lost
        return True

    async def push(self, status: str | bytes) -> None:
        data = (status.encode() if isinstance(status, str) else status) + b"\r\n"
        mode = self.owner.replies
        if mode == "bytes":
            for i in range(len(data)):
                self._writer.write(data[i : i + 1])
                await self._writer.drain()
                await asyncio.sleep(0.002)  # long enough for the client to read each byte on its own
            return
        if mode == "together":
            self._held += data
            if self._reader._buffer:  # more commands waiting: answer them all at once
                return
            data, self._held = self._held, b""
        self._writer.write(data)
        await self._writer.drain()


class _Handler:
    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        responses = [r for r in responses if not r.startswith("250-AUTH") or self.owner.auth]
        if self.owner.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: _Session, session: Any, envelope: Any) -> str:
        server.record(".", "")
        data = bytes(envelope.original_content)
        received = Received(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            data,
            BytesHeaderParser().parsebytes(data).get("Message-ID"),
            server.number,
        )
        owner = self.owner
        with owner._lock:
            owner.messages.append(received)
            number = len(owner.messages)
        fault = owner.fault_for(".", received.rcpt)
        if fault is not None:
            if fault.action == "reply":
                received.acknowledged = fault.reply.startswith("2")
                if fault.reply.startswith("421"):
                    await server.apply(fault)
                return fault.reply
            await server.apply(fault)  # disconnect (never returns), or stall
        received.acknowledged = True
        return f"250 2.0.0 OK queued as Q{number}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key), PEM. Made with the `openssl` command,
    else with `cryptography` when it happens to be installed; neither: the test fails saying so."""
    cert, key = folder / "server.crt", folder / "server.key"
    if shutil.which("openssl"):
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
                *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cert, key
    try:
        _cryptography_certificate(cert, key)
    except ImportError:
        pytest.fail("TLS tests need a certificate: install the `openssl` command (or the cryptography package)")
    return cert, key


def _cryptography_certificate(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")])
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    encoding = serialization.Encoding.PEM
    key.write_bytes(private.private_bytes(encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert.write_bytes(built.public_bytes(encoding))


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert, key) of a self-signed certificate for 127.0.0.1; a client trusts it through the cert file."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def smtp_server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., SmtpServer]]:
    """smtp_server_factory(**options) starts a server (see the module's doc); all are stopped after the test."""
    started: list[SmtpServer] = []

    def start(**options: Any) -> SmtpServer:
        if options.get("starttls") or options.get("implicit_tls"):
            options.setdefault("certificate", request.getfixturevalue("tls_certificate"))
        server = SmtpServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def smtp_server(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A started server with the default options: PIPELINING, no TLS, no AUTH."""
    return smtp_server_factory()
