"""Client identification: peer IP, API-key header, X-Forwarded-For via trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.clients import ClientIdentifier
from gateway.config.model import ClientsConfig

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def _ident(identify_by: str = "ip", trusted: tuple[str, ...] | None = None) -> ClientIdentifier:
    """Whole addresses as ids (prefixes 32 and 128): these tests are about
    which address is the client's; grouping by prefix is tested below."""
    networks = TRUSTED if trusted is None else tuple(ipaddress.ip_network(n) for n in trusted)
    return ClientIdentifier(
        ClientsConfig(
            identify_by=identify_by, header="X-API-Key", trusted_proxies=networks,
            ipv6_prefix=128,
        )
    )  # fmt: skip


# -- ip mode --


def test_ip_mode_is_the_peer_address() -> None:
    ident = _ident(trusted=())
    assert ident.identify("203.0.113.7", None, None)[0] == "203.0.113.7"
    assert ident.header is None


def test_ip_mode_ignores_the_api_key() -> None:
    assert _ident(trusted=()).identify("203.0.113.7", None, "key-1")[0] == "203.0.113.7"


def test_forwarded_for_is_ignored_without_trusted_proxies() -> None:
    ident = _ident(trusted=())
    assert ident.identify("10.0.0.1", "198.51.100.1", None)[0] == "10.0.0.1"
    assert not ident.is_trusted_peer("10.0.0.1")


# -- header mode --


def test_header_mode_uses_the_key() -> None:
    ident = _ident("header", trusted=())
    assert ident.header == "X-API-Key"
    assert ident.identify("203.0.113.7", None, "key-premium-1")[0] == "key-premium-1"


@pytest.mark.parametrize("api_key", [None, ""])
def test_header_mode_without_the_header_falls_back_to_ip(api_key: str | None) -> None:
    ident = _ident("header", trusted=())
    assert ident.identify("203.0.113.7", None, api_key)[0] == "ip:203.0.113.7"


def test_header_mode_fallback_uses_the_forwarded_client() -> None:
    ident = _ident("header")
    assert ident.identify("10.0.0.1", "198.51.100.1", None)[0] == "ip:198.51.100.1"


def test_an_ip_sent_as_a_key_cannot_collide_with_the_ip_fallback() -> None:
    ident = _ident("header", trusted=())
    as_key = ident.identify("192.0.2.1", None, "203.0.113.7")[0]
    as_ip = ident.identify("203.0.113.7", None, None)[0]
    assert as_key != as_ip


def test_overlong_key_is_truncated() -> None:
    ident = _ident("header", trusted=())
    assert ident.identify("203.0.113.7", None, "k" * 1000)[0] == "k" * 256


# -- trusted proxies and X-Forwarded-For --


def test_trusted_peer_rightmost_untrusted_hop_is_the_client() -> None:
    ident = _ident()
    xff = "192.0.2.66, 198.51.100.1, 10.1.2.3"
    # 192.0.2.66 could have been written by the client itself: not believed.
    assert ident.identify("10.0.0.1", xff, None)[0] == "198.51.100.1"


def test_untrusted_peer_forwarded_for_is_ignored() -> None:
    ident = _ident()
    assert ident.identify("203.0.113.7", "198.51.100.1", None)[0] == "203.0.113.7"
    assert ident.identify("203.0.113.7", "10.0.0.5", None)[0] == "203.0.113.7"
    assert not ident.is_trusted_peer("203.0.113.7")
    assert ident.is_trusted_peer("10.0.0.1")


def test_trusted_peer_without_forwarded_for_is_the_client() -> None:
    assert _ident().identify("10.0.0.1", None, None)[0] == "10.0.0.1"


def test_all_trusted_chain_gives_the_leftmost_hop() -> None:
    ident = _ident()
    assert ident.identify("10.0.0.1", "10.9.9.9, 10.0.0.2", None)[0] == "10.9.9.9"


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        # The rightmost untrusted hop is garbage: never use it as an id, keep the peer.
        ("198.51.100.1, not-an-ip", "10.0.0.1"),
        ("198.51.100.1, unknown", "10.0.0.1"),
        # Garbage left of the client is never looked at.
        ("garbage, 198.51.100.1", "198.51.100.1"),
        # Empty hops and stray whitespace are skipped.
        (" , 198.51.100.1 ,, 10.0.0.2 , ", "198.51.100.1"),
        ("", "10.0.0.1"),
        (",,,", "10.0.0.1"),
    ],
)
def test_garbage_hops(xff: str, client: str) -> None:
    assert _ident().identify("10.0.0.1", xff, None)[0] == client


