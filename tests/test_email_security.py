"""The email notifier's TLS and AUTH rules against a real aiosmtpd server: STARTTLS is required when asked for (no
message and no password to a server that does not offer it), certificates are checked, AUTH never goes in clear
to a host that is not loopback; and its settings, as campaign.toml and the environment give them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from campaign_manager import config
from campaign_manager.errors import ConfigError
from campaign_manager.notifiers.email import EmailNotifier, EmailSettings, is_loopback
from conftest import make_cm
from email_helpers import messages, send, sent_all, settings
from smtp_server import SmtpServer

Servers = Callable[..., SmtpServer]
CERT = tuple[Path, Path]


def test_starttls_required_and_not_offered_sends_nothing_not_even_the_password(smtp_server_factory: Servers) -> None:
    server = smtp_server_factory(auth=True)  # AUTH offered in clear, STARTTLS not offered
    results, down = send(settings(server, tls="starttls", username="news", password="secret"), messages(2))
    assert down is not None and results == {}
    assert down.reason == f'127.0.0.1:{server.port} does not offer STARTTLS, which tls = "starttls" requires'
    assert server.auth_attempts == [] and server.messages == []
    assert {c.verb for c in server.commands} <= {"EHLO", "QUIT"}


def test_starttls_with_auth_sends_after_the_handshake(smtp_server_factory: Servers, tls_certificate: CERT) -> None:
    server = smtp_server_factory(starttls=True, auth=True)
    config = settings(server, tls="starttls", ca_file=tls_certificate[0], username="news", password="secret")
    items = messages(5)
    results, down = send(config, items)
    assert down is None and sent_all(results, items)
    assert server.auth_attempts == [("news", "secret")] * server.connections
    verbs = [c.verb for c in server.commands if c.session == server.messages[0].session]
    assert verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]


def test_a_wrong_password_is_notifier_down(smtp_server_factory: Servers, tls_certificate: CERT) -> None:
    server = smtp_server_factory(starttls=True, auth=True)
    config = settings(server, tls="starttls", ca_file=tls_certificate[0], username="news", password="nope")
    _, down = send(config, messages(1))
    assert down is not None and down.reason == "AUTH: 535 5.7.8 Authentication credentials invalid"
    assert server.messages == []


def test_starttls_to_an_untrusted_certificate_is_refused_before_auth(smtp_server_factory: Servers) -> None:
    server = smtp_server_factory(starttls=True, auth=True)
    _, down = send(settings(server, tls="starttls", username="news", password="secret"), messages(1))
    assert down is not None and down.reason.startswith("STARTTLS: ") and "CERTIFICATE_VERIFY_FAILED" in down.reason
    assert server.auth_attempts == [] and "AUTH" not in {c.verb for c in server.commands}


@pytest.mark.parametrize(
    ("verify", "trust", "works"),
    [(True, False, False), (True, True, True), (False, False, True)],
    ids=["self-signed-refused", "trusted-through-ca_file", "verify-off"],
)
def test_implicit_tls_checks_the_certificate(
    smtp_server_factory: Servers, tls_certificate: CERT, verify: bool, trust: bool, works: bool
) -> None:
    server = smtp_server_factory(implicit_tls=True)
    ca_file = tls_certificate[0] if trust else None
    items = messages(3)
    results, down = send(settings(server, tls="implicit", verify=verify, ca_file=ca_file), items)
    if works:
        assert down is None and sent_all(results, items) and len(server.messages) == 3
    else:
        assert down is not None and "CERTIFICATE_VERIFY_FAILED" in down.reason and down.reason.startswith("connect")
        assert server.messages == [] and server.commands == []


def test_auth_without_tls_to_a_loopback_host_is_allowed(smtp_server_factory: Servers) -> None:
    server = smtp_server_factory(auth=True)
    items = messages(2)
    results, down = send(settings(server, tls="none", username="news", password="secret"), items)
    assert down is None and sent_all(results, items) and server.auth_attempts


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.1", "2001:db8::1", "localhost.example.com"])
def test_auth_without_tls_to_another_host_is_a_config_error(host: str) -> None:
    with pytest.raises(ConfigError, match="would send the password in clear") as caught:
        EmailNotifier(EmailSettings(host=host, tls="none", username="news", password="secret"))
    assert host in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *(("localhost", True), ("LOCALHOST.", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True)),
        *(("[::1]", True), ("128.0.0.1", False), ("mail.local", False), ("0.0.0.0", False)),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"tls": "ssl"}, 'notifiers.email.tls must be "starttls", "implicit" or "none", got \'ssl\''),
        ({"host": None}, "notifiers.email.host is not set"),
        ({"connections": 0}, "connections must be at least 1"),
    ],
)
def test_settings_that_cannot_work_are_config_errors(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EmailNotifier(EmailSettings(**{"host": "smtp.example.com", **values}))
    assert fragment in caught.value.message


def test_the_table_and_the_environment_reach_the_notifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text(
        '[notifiers.email]\nhost = "smtp.example.com"\nport = 465\ntls = "implicit"\nusername = "news"\n'
        'connections = 3\ntimeout = 10\nca_file = "ca.pem"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    monkeypatch.setenv("CM_SMTP_PASSWORD", "s3cret-from-env")
    monkeypatch.setenv("CM_NOTIFIERS_EMAIL_RATE", "50")
    loaded = config.load_settings(str(path)).notifiers["email"]
    assert loaded == EmailSettings(
        host="smtp.example.com",
        port=465,
        tls="implicit",
        ca_file=tmp_path / "ca.pem",
        username="news",
        password="s3cret-from-env",
        connections=3,
        timeout=10.0,
        rate=50.0,
    )
    EmailNotifier(loaded)  # valid
    shown = make_cm(None)("config show --json")  # the file in the working folder
    assert "s3cret-from-env" not in shown.stdout
    assert shown.json()["settings"]["notifiers.email.password"] == {
        "value": config.MASKED,
        "source": "env CM_SMTP_PASSWORD",
    }
