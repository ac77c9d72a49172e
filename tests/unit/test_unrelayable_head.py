"""raw_response.unrelayable_head, the one check of an upstream's response
fields on both paths, against a plain reading of the rules it enforces."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from gateway import raw_response
from gateway.raw_response import unrelayable_head

TOKEN = set((string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~").encode())


def reference(fields: list[tuple[bytes, bytes]], max_size: int) -> str | None:
    """The rules byte by byte, in the order the function reports them."""
    # The fields as lines, "name: value" and CRLF, less the CRLF of the last
    # line and of the blank line (approximately what arrived).
    size = sum(len(n) + len(v) + 5 for n, v in fields) - (2 if fields else 0)
    if any(not name for name, _ in fields):
        return "name"
    if size > max_size:
        return "size"
    if any(b not in TOKEN for name, _ in fields for b in name):
        return "name"
    if any(not (b == 9 or 0x20 <= b != 0x7F) for _, value in fields for b in value):
        return "value"
    for name, value in fields:
        if name.lower() == b"transfer-encoding":
            for coding in value.split(b","):
                if coding.strip(b" \t").lower() != b"chunked":
                    return "coding"
    return None


def kind(message: str | None) -> str | None:
    if message is None:
        return None
    for word, name in (
        ("over", "size"), ("not a token", "name"), ("control", "value"), ("coding", "coding"),
    ):  # fmt: skip
        if word in message:
            return name
    raise AssertionError(message)


NAMES = st.sampled_from(
    [b"Content-Type", b"Transfer-Encoding", b"transfer-encoding", b"X-A", b"", b"Bad Name",
     b"X\x00", b"\xc3\xa9t\xc3\xa9", b"Date"]
) | st.binary(max_size=20)  # fmt: skip
VALUES = st.sampled_from(
    [b"chunked", b"gzip, chunked", b" Chunked ", b"text/html", b"a\tb", b"\x7f", b"\xff",
     b"x\ry", b""]
) | st.binary(max_size=20)  # fmt: skip


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8), st.integers(0, 200))
def test_reports_as_the_rules_say(fields: list[tuple[bytes, bytes]], max_size: int) -> None:
    assert kind(unrelayable_head(fields, max_size)) == reference(fields, max_size)


def test_a_usual_head_passes() -> None:
    fields = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked")]
    assert unrelayable_head(fields, 1000) is None


def test_the_lower_case_name_cache_stays_bounded() -> None:
    """response_head remembers field names lower-cased, up to a bound: a
    hostile upstream sending a new name every time does not grow it."""
    for i in range(raw_response._LOWER_MAX + 500):
        head = raw_response.response_head(
            200, b"OK", [(b"X-Name-%d" % i, b"v")], b"",
            replaced=frozenset(), content_length=0, chunked=False, keep_alive=True,
            http10=False,
        )  # fmt: skip
        assert b"\r\nX-Name-%d: v\r\n" % i in head
    assert len(raw_response._LOWER) <= raw_response._LOWER_MAX