def test_forwarded_hop_is_canonicalised() -> None:
    ident = _ident()
    assert ident.identify("10.0.0.1", "2001:DB8:0:0::1", None)[0] == "2001:db8::1"
    assert ident.identify("10.0.0.1", "[2001:db8::1]", None)[0] == "2001:db8::1"


# -- IPv6 --


def test_ipv6_peer_in_ip_mode() -> None:
    assert _ident().identify("2001:db8::5", None, None)[0] == "2001:db8::5"


def test_trusted_ipv6_proxy() -> None:
    ident = _ident()
    assert ident.is_trusted_peer("fd00::1")
    assert ident.identify("fd00::1", "2001:db8::7, fd00::2", None)[0] == "2001:db8::7"


def test_untrusted_ipv6_peer_forwarded_for_is_ignored() -> None:
    assert _ident().identify("2001:db8::5", "198.51.100.1", None)[0] == "2001:db8::5"


def test_ipv4_mapped_peer_matches_an_ipv4_trusted_network() -> None:
    ident = _ident()
    assert ident.is_trusted_peer("::ffff:10.0.0.1")
    assert ident.identify("::ffff:10.0.0.1", "198.51.100.1", None)[0] == "198.51.100.1"


def test_ipv4_mapped_hop_of_a_trusted_proxy_is_skipped() -> None:
    ident = _ident()
    xff = "198.51.100.1, ::ffff:10.0.0.9"
    assert ident.identify("10.0.0.1", xff, None)[0] == "198.51.100.1"


def test_ipv4_mapped_untrusted_peer_is_not_trusted() -> None:
    ident = _ident()
    assert not ident.is_trusted_peer("::ffff:203.0.113.7")
    assert ident.identify("::ffff:203.0.113.7", "198.51.100.1", None)[0] == "::ffff:203.0.113.7"


def test_unparseable_peer_is_not_trusted() -> None:
    ident = _ident()
    assert not ident.is_trusted_peer("not-an-ip")
    assert ident.identify("not-an-ip", "198.51.100.1", None)[0] == "not-an-ip"


# -- prefixes, allow and deny lists --


def _grouping(**fields: object) -> ClientIdentifier:
    return ClientIdentifier(ClientsConfig(**fields))  # type: ignore[arg-type]


def test_ipv6_addresses_of_one_64_are_one_client() -> None:
    ident = _grouping()  # the defaults: ipv4 /32, ipv6 /64
    peers = ("2001:db8:1:2::1", "2001:db8:1:2:aaaa::9", "2001:db8:1:2:ffff:ffff:ffff:ffff")
    ids = {ident.identify(peer, None, None)[0] for peer in peers}
    assert ids == {"2001:db8:1:2::/64"}
    assert ident.identify("2001:db8:1:3::1", None, None)[0] == "2001:db8:1:3::/64"
    assert ident.identify("203.0.113.7", None, None)[0] == "203.0.113.7"


def test_ipv4_prefix_groups_addresses_and_the_network_is_the_ip_part() -> None:
    ident = _grouping(ipv4_prefix=24, identify_by="header")
    assert ident.identify("203.0.113.7", None, None)[:2] == (
        "ip:203.0.113.0/24", "203.0.113.0/24",
    )  # fmt: skip
    assert ident.identify("203.0.113.200", None, "key-1")[:2] == ("key-1", "203.0.113.0/24")


def test_deny_wins_over_allow_and_keys_are_matched_on_the_api_key() -> None:
    ident = _grouping(
        allow=(ipaddress.ip_network("10.0.0.0/8"), "key:partner"),
        deny=(ipaddress.ip_network("10.9.0.0/16"), "key:leaked"),
    )
    assert ident.header == "X-API-Key"  # read for key: entries even in ip mode
    assert ident.identify("10.1.2.3", None, None)[2] == "exempt"
    assert ident.identify("10.9.2.3", None, None)[2] == "blocked"
    assert ident.identify("203.0.113.7", None, "partner")[2] == "exempt"
    assert ident.identify("10.1.2.3", None, "leaked")[2] == "blocked"
    assert ident.identify("203.0.113.7", None, "someone")[2] is None


def test_admin_ids_are_normalised_as_requests_key_them() -> None:
    ident = _grouping()
    assert ident.normalised_id("2001:db8:1:2::5") == ("2001:db8:1:2::/64", "2001:db8:1:2::/64")
    assert ident.normalised_id("2001:db8:1:2::/64")[0] == "2001:db8:1:2::/64"
    assert ident.normalised_id("203.0.113.7") == ("203.0.113.7", "203.0.113.7")
    assert ident.normalised_id("key-premium-1") == ("key-premium-1", "")
