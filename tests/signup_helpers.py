"""Signing up through a real `cm serve` (tests/serve_process.py): its configuration (the `outbox` notifier, a
base URL, trusted proxy 127.0.0.1 so that a test can give each request a client address in X-Forwarded-For), the
form's POST, the worker's drain that mails the confirmation, and the link read back from the .eml it wrote."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path

from campaign_manager import api
from campaign_manager.config import Settings
from serve_process import ServeProcess

BASE_URL = "https://lists.example.com"
LINK = re.compile(re.escape(BASE_URL) + r"/confirm/([A-Za-z0-9_-]{44})")


def signup_config(
    folder: Path,
    *,
    double_opt_in: bool = True,
    rate: int = 100,
    base_url: str = BASE_URL,
    notifier: str = "outbox",
    tables: str = "",
) -> str:
    """campaign.toml for a sign-up site; `tables` is added at its end ([notifiers.email], say)."""
    return (
        f'[send]\nnotifier = "{notifier}"\nfrom = "News <news@example.com>"\n'
        f'[serve]\nbase_url = "{base_url}"\ndouble_opt_in = {str(double_opt_in).lower()}\n'
        f'subscribe_rate = {rate}\ntrusted_proxies = ["127.0.0.1"]\n'
        f'[notifiers.outbox]\npath = "{folder / "outbox"}"\n{tables}'
    )


def answer(
    url: str, data: dict[str, str] | None = None, *, client: str = "203.0.113.1", method: str | None = None
) -> tuple[int, str]:
    """(status, body) of a GET, or of a POST of `data` as a form, from `client` (X-Forwarded-For)."""
    body = None if data is None else urllib.parse.urlencode(data).encode()
    request = urllib.request.Request(url, data=body, headers={"X-Forwarded-For": client}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as got:
            return got.status, got.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class SignupSite:
    """A running `cm serve` over `url`, the settings a worker of the same installation reads, and its outbox."""

    server: ServeProcess
    settings: Settings
    outbox: Path

    def subscribe(self, email: str, *, client: str = "203.0.113.1", **fields: str) -> tuple[int, str]:
        return answer(self.server.url + "/subscribe", {"email": email, **fields}, client=client)

    def drain(self) -> api.DrainReport:
        report = api.drain(self.settings)
        assert report.ok, report.outcomes
        return report

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.outbox.glob("*.eml"))] if self.outbox.is_dir() else []

    def links(self, to: str | None = None) -> list[str]:
        """The confirmation tokens in the outbox (to `to` only, if given), a message each, their text parsed as a
        mail reader would."""
        found = []
        for data in self.messages():
            message = message_from_bytes(data, policy=policy.default)
            if to is None or str(message["To"]).lower() == to.lower():
                text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
                found.extend(LINK.findall(text))
        return found

    def confirm(self, token: str, *, client: str = "198.51.100.7", post: bool = True) -> tuple[int, str]:
        return answer(self.server.url + f"/confirm/{token}", {} if post else None, client=client)


def open_site(db_url: str, folder: Path, serve_factory: Callable[..., ServeProcess], **config: object) -> SignupSite:
    folder.mkdir(parents=True, exist_ok=True)
    text = signup_config(folder, **config)  # type: ignore[arg-type]
    (folder / "worker.toml").write_text(text)
    settings = api.load_settings(str(folder / "worker.toml"), {"database.url": db_url})
    return SignupSite(serve_factory(db_url, config=text), settings, folder / "outbox")


def sign_up_and_confirm(site: SignupSite, email: str, **fields: str) -> str | None:
    """The whole double opt-in: the form, the worker's message, the link's button. The token, or None when no
    confirmation was mailed."""
    before = set(site.links(email))
    status, _ = site.subscribe(email, **fields)
    assert status == 200
    site.drain()
    new = [token for token in site.links(email) if token not in before]
    if not new:
        return None
    status, _ = site.confirm(new[0])
    assert status == 200
    return new[0]
