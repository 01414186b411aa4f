"""The client's IP address: the peer's, or, when the peer is one of `serve.trusted_proxies`, the nearest address in
X-Forwarded-For that is not itself a trusted proxy (the header's left end is whatever the client wrote)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from campaign_manager.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`serve.trusted_proxies` as networks; a bad entry is a ConfigError (exit 7) when `cm serve` starts."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"serve.trusted_proxies: {entry!r} is not an IP address or network") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address: Any, networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


def client_ip(peer: str | None, forwarded_for: str | None, networks: tuple[Network, ...]) -> str | None:
    """The client's address as text (None when unknown)."""
    address = _address(peer) if peer else None
    if not _trusted(address, networks) or not forwarded_for:
        return str(address) if address is not None else None
    for hop in reversed(forwarded_for.split(",")):
        found = _address(hop)
        if found is None:
            break  # a malformed hop: trust nothing further left
        address = found
        if not _trusted(found, networks):
            break
    return str(address)
