"""① Identify the client: the API-key header, or the peer IP.

X-Forwarded-For is believed only when the peer is a trusted proxy, and then
the client is the rightmost address that is not itself a trusted proxy
(everything left of it could have been written by the client). This is the
rule nginx's realip module applies with ``real_ip_recursive on``.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache, partial

from gateway.config.model import ClientsConfig, IPNetwork

__all__ = ["ClientIdentifier"]

_MAX_CLIENT_ID_LENGTH = 256


class ClientIdentifier:
    """① Who the client is: the API-key header when configured and sent, else
    the address (the rightmost untrusted X-Forwarded-For hop behind a
    trusted proxy). Built per config snapshot."""

    def __init__(self, config: ClientsConfig) -> None:
        self._by_header = config.identify_by == "header"
        self._header = config.header
        self._trusted: tuple[IPNetwork, ...] = config.trusted_proxies
        # Peers repeat: the same few addresses make most requests. Cached over
        # the networks, not a bound method: no reference cycle, so a replaced
        # snapshot is freed by reference counting alone (server.settle_heap
        # hides the heap from the cyclic GC).
        self._is_trusted = lru_cache(maxsize=4096)(partial(_in_networks, self._trusted))

    def is_trusted_peer(self, peer: str) -> bool:
        return bool(self._trusted) and self._is_trusted(peer)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The client's IP: the peer, or from X-Forwarded-For via trusted hops."""
        if not self._trusted or forwarded_for is None or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if not self._is_trusted(hop):
                return _valid_ip(hop) or peer
        # Every hop is a trusted proxy: the leftmost is as close as we get.
        first = next((h for h in hops if h), None)
        return (_valid_ip(first) if first else None) or peer

    def identify(self, peer: str, forwarded_for: str | None, api_key: str | None) -> str:
        """The client id used for buckets, overrides and /admin/clients/{id}.

        Header mode: the header's value; without the header, ``ip:<address>``
        (a distinct namespace, so nobody can send another client's IP as a key).
        """
        if self._by_header:
            if api_key:
                return api_key[:_MAX_CLIENT_ID_LENGTH]
            return "ip:" + self.client_address(peer, forwarded_for)
        return self.client_address(peer, forwarded_for)

    @property
    def header(self) -> str | None:
        return self._header if self._by_header else None


def _in_networks(networks: tuple[IPNetwork, ...], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _valid_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None
