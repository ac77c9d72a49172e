"""The Host validator (gateway/headers.py ``valid_host``, RFC 9112 section 3.2)
and ``upstream_request_headers``'s dropping of header names with ``_``, and
the ``server.underscores_in_headers`` setting."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import parse_config
from gateway.config.model import Underscores
from gateway.headers import upstream_request_headers, valid_host

VALID = [
    "example.com", "example.com:8080", "EXAMPLE.com", "127.0.0.1", "127.0.0.1:80",
    "localhost", "a_b-c~d.example", "xn--bcher-kva.example", "%41.example",
    "[::1]", "[::1]:8080", "[2001:db8::1]:443", "[::ffff:192.0.2.1]", "[v1.fe80::a+en1]",
    "host:", "sub!$&'()*+,;=.example",
]  # fmt: skip
INVALID = [
    "", ":80", "a b", " example.com", "example.com ", "evil.example/x", "evil.example\\x",
    "user@evil.example", "evil.example:80/x", "evil.example:8o", "evil.example:80:81",
    "[::1", "::1", "[::1]x", "[zz::1]", "%4", "%zz.example", "é.example", "a\tb",
    "evil.example?x", "evil.example#x", "a\x00b", "[]",
]  # fmt: skip


@pytest.mark.parametrize("host", VALID)
def test_valid_hosts(host: str) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", INVALID)
def test_invalid_hosts(host: str) -> None:
    assert not valid_host(host)


def _upstream(incoming: list[tuple[str, str]], *, drop: bool) -> CIMultiDict[str]:
    return upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(incoming)),
        peer="192.0.2.1",
        scheme="http",
        request_id="rid",
        peer_is_trusted=False,
        preserve_host=False,
        drop_underscores=drop,
    )


def test_underscore_names_dropped_only_when_asked() -> None:
    incoming = [("X_API_Key", "victim"), ("Transfer_Encoding", "chunked"), ("X-Kept", "1")]
    dropped = _upstream(incoming, drop=True)
    assert [name for name in dropped if "_" in name] == []
    assert dropped["X-Kept"] == "1"
    kept = _upstream(incoming, drop=False)
    assert kept["X_API_Key"] == "victim"
    assert kept["Transfer_Encoding"] == "chunked"


def test_underscore_name_is_not_its_dashed_name() -> None:
    """multidict folds case, never ``_`` into ``-``: the limiter's header
    lookup cannot find an X_API_Key field as X-API-Key."""
    headers = CIMultiDict([("X_API_Key", "victim")])
    assert headers.get("X-API-Key") is None


UPSTREAM = 'upstream: {url: "http://127.0.0.1:8000"}\n'


def test_underscores_setting_defaults_to_drop() -> None:
    assert parse_config(UPSTREAM).server.underscores_in_headers is Underscores.DROP


@pytest.mark.parametrize("mode", ["drop", "reject", "allow"])
def test_underscores_setting_read(mode: str) -> None:
    config = parse_config(UPSTREAM + f"server: {{underscores_in_headers: {mode}}}\n")
    assert config.server.underscores_in_headers is Underscores(mode)


def test_underscores_setting_refuses_other_values() -> None:
    with pytest.raises(Exception, match="drop, reject, allow"):
        parse_config(UPSTREAM + "server: {underscores_in_headers: on}\n")
