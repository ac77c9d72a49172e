"""① Identify the client: the API-key header, or the peer IP.

X-Forwarded-For is believed only when the peer is a trusted proxy, and then
the client is the rightmost address that is not itself a trusted proxy
(everything left of it could have been written by the client). This is the
rule nginx's realip module applies with ``real_ip_recursive on``.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache, partial
from typing import Final

from gateway.config.model import ClientsConfig, IPNetwork

__all__ = ["BLOCKED", "EXEMPT", "ClientIdentifier"]

EXEMPT: Final = "exempt"
BLOCKED: Final = "blocked"

_MAX_CLIENT_ID_LENGTH = 256


class ClientIdentifier:
    """① Who the client is: the API-key header when configured and sent, else
    the address (the rightmost untrusted X-Forwarded-For hop behind a
    trusted proxy). Built per config snapshot."""

    def __init__(self, config: ClientsConfig) -> None:
        self._by_header = config.identify_by == "header"
        self._header = config.header
        self._network = lru_cache(maxsize=65536)(
            partial(_masked, config.ipv4_prefix, config.ipv6_prefix)
        )
        self._v4_whole = config.ipv4_prefix == 32
        if config.ipv4_prefix == 32 and config.ipv6_prefix == 128:
            self._network = _unmasked  # type: ignore[assignment]
        self._allow_keys = frozenset(e for e in config.allow if isinstance(e, str))
        self._deny_keys = frozenset(e for e in config.deny if isinstance(e, str))
        allow_nets = tuple(e for e in config.allow if not isinstance(e, str))
        deny_nets = tuple(e for e in config.deny if not isinstance(e, str))
        self._in_allow = lru_cache(maxsize=4096)(partial(_in_networks, allow_nets))
        self._in_deny = lru_cache(maxsize=4096)(partial(_in_networks, deny_nets))
        self._lists = bool(config.allow or config.deny)
        self._trusted: tuple[IPNetwork, ...] = config.trusted_proxies
        # Peers repeat: the same few addresses make most requests. Cached over
        # the networks, not a bound method: no reference cycle, so a replaced
        # snapshot is freed by reference counting alone (server.settle_heap
        # hides the heap from the cyclic GC).
        self._is_trusted = lru_cache(maxsize=4096)(partial(_in_networks, self._trusted))
        # Whether X-Forwarded-For can matter at all (core reads it only then).
        self.trusts_proxies = bool(self._trusted)

    def is_trusted_peer(self, peer: str) -> bool:
        return self.trusts_proxies and self._is_trusted(peer)

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

    def identify(
        self, peer: str, forwarded_for: str | None, api_key: str | None
    ) -> tuple[str, str, str | None]:
        """The client id used for buckets, overrides and /admin/clients/{id};
        the client's network (its address masked to ``ipv4_prefix`` /
        ``ipv6_prefix``); and ``EXEMPT`` or ``BLOCKED`` when ``clients.allow``
        or ``clients.deny`` names it (deny wins), else None.

        Header mode: the header's value; without the header, ``ip:<network>``
        (a distinct namespace, so nobody can send another client's IP as a key).
        """
        address = self.client_address(peer, forwarded_for)
        # An IPv4 address at /32 is its own network: no lookup.
        network = address if self._v4_whole and ":" not in address else self._network(address)
        listed = None
        if self._lists:
            listed = self._listed(address, api_key)
        if self._by_header:
            if api_key:
                return api_key[:_MAX_CLIENT_ID_LENGTH], network, listed
            return "ip:" + network, network, listed
        return network, network, listed

    def normalised_id(self, client_id: str) -> tuple[str, str]:
        """A client id as typed into /admin/clients/{id}, as requests key it:
        an address becomes its network; and that network ("" when the id is
        an API key, whose address is unknown)."""
        prefix = "ip:" if client_id.startswith("ip:") else ""
        text = client_id[len(prefix) :]
        if _valid_ip(text) is None:
            try:
                network = str(ipaddress.ip_network(text, strict=False))
            except ValueError:
                return client_id, ""
        else:
            network = self._network(text)
        if self._by_header and not prefix:
            return client_id, network  # an API key that looks like an address
        return prefix + network, network

    def _listed(self, address: str, api_key: str | None) -> str | None:
        key = "key:" + api_key if api_key else None
        if (key is not None and key in self._deny_keys) or self._in_deny(address):
            return BLOCKED
        if (key is not None and key in self._allow_keys) or self._in_allow(address):
            return EXEMPT
        return None

    @property
    def header(self) -> str | None:
        """The field read for the API key: for ``identify_by: header``, and
        for ``key:VALUE`` entries of the allow and deny lists."""
        return self._header if self._by_header or self._lists else None


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


def _unmasked(address: str) -> str:
    return address


def _masked(ipv4_prefix: int, ipv6_prefix: int, address: str) -> str:
    """The network ``address`` is one client of: the address itself at a
    full-length prefix, else ``network/prefix`` (``2001:db8:1:2::/64``)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "-": no peer address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    if prefix == ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network((ip, prefix), strict=False))
