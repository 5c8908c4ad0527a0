"""Where a webhook may go.

At registration: an absolute `https` URL with a host, no user name or password in it (a secret
in a URL ends up in logs and in the delivery log; the signature is the credential), no
fragment. Plain `http` only to a loopback address, and only outside production (a receiver on
the developer's own machine).

At each attempt, the host's addresses are resolved and checked again: only public addresses
(and loopback where registration allows it), unless `STEAD_WEBHOOK_PRIVATE_NETWORKS` is set,
so no tenant can make Stead's workers post into the network they run in (a metadata service,
a database's HTTP port). The connection goes to the address checked, not to a second
resolution (`pinned`), so a host that changes its answer between the check and the connection
(DNS rebinding) cannot reach a private address: the receiver still sees its own name in
`Host` and, over TLS, in SNI, and its certificate is verified against that name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from stead.config import Settings

MAX_URL_LENGTH = 2000
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class UnsafeUrl(ValueError):
    """The URL, or what its host resolves to, is not a place webhooks may go. One line."""


@dataclass(frozen=True)
class Reach:
    """Which addresses deliveries may reach: loopback (dev and test only), private networks."""

    loopback: bool = False
    private: bool = False

    @staticmethod
    def of(settings: Settings) -> Reach:
        return Reach(
            loopback=settings.env != "production", private=settings.webhook_private_networks
        )


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    address = _address(host)
    return address.is_loopback if address is not None else host.lower() in _LOOPBACK_NAMES


def check_url(url: str, reach: Reach) -> str:
    """The URL if webhooks may be registered for it; UnsafeUrl saying why not."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise UnsafeUrl("the URL must be absolute, https://host/path")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl(
            "the URL must not carry a user name or password: the signature is the credential"
        )
    if parts.fragment:
        raise UnsafeUrl("the URL must not have a #fragment")
    if parts.scheme == "http" and not (reach.loopback and _is_loopback(host)):
        raise UnsafeUrl(
            "the URL must use https (plain http only to a loopback address, outside production)"
        )
    if port == 0:
        raise UnsafeUrl("port 0 is not a destination")
    address = _address(host)
    if address is not None:
        _check_address(address, reach)
    elif _is_loopback(host) and not reach.loopback:
        raise UnsafeUrl(f"{host} is a loopback address, refused in production")
    return url


def _check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, reach: Reach) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified:
        raise UnsafeUrl(f"{address} is not a destination")
    if address.is_loopback:
        if not reach.loopback:
            raise UnsafeUrl(f"{address} is a loopback address, refused in production")
        return
    if not address.is_global and not reach.private:
        raise UnsafeUrl(
            f"{address} is not a public address (set STEAD_WEBHOOK_PRIVATE_NETWORKS to allow it)"
        )


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, as the system resolver answers."""
    found = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(sockaddr[0]) for *_, sockaddr in found]


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def check_destination(url: str, reach: Reach, resolver: Resolver = resolve) -> str:
    """Resolve the URL's host and check every address it has; the address to connect to.
    UnsafeUrl if one is refused, OSError if it does not resolve."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    checked: list[str] = []
    for answer in await resolver(host, port):
        # An IPv6 link-local answer carries its zone (`fe80::1%eth0`).
        address = _address(answer.split("%", 1)[0])
        if address is None:
            raise UnsafeUrl(f"{host} resolved to something that is not an address")
        _check_address(address, reach)
        checked.append(str(address))
    if not checked:
        raise UnsafeUrl(f"{host} has no address")
    return checked[0]


@dataclass(frozen=True)
class Pinned:
    """A request to the checked address that still names the receiver's host."""

    url: str
    host: str  # the Host header
    sni: str  # the TLS server name, checked against the certificate


def pinned(url: str, address: str) -> Pinned:
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port is not None else literal
    # Registration refuses a user name or password, so the netloc is host[:port].
    return Pinned(urlunsplit(parts._replace(netloc=netloc)), parts.netloc, parts.hostname or "")
