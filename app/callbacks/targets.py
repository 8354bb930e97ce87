"""Which callback URLs may be called: allowlisted hosts that resolve only to addresses we are willing to reach.

Checked when a request is submitted and again before every delivery, since DNS answers can change in between;
the delivery then connects to the address that was checked (see delivery.py), so a rebinding DNS server cannot
slip a private address in after the check.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.core.config import Settings
from app.core.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes whose last 32 bits are an IPv4 address that traffic finally reaches: NAT64 (RFC 6052, RFC 8215) and
# the deprecated IPv4-compatible form (RFC 4291); 6to4 (RFC 3056) and IPv4-mapped have properties of their own.
_EMBEDDING_IPV4 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))
# IETF protocol assignments (RFC 6890), e.g. 192.0.0.8, which Python's is_global counts as public.
_NOT_PUBLIC = (ipaddress.ip_network("192.0.0.0/24"),)


@dataclass(frozen=True)
class CallbackTarget:
    host: str
    address: IPAddress  # the checked address the delivery connects to


def host_allowed(host: str, patterns: list[str]) -> bool:
    """Exact host names (or IP literals), `*.example.com` for any subdomain, `*` for any host."""
    for pattern in (p.lower().rstrip(".") for p in patterns):
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def reached_address(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries and traffic to it ends at (mapped, 6to4, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv6Address) and not (address.is_loopback or address.is_unspecified):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if any(address in network for network in _EMBEDDING_IPV4):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_allowed(address: IPAddress, settings: Settings) -> bool:
    """Public unicast addresses; private, loopback, link-local, multicast or reserved ones only when allowed."""
    address = reached_address(address)
    if settings.callback_allow_private:
        return True
    if any(address in ipaddress.ip_network(n, strict=False) for n in settings.callback_allowed_networks):
        return True
    public = address.is_global and not any(address in network for network in _NOT_PUBLIC)
    return public and not address.is_multicast and not address.is_reserved


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # The scope id of a link-local IPv6 answer ("fe80::1%eth0") is not part of the address.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def check_callback_url(url: str, settings: Settings, field: str = "status_callback_urls") -> CallbackTarget:
    """The target `url` may be called at, or InvalidInput (422) saying why not."""

    def refuse(message: str, reason: str, **details: object) -> InvalidInput:
        return InvalidInput(message, {"field": field, "reason": reason, **details})

    if not settings.callback_secret:
        raise refuse("status callbacks are disabled on this service (no callback secret is set)", "disabled")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse("a callback URL must be http(s)://host/...", "scheme")
    if parts.username is not None or parts.password is not None:
        raise refuse("a callback URL must not carry credentials", "credentials")
    host = parts.hostname.rstrip(".")
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise refuse("a callback URL has an invalid port", "port") from exc
    if port == 0:
        raise refuse("a callback URL has an invalid port", "port")
    if not host_allowed(host, settings.callback_allowed_hosts):
        raise refuse(f"callback host '{host}' is not on the allowlist", "host_not_allowed", host=host)
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise refuse(f"callback host '{host}' does not resolve", "unresolvable", host=host) from exc
    refused = [str(a) for a in addresses if not address_allowed(a, settings)]
    if refused or not addresses:
        message = f"callback host '{host}' resolves to an address that is not public"
        raise refuse(message, "address_not_allowed", host=host, addresses=refused)
    return CallbackTarget(host, addresses[0])


def check_callback_urls(urls: list[str], settings: Settings) -> None:
    for index, url in enumerate(urls):
        check_callback_url(url, settings, f"status_callback_urls[{index}]")
