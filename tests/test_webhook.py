"""The `webhook` notifier against a real HTTP server on 127.0.0.1 (tests/gateway_server.py): what it POSTs (the
JSON body, Idempotency-Key, the signature), the Result each answer means, NotifierDown when the gateway itself is
down or refuses, and one connection reused across a batch. Driven as the sender drives it: open, send_batch, close."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from campaign_manager import config, notifiers
from campaign_manager.errors import ConfigError
from campaign_manager.notifiers import Message, NotifierDown, Outcome, Result
from campaign_manager.notifiers.gateway import retry_after
from campaign_manager.notifiers.webhook import WebhookNotifier, WebhookSettings
from conftest import make_cm
from gateway_server import Answer, GatewayServer

JSON = (("Content-Type", "application/json"),)
ROOT = Path(__file__).parent.parent


def message(n: int, **fields: Any) -> Message:
    return Message(
        **{
            "key": f"db1-{n}",
            "to": f"ada{n}@example.com",
            "sender": "News <news@example.com>",
            "envelope_from": "news@example.com",
            "subject": f"Hello {n}",
            "text": f"Plain {n}",
            "html": f"<p>Hello {n}</p>",
            "message_id": f"<{n}@example.com>",
            "headers": (("List-Unsubscribe", f"<https://example.com/u/t{n}>"),),
            **fields,
        }
    )


@pytest.fixture
def webhook(gateway_server: GatewayServer) -> Iterator[WebhookNotifier]:
    """A webhook notifier opened on the server, closed after, with a short timeout (the timeout tests wait it)."""
    notifier = WebhookNotifier(WebhookSettings(url=gateway_server.url, timeout=0.5))
    notifier.open()
    try:
        yield notifier
    finally:
        notifier.close()


def test_the_webhook_is_a_builtin_found_through_its_entry_point() -> None:
    assert notifiers.load_notifiers()["webhook"] is WebhookNotifier
    assert "webhook" in notifiers.builtin_notifiers()
    row = {r["name"]: r for r in notifiers.describe_plugins()}["webhook"]
    assert (row["package"], row["needs"], row["status"]) == ("campaign-manager", "email", "loaded")


def test_each_message_is_posted_as_json_with_its_idempotency_key(gateway_server: GatewayServer) -> None:
    notifier = WebhookNotifier(WebhookSettings(url=gateway_server.url + "?team=7", token="t0ken"))
    notifier.open()
    batch = [message(1), message(2, html=None, headers=(), subject="Grüße ✉")]
    assert notifier.send_batch(batch) == [Result.sent("gw-1"), Result.sent("gw-2")]
    notifier.close()
    first, second = gateway_server.requests
    assert first.path == "/messages?team=7"
    assert first.json() == {
        "key": "db1-1",
        "to": "ada1@example.com",
        "from": "News <news@example.com>",
        "subject": "Hello 1",
        "text": "Plain 1",
        "html": "<p>Hello 1</p>",
        "message_id": "<1@example.com>",
        "headers": {"List-Unsubscribe": "<https://example.com/u/t1>"},
    }
    assert (second.json()["html"], second.json()["headers"], second.json()["subject"]) == (None, {}, "Grüße ✉")
    assert "Grüße".encode() in second.body  # UTF-8, not \u escapes
    for request, sent in zip(gateway_server.requests, batch, strict=True):
        assert request.headers["Idempotency-Key"] == sent.key
        assert request.headers["Content-Type"] == "application/json; charset=utf-8"
        assert request.headers["Authorization"] == "Bearer t0ken"
        assert request.headers["User-Agent"].startswith("campaign-manager/")
        assert "X-CM-Signature" not in request.headers  # no secret, no signature


def test_one_connection_carries_a_whole_batch(gateway_server: GatewayServer, webhook: WebhookNotifier) -> None:
    results = webhook.send_batch([message(n) for n in range(5)])
    assert results == [Result.sent(f"gw-{n}") for n in range(1, 6)]
    assert len({r.port for r in gateway_server.requests}) == 1
    webhook.send_batch([message(9)])  # the next batch too, while the notifier stays open
    assert len({r.port for r in gateway_server.requests}) == 1


def test_a_signed_request_verifies_with_the_secret(gateway_server: GatewayServer) -> None:
    notifier = WebhookNotifier(WebhookSettings(url=gateway_server.url, secret="s3cr3t"))
    notifier.send_batch([message(1)])
    [request] = gateway_server.requests
    stamp = request.headers["X-CM-Timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    expected = hmac.new(b"s3cr3t", stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-CM-Signature"], f"sha256={expected}")
    wrong = hmac.new(b"other", stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-CM-Signature"] != f"sha256={wrong}"


def test_the_readmes_receiver_check_accepts_a_signed_request_and_refuses_others(
    gateway_server: GatewayServer,
) -> None:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n### The `webhook` notifier\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec", dont_inherit=True), namespace)
    verify = namespace["verify_signature"]
    WebhookNotifier(WebhookSettings(url=gateway_server.url, secret="s3cr3t")).send_batch([message(1)])
    [request] = gateway_server.requests
    assert verify(b"s3cr3t", request.headers, request.body)
    assert not verify(b"other", request.headers, request.body)
    assert not verify(b"s3cr3t", request.headers, request.body.replace(b"Plain 1", b"Plain 2"))
    stale = {**request.headers, "X-CM-Timestamp": str(int(request.headers["X-CM-Timestamp"]) - 600)}
    assert not verify(b"s3cr3t", stale, request.body)  # a replay, or a signature made for another time


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (Answer(200, b'{"id": "abc-1", "status": "queued"}', JSON), Result.sent("abc-1")),
        (Answer(201, b'{"id": 42}', JSON), Result.sent("42")),
        (Answer(202), Result.sent("")),
        (Answer(200, b"OK"), Result.sent("")),
        (Answer(200, b'["not", "an", "object"]', JSON), Result.sent("")),
        (Answer(500), Result.retry("HTTP 500 Internal Server Error")),
        (Answer(503, b"busy", (("Retry-After", "30"),)), Result.retry("HTTP 503 Service Unavailable", after=30)),
        (
            Answer(502, b"<html>Bad gateway</html>", (("Content-Type", "text/html"),)),
            Result.retry("HTTP 502 Bad Gateway"),
        ),
        (Answer(408), Result.retry("HTTP 408 Request Timeout")),
        (Answer(429, headers=(("Retry-After", "120"),)), Result.retry("HTTP 429 Too Many Requests", after=120)),
        (Answer(429, headers=(("Retry-After", "soon"),)), Result.retry("HTTP 429 Too Many Requests")),
        (Answer(400), Result.failed("HTTP 400 Bad Request")),
        (
            Answer(400, b"invalid recipient:\n  no such\tmailbox", (("Content-Type", "text/plain"),)),
            Result.failed("HTTP 400 Bad Request: invalid recipient: no such mailbox"),
        ),
        (
            Answer(422, b'{"error": "too long"}', (("Content-Type", "application/problem+json"),)),
            Result.failed('HTTP 422 Unprocessable Entity: {"error": "too long"}'),
        ),
        (Answer(404, b"<h1>Not here</h1>", (("Content-Type", "text/html"),)), Result.failed("HTTP 404 Not Found")),
        (Answer(413), Result.failed("HTTP 413 Request Entity Too Large")),
    ],
    ids=lambda value: str(value.status) if isinstance(value, Answer) else "",
)
def test_each_answer_means_one_result_and_the_batch_goes_on(
    gateway_server: GatewayServer, webhook: WebhookNotifier, answer: Answer, result: Result
) -> None:
    gateway_server.answer(answer)
    assert webhook.send_batch([message(1), message(2)]) == [result, Result.sent("gw-2")]
    assert [r.headers["Idempotency-Key"] for r in gateway_server.requests] == ["db1-1", "db1-2"]
    assert len({r.port for r in gateway_server.requests}) == 1  # an error answer keeps the connection


def test_retry_after_as_an_http_date(gateway_server: GatewayServer, webhook: WebhookNotifier) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    gateway_server.answer(Answer(429, headers=(("Retry-After", when),)))
    [result] = webhook.send_batch([message(1)])
    assert (result.outcome, result.reason) == (Outcome.RETRY, "HTTP 429 Too Many Requests")
    assert result.retry_after is not None and 117 <= result.retry_after <= 121


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("3600", 3600.0),
        (" 7 ", 7.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # past: at once
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        ("-5", None),
        ("1.5", None),
        ("tomorrow", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert retry_after(value, now=now) == seconds


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (Answer(401), "HTTP 401 Unauthorized: the gateway refused the credentials"),
        (Answer(403), "HTTP 403 Forbidden: the gateway refused the credentials"),
        (Answer(301, headers=(("Location", "https://new.example/m"),)), "redirects to https://new.example/m"),
        (Answer(307), "HTTP 307 Temporary Redirect: the URL redirects to nowhere"),
    ],
)
def test_refused_credentials_and_redirects_are_the_gateways_failures(
    gateway_server: GatewayServer, webhook: WebhookNotifier, answer: Answer, fragment: str
) -> None:
    # Every message would get the same answer: not the recipients' fault, so no attempt is counted against them.
    gateway_server.answer(answer)
    with pytest.raises(NotifierDown, match=fragment):
        webhook.send_batch([message(1), message(2)])
    assert len(gateway_server.requests) == 1  # it stopped at the first


def test_no_answer_within_the_timeout_is_retried_as_uncertain(
    gateway_server: GatewayServer, webhook: WebhookNotifier
) -> None:
    gateway_server.answer(Answer(200, delay=1.5))
    started = time.monotonic()
    first, second = webhook.send_batch([message(1), message(2)])
    assert time.monotonic() - started < 1.4  # it gave up after the timeout, not after the answer
    # The request went out: it may have been delivered, so the retry may be a duplicate.
    assert first == Result.retry("no answer within 0.5 s", uncertain=True)
    assert second == Result.sent("gw-2")
    assert len({r.port for r in gateway_server.requests}) == 2  # the late answer's connection was dropped


def test_a_keep_alive_connection_the_server_closed_is_replaced(
    gateway_server: GatewayServer, webhook: WebhookNotifier
) -> None:
    gateway_server.answer(Answer(200, b'{"id": "a"}', JSON, hang_up=True))
    assert webhook.send_batch([message(1)]) == [Result.sent("a")]
    time.sleep(0.1)  # the server's close reaches the client
    assert webhook.send_batch([message(2)]) == [Result.sent("gw-2")]
    ports = [r.port for r in gateway_server.requests]
    assert len(ports) == 2 and ports[0] != ports[1]


def test_a_connection_dropped_before_the_answer_is_retried_as_uncertain(
    gateway_server: GatewayServer, webhook: WebhookNotifier
) -> None:
    gateway_server.answer(Answer(200, drop=True))
    first, second = webhook.send_batch([message(1), message(2)])
    assert first == Result.retry("connection lost: Remote end closed connection without response", uncertain=True)
    assert second == Result.sent("gw-2")
    assert len(gateway_server.requests) == 2  # not sent twice within the batch: the retry is the sender's


def test_a_gateway_that_is_down_raises_notifier_down(gateway_server: GatewayServer) -> None:
    port = gateway_server.port
    gateway_server.stop()
    notifier = WebhookNotifier(WebhookSettings(url=gateway_server.url))
    with pytest.raises(NotifierDown, match=re.escape(f"cannot connect to 127.0.0.1:{port}: Connection refused")):
        notifier.open()
    with pytest.raises(NotifierDown, match="Connection refused"):
        notifier.send_batch([message(1)])  # without open, the first message connects
    assert gateway_server.requests == []


def test_a_gateway_going_down_during_a_batch_raises_notifier_down(
    gateway_server: GatewayServer, webhook: WebhookNotifier
) -> None:
    assert webhook.send_batch([message(1)]) == [Result.sent("gw-1")]
    gateway_server.stop()  # its connections are closed too
    with pytest.raises(NotifierDown, match="Connection refused"):
        webhook.send_batch([message(2)])  # its kept-alive connection is dead, and a new one refused
    gateway_server.start()  # back, on the same port
    assert webhook.send_batch([message(2)]) == [Result.sent("gw-2")]


def test_a_host_that_does_not_resolve_raises_notifier_down() -> None:
    notifier = WebhookNotifier(WebhookSettings(url="https://cm-test.invalid/hook", timeout=5))
    with pytest.raises(NotifierDown, match=re.escape("cannot connect to cm-test.invalid:443")):
        notifier.open()


def test_a_tls_failure_raises_notifier_down(gateway_server: GatewayServer) -> None:
    # https:// to a server that speaks plain HTTP: the handshake fails, as with a certificate refused.
    notifier = WebhookNotifier(WebhookSettings(url=f"https://127.0.0.1:{gateway_server.port}/messages"))
    with pytest.raises(NotifierDown, match=re.escape(f"TLS with 127.0.0.1:{gateway_server.port} failed")):
        notifier.open()


@pytest.mark.parametrize(
    ("url", "message_"),
    [
        (None, "notifiers.webhook.url is not set"),
        ("", "notifiers.webhook.url is not set"),
        ("gateway.example.com/messages", "must be an http:// or https:// URL"),
        ("ftp://gateway.example.com/", "must be an http:// or https:// URL"),
        ("https://user:pw@gateway.example.com/", "must not hold credentials"),
        ("https://gateway.example.com:99999/", "notifiers.webhook.url: Port out of range"),
    ],
)
def test_a_url_it_cannot_use_is_a_config_error(url: str | None, message_: str) -> None:
    with pytest.raises(ConfigError, match=message_) as caught:
        WebhookNotifier(WebhookSettings(url=url))
    assert caught.value.exit_code == 7


def test_its_keys_come_from_the_file_and_the_environment_and_its_secrets_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway_server: GatewayServer
) -> None:
    path = tmp_path / "campaign.toml"
    path.write_text(f'[notifiers.webhook]\nurl = "{gateway_server.url}"\ntoken = "t0ken"\ntimeout = 3\n')
    path.chmod(0o600)
    monkeypatch.setenv("CM_NOTIFIERS_WEBHOOK_SECRET", "s3cr3t")
    monkeypatch.setenv("CM_NOTIFIERS_WEBHOOK_RATE", "50")
    settings = config.load_settings(str(path)).notifiers["webhook"]
    assert settings == WebhookSettings(url=gateway_server.url, token="t0ken", secret="s3cr3t", timeout=3.0, rate=50.0)
    shown = make_cm(None)("config show --json").json()["settings"]
    assert shown["notifiers.webhook.token"]["value"] == shown["notifiers.webhook.secret"]["value"] == config.MASKED
    assert "t0ken" not in json.dumps(shown) and "s3cr3t" not in json.dumps(shown)
    # The settings as cm read them drive the notifier.
    assert WebhookNotifier(settings).send_batch([message(1)]) == [Result.sent("gw-1")]
    [request] = gateway_server.requests
    assert request.headers["Authorization"] == "Bearer t0ken" and "X-CM-Signature" in request.headers
