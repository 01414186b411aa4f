"""Rendering a campaign for one recipient: its templates (`templates`), its unsubscribe token (`tokens`) and the
message bytes (`mime`), as a `Message` a notifier sends.

A `Renderer` is made once a campaign and a send: it compiles the three templates, works out the From line, the
Message-ID domain, the MIME skeleton and the List-Unsubscribe parts, so that `render(target)` only fills them in
(tens of microseconds; `bench`, and the figures in docs/templates.md). Everything a recipient's data could break is a
`RenderError` for that one delivery, with a reason that names no address; everything the campaign or the settings
could break is an `InvalidInput` when the Renderer is made, before anything is sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from email.policy import default as default_policy
from types import MappingProxyType
from typing import Any, NamedTuple

from campaign_manager.errors import InvalidInput
from campaign_manager.notifiers import Message, Need
from campaign_manager.sections import UnsubscribeSettings
from campaign_manager.sending import mime
from campaign_manager.sending.templates import (
    GLOBAL_NAMES,
    CampaignView,
    RecipientView,
    RenderError,
    TooLarge,
    check_templates,
    compile_template,
    render_limited,
    template_variables,
)
from campaign_manager.sending.tokens import Purpose, make_token
from campaign_manager.tables.sending import Campaign

__all__ = ["RenderError", "Renderer", "Target", "check_templates"]

# Names a recipient attribute never takes at the top level of a template (it stays in recipient.attributes): cm's
# own variables, Jinja's special names and literals, and its globals (range, dict, ...).
RESERVED = frozenset(
    {"name", "email", "recipient", "campaign", "unsubscribe_url"}
    | {"loop", "self", "super", "caller", "varargs", "kwargs", "true", "false", "none", "True", "False", "None"}
    | GLOBAL_NAMES
)
ONE_CLICK = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")  # RFC 8058
_MAILTO = re.compile(r"[^\s<>\"(),;:?&@\\]+@[^\s<>\"(),;:?&@\\]+")


class Target(NamedTuple):
    """Who one message is for: a delivery of the ledger and its recipient's data."""

    delivery_id: int
    recipient_id: int
    email: str
    name: str | None = None
    phone: str | None = None
    attributes: Mapping[str, Any] = MappingProxyType({})


