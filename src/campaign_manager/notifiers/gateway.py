"""An HTTP(S) endpoint that takes one JSON object per message by POST, over one kept-alive connection: what the
`webhook` notifier talks to, and what a plugin for an SMS or chat gateway can reuse (examples/cm-sms-gateway).

How answers become results (one rule for every notifier built on this):

- 2xx: `Result.sent`, with the answer's JSON `"id"` (if any) as the provider id.
- 408, 429 and 5xx: `Result.retry`, honouring `Retry-After` (seconds or an HTTP date); no answer within the timeout
  (the request went out, so it may have been delivered): `Result.retry(uncertain=True)`, as is a connection that
  drops before the answer.
- Any other 4xx: `Result.failed`, with the start of the answer's text when it is text or JSON.
- The gateway itself: cannot connect (refused, no such host, a connect timeout, TLS refused), a redirect (the URL
  is wrong), 401 or 403 (the credentials are): `NotifierDown`, so no attempt is counted against a recipient.

Every request carries `Idempotency-Key` (the message's key: the same for every attempt at one delivery) and, with a
secret, `X-CM-Timestamp: UNIX-SECONDS` and `X-CM-Signature: sha256=HEX`, the HMAC-SHA256 with the secret of
`TIMESTAMP.BODY` (the timestamp, a dot, the exact bytes of the body).

http (HTTPStatus), http.client, ssl, hmac and email.utils are imported when they are needed: cm loads every
installed plugin when the config file has a [notifiers.*] table, and http.client alone would add ~50 ms to each such
command.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from campaign_manager import __version__
from campaign_manager.errors import ConfigError
from campaign_manager.notifiers import NotifierDown, Result

if TYPE_CHECKING:
    from http.client import HTTPConnection, HTTPResponse

MAX_ANSWER = 1 << 20  # bytes of an answer read; a longer one is cut and its connection not reused
_REASON_CHARS = 200


class HttpGateway:
    """POSTs JSON objects to `url`, one at a time, over one connection reused until it fails or the server closes
    it. Not for concurrent use (one per notifier, which the sender drives from one thread).

    `setting` names the key that gave `url`, for the error when it is missing or not http(s). `headers` go with
    every request (`Authorization`, say); `secret` signs each body (see the module's doc)."""

    def __init__(
        self,
        url: str | None,
        *,
        setting: str,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        secret: str | None = None,
    ) -> None:
        if not url:
            raise ConfigError(f"{setting} is not set", hint="the gateway's http:// or https:// URL")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{setting} must be an http:// or https:// URL, got {url!r}")
        if parts.username or parts.password:
            raise ConfigError(f"{setting} must not hold credentials: give them as the notifier's token or api key")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if self.tls else 80)
        except ValueError as exc:
            raise ConfigError(f"{setting}: {exc}") from None
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self.headers = {
            "User-Agent": f"campaign-manager/{__version__}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
            **(headers or {}),
        }
        self.secret = secret.encode() if secret else None
        self._conn: HTTPConnection | None = None
        self._used = False  # whether the connection has carried a request (a reused one may have gone stale)

    def open(self) -> None:
        """Connect now, so that a gateway that is down is known before any message: NotifierDown if it is."""
        self._connection()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._used = None, False

    def post(self, payload: Mapping[str, Any], *, key: str) -> Result:
        """POST `payload` as JSON with `Idempotency-Key: key`; the Result its answer means (see the module's doc).
        Raises NotifierDown when the gateway itself cannot take it."""
        import http.client

        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {**self.headers, "Idempotency-Key": key, **self._signature(body)}
        while True:
            reused = self._used
            conn = self._connection()
            try:
                conn.request("POST", self.target, body, headers)
                self._used = True
                response = conn.getresponse()
                answer = response.read(MAX_ANSWER)
            except TimeoutError:
                self.close()
                return Result.retry(f"no answer within {self.timeout:g} s", uncertain=True)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused:
                    # A kept-alive connection the server had closed while idle: once more on a new one (the
                    # Idempotency-Key lets the gateway drop it if the first did arrive).
                    continue
                return Result.retry(f"connection lost: {_one_line(str(exc) or type(exc).__name__)}", uncertain=True)
            if response.will_close or not response.isclosed():  # closing, or an answer longer than we read
                self.close()
            try:
                return self._result(response, answer)
            except NotifierDown:
                self.close()  # the sender backs off for a while: no idle connection held through it
                raise

    def _connection(self) -> HTTPConnection:
        if self._conn is not None:
            return self._conn
        import http.client
        import ssl

        conn: HTTPConnection
        if self.tls:
            context = ssl.create_default_context()  # certificates and host names checked
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
        except ssl.SSLError as exc:
            conn.close()
            raise NotifierDown(f"TLS with {self.host}:{self.port} failed: {_one_line(str(exc))}") from None
        except TimeoutError:
            conn.close()
            raise NotifierDown(
                f"cannot connect to {self.host}:{self.port}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, no such host
            conn.close()
            why = exc.strerror or str(exc) or type(exc).__name__
            raise NotifierDown(f"cannot connect to {self.host}:{self.port}: {_one_line(why)}") from None
        self._conn, self._used = conn, False
        return conn

    def _signature(self, body: bytes) -> dict[str, str]:
        if self.secret is None:
            return {}
        import hashlib
        import hmac

        stamp = str(int(time.time()))
        digest = hmac.new(self.secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return {"X-CM-Timestamp": stamp, "X-CM-Signature": f"sha256={digest}"}

    def _result(self, response: HTTPResponse, answer: bytes) -> Result:
        status = response.status
        reason = _one_line(f"HTTP {status} {response.reason or _phrase(status)}")
        if 200 <= status < 300:
            return Result.sent(_answer_id(answer))
        if status in (408, 429) or status >= 500:
            return Result.retry(reason, after=retry_after(response.getheader("Retry-After")))
        if 300 <= status < 400:
            where = response.getheader("Location") or "nowhere"
            raise NotifierDown(f"{reason}: the URL redirects to {_one_line(where)}; set the final one")
        if status in (401, 403):
            raise NotifierDown(f"{reason}: the gateway refused the credentials")
        excerpt = _excerpt(response.getheader("Content-Type") or "", answer)
        return Result.failed(f"{reason}: {excerpt}" if excerpt else reason)


def retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: a number of seconds or an HTTP date; None when absent or
    unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
        from datetime import UTC

        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _answer_id(answer: bytes) -> str:
    try:
        data = json.loads(answer)
    except ValueError:
        return ""
    found = data.get("id") if isinstance(data, dict) else None
    return "" if found is None or isinstance(found, dict | list) else str(found)


def _excerpt(content_type: str, answer: bytes) -> str:
    """The start of an answer's text, on one line; none for HTML (an error page says nothing a table can show)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if not answer or not (kind.startswith("text/plain") or kind.endswith("json")):
        return ""
    return _one_line(answer.decode("utf-8", "replace"))[:_REASON_CHARS]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
