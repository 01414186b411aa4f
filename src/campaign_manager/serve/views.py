"""The pages' templates: Jinja2, sandboxed and autoescaped, from the operator's folder (`serve.templates`) first and
then the built-in ones (`serve/templates/`), so that a file of the same name replaces a built-in page or the
confirmation message. Every page extends `base.html` and gets `sender` (the name of `send.from`)."""

from __future__ import annotations

from email.utils import parseaddr
from typing import TYPE_CHECKING, Any

from jinja2 import ChoiceLoader, FileSystemLoader, PackageLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from campaign_manager.errors import ConfigError

if TYPE_CHECKING:
    from campaign_manager.config import Settings


class Views:
    def __init__(self, settings: Settings) -> None:
        loaders: list[Any] = []
        folder = settings.serve.templates
        if folder is not None:
            if not folder.is_dir():
                raise ConfigError(f"serve.templates {str(folder)!r} is not a folder")
            loaders.append(FileSystemLoader(folder))
        loaders.append(PackageLoader("campaign_manager.serve", "templates"))
        self.env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(["html"], default_for_string=False, default=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        name, address = parseaddr(settings.send.from_)
        self.env.globals["sender"] = name or address or "the sender"

    def render(self, name: str, **values: Any) -> str:
        return self.env.get_template(name).render(**values)


def mask_address(email: str) -> str:
    """An address as a page shows it: enough for its owner to recognise (`a***@example.com`), not a list to harvest."""
    local, _, domain = email.rpartition("@")
    if not local:
        return "***"
    return f"{local[0]}***@{domain}"