class Renderer:
    """Renders one campaign's messages. `from_header` is the From (the campaign's address or `send.from`),
    `database_id` the first half of each message's idempotency key, `secrets` the unsubscribe secrets (the first
    signs), `need` the address the notifier sends to, `test` for a `--test-to` copy (its links carry test tokens)."""

    def __init__(
        self,
        campaign: Campaign,
        *,
        from_header: str,
        database_id: str,
        secrets: Sequence[bytes],
        unsubscribe: UnsubscribeSettings,
        max_message_bytes: int,
        need: Need = Need.EMAIL,
        test: bool = False,
    ) -> None:
        if campaign.id is None:
            raise ValueError("the campaign has no id yet (flush it first)")
        if not secrets or not secrets[0]:
            raise ValueError("no secret to sign unsubscribe tokens with")
        self.campaign_id = campaign.id
        self._subject = compile_template("subject", campaign.subject)
        self._text = compile_template("text", campaign.body_text)
        self._html = compile_template("html", campaign.body_html) if campaign.body_html is not None else None
        self._variables = template_variables()
        self._variables["campaign"] = CampaignView(campaign.id, campaign.title)
        self.database_id = database_id
        self.max_message_bytes = max_message_bytes
        self.need = need
        self.test = test
        self._secret = secrets[0]
        self._purpose = Purpose.TEST if test else Purpose.UNSUBSCRIBE

        self.sender = from_header
        name, self.envelope_from, domain = _parse_from(from_header)
        self._from_line = f"From: {mime.mailbox(name, self.envelope_from)}\r\n"
        self._id_domain = mime.ascii_address(f"x@{domain}").partition("@")[2]

        self._mailto = _check_mailto(unsubscribe.mailto)
        self._url_parts = _check_url(unsubscribe.url)
        self._one_click = unsubscribe.url.lower().startswith("https://")
        self._dates = mime.DateHeader()
        if self._html is None:
            self._content = ""
        else:
            # "=_" never occurs in quoted-printable or base64 text, so the bodies cannot contain the boundary.
            boundary = f"=_cm_{os.urandom(12).hex()}"
            self._content = f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
            self._between = f"\r\n--{boundary}\r\n".encode("ascii")
            self._end = f"\r\n--{boundary}--\r\n".encode("ascii")

    def render(self, target: Target) -> Message:
        """The message for `target`, or RenderError (its reason names no address) when its data cannot make one: a
        variable left undefined, a template failing, a line break where a header takes data, a message too large,
        no phone when the notifier needs one."""
        try:
            return self._render(target)
        except RenderError as exc:
            raise RenderError(_scrub(exc.reason, target.email)) from None
        except UnicodeEncodeError:  # a lone surrogate, which JSON attributes can hold: no UTF-8 for it
            raise RenderError("the message holds text that is not valid Unicode (a lone surrogate)") from None

    def _render(self, target: Target) -> Message:
        name = target.name or ""
        email = target.email
        if mime.LINE_BREAKS.search(name):
            raise RenderError("the recipient's name holds a line break")
        if mime.LINE_BREAKS.search(email):
            raise RenderError("the recipient's address holds a line break")
        if self.need is Need.PHONE:
            if not target.phone:
                raise RenderError("no phone")
            to = target.phone
        else:
            to = email
        mailto = url = ""
        if self._mailto or self._url_parts:
            token = make_token(self._secret, self._purpose, target.recipient_id, self.campaign_id)
            if self._mailto:
                mailto = f"mailto:{self._mailto}?subject=unsubscribe%20{token}"
            if self._url_parts:
                url = token.join(self._url_parts)
        attributes = target.attributes
        variables = self._variables.copy()
        for k, v in attributes.items():
            if k not in RESERVED and k.isidentifier():
                variables[k] = v
        variables["name"] = name
        variables["email"] = email
        variables["recipient"] = RecipientView(name, email, target.phone or "", attributes)
        variables["unsubscribe_url"] = url or mailto

        limit = self.max_message_bytes
        try:
            subject = render_limited(self._subject, variables, limit)
            text = render_limited(self._text, variables, limit - len(subject))
            html = None
            if self._html is not None:
                html = render_limited(self._html, variables, limit - len(subject) - len(text))
        except TooLarge:
            raise RenderError(f"message larger than {limit:,} bytes") from None
        if mime.LINE_BREAKS.search(subject):
            raise RenderError("the subject holds a line break once rendered")

        key = f"{self.database_id}-{target.delivery_id}"
        message_id = f"<{key}.{self._tag(target.recipient_id)}@{self._id_domain}>"
        links = [f"<{link}>" for link in (mailto, url) if link]
        head = [
            f"Date: {self._dates.now()}\r\n",
            self._from_line,
            f"To: {mime.mailbox(name, email)}\r\n",
            mime.unstructured("Subject", subject),
            f"\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n",
        ]
        headers: tuple[tuple[str, str], ...] = ()
        if links:
            headers = (("List-Unsubscribe", ", ".join(links)),)
            head.append("List-Unsubscribe: " + ",\r\n ".join(links) + "\r\n")
            if self._one_click:
                headers += (ONE_CLICK,)
                head.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        head.append(self._content)
        text = mime.normalize_newlines(text)
        if html is None:
            data = b"".join(("".join(head).encode("utf-8"), mime.body_part("plain", text)))
        else:
            html = mime.normalize_newlines(html)
            head_bytes = "".join(head).encode("utf-8")
            data = b"".join(
                (head_bytes, mime.body_part("plain", text), self._between, mime.body_part("html", html), self._end)
            )
        if len(data) > limit:
            raise RenderError(f"message larger than {limit:,} bytes")
        return Message(
            key=key,
            to=to,
            sender=self.sender,
            envelope_from=self.envelope_from,
            subject=subject,
            text=text,
            html=html,
            data=data,
            message_id=message_id,
            headers=headers,
        )

    def _tag(self, recipient_id: int) -> str:
        """The Message-ID's second part. The same for every attempt at one delivery, so that a receiver may drop a
        repeat; it names the campaign and the recipient, so that a ledger restored from a backup, which could give a
        delivery id to another message, never makes two messages one. Random for a test copy, which a person may
        send themselves twice and should see twice."""
        if self.test:
            return f"test-{os.urandom(6).hex()}"
        return f"{self.campaign_id}.{recipient_id}"


def _parse_from(value: str) -> tuple[str, str, str]:
    """(display name, address, domain) of a From setting, or InvalidInput."""
    hint = 'set send.from or the campaign\'s --from, e.g. "News <news@example.com>"'
    if mime.LINE_BREAKS.search(value):
        raise InvalidInput("the From address holds a line break", hint=hint)
    header = default_policy.header_factory("From", value)
    addresses: Sequence[Any] = getattr(header, "addresses", ())
    if header.defects or len(addresses) != 1 or not addresses[0].domain or not addresses[0].username:
        raise InvalidInput(f"the From {value!r} is not one email address", hint=hint)
    address = addresses[0]
    return str(address.display_name), str(address.addr_spec), str(address.domain)


def _check_mailto(address: str) -> str:
    if address and not _MAILTO.fullmatch(address):
        raise InvalidInput(f"unsubscribe.mailto {address!r} is not a plain email address")
    return address


def _check_url(url: str) -> list[str]:
    """The URL split around its {token}s (empty when there is no URL), or InvalidInput."""
    if not url:
        return []
    if "{token}" not in url:
        raise InvalidInput(f"unsubscribe.url {url!r} has no {{token}}", hint='e.g. "https://example.com/u/{token}"')
    if not re.fullmatch(r"https?://[!-~]+", url) or any(c in url for c in '<>"\\') or len(url) > 900:
        raise InvalidInput(f"unsubscribe.url {url!r} is not an http(s) URL (ASCII, no spaces, <, > or quotes)")
    return url.split("{token}")


def _scrub(reason: str, email: str) -> str:
    """`reason` on one line, with the recipient's address (in any case) as `<recipient>`."""
    if email:
        reason = re.sub(re.escape(email), "<recipient>", reason, flags=re.IGNORECASE)
    return " ".join(reason.split())
