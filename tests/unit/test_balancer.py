"""The balancer alone (gateway/balancer.py): round robin and least_conn,
passive health as nginx keeps it (max_fails within fail_timeout, then one
probing request), active probe verdicts, and every server out. A stepped
clock; no sockets."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.balancer import Balancer, ServerState
from gateway.config.model import Balance

FAIL_TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Server(ServerState):
    __slots__ = ("connections",)

    def __init__(self, name: str) -> None:
        super().__init__(f"http://{name}", f"{name}:80")
        self.connections = 0

    @property
    def active(self) -> int:
        return self.connections


def make(
    count: int = 3,
    balance: Balance = Balance.ROUND_ROBIN,
    max_fails: int = 3,
) -> tuple[Balancer[Server], list[Server], Clock, list[tuple[str, bool]]]:
    clock = Clock()
    servers = [Server(chr(ord("a") + i)) for i in range(count)]
    changes: list[tuple[str, bool]] = []
    balancer = Balancer(
        servers,
        balance,
        max_fails=max_fails,
        fail_timeout_seconds=FAIL_TIMEOUT,
        now=clock,
        on_change=lambda server, up, _why: changes.append((server.address, up)),
    )
    return balancer, servers, clock, changes


def names(chosen: list[Server]) -> str:
    return "".join(s.address[0] for s in chosen)


# -- choosing --


def test_round_robin_takes_the_servers_in_turn() -> None:
    balancer, _, _, _ = make()
    assert names([balancer.choose() for _ in range(7)]) == "abcabca"


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=50))
def test_round_robin_shares_evenly(count: int, rounds: int) -> None:
    balancer, servers, _, _ = make(count)
    chosen = Counter(balancer.choose().address for _ in range(count * rounds))
    assert all(chosen[s.address] == rounds for s in servers)


def test_least_conn_picks_the_fewest_in_use_and_the_rotation_breaks_ties() -> None:
    balancer, servers, _, _ = make(balance=Balance.LEAST_CONN)
    a, b, c = servers
    a.connections, b.connections, c.connections = 2, 1, 1
    assert balancer.choose() is b
    assert balancer.choose() is c  # the tie goes on around the rotation
    assert balancer.choose() is b
    a.connections = 0
    assert balancer.choose() is a


def test_least_conn_with_a_slow_server_sends_the_rest_elsewhere() -> None:
    balancer, servers, _, _ = make(2, Balance.LEAST_CONN)
    slow, fast = servers
    held = balancer.choose()
    assert held is slow
    slow.connections = 1  # its request is not answered yet
    quick = [balancer.choose() for _ in range(5)]
    assert quick == [fast] * 5


def test_exclude_chooses_another_server() -> None:
    balancer, servers, _, _ = make()
    for server in servers:
        assert balancer.choose(exclude=server) is not server


def test_a_lone_server_is_always_chosen() -> None:
    balancer, [only], _, _ = make(1)
    for _ in range(3):
        balancer.failed(only)
    assert only.down
    assert balancer.choose() is only
    assert balancer.choose(exclude=only) is only


# -- passive health --


def test_max_fails_within_fail_timeout_takes_a_server_out() -> None:
    balancer, servers, clock, changes = make()
    _a, b, _c = servers
    balancer.failed(b)
    clock.now += 1
    balancer.failed(b)
    assert not b.down
    balancer.failed(b)
    assert b.down
    assert changes == [("b:80", False)]
    assert not b.in_rotation(clock.now)
    assert names([balancer.choose() for _ in range(6)]) == "acacac"
    assert balancer.out_of_rotation() == [b]


def test_failures_further_apart_than_fail_timeout_do_not_add_up() -> None:
    balancer, [a, _b, _c], clock, _ = make()
    for _ in range(5):
        balancer.failed(a)
        balancer.failed(a)
        clock.now += FAIL_TIMEOUT + 1
    assert not a.down


def test_max_fails_zero_never_takes_a_server_out() -> None:
    balancer, [a, _b, _c], _, _ = make(max_fails=0)
    for _ in range(100):
        balancer.failed(a)
    assert not a.down
    assert balancer.out_of_rotation() == []


def test_after_fail_timeout_one_request_probes_and_an_answer_brings_it_back() -> None:
    balancer, servers, clock, changes = make(2)
    a, b = servers
    for _ in range(3):
        balancer.failed(a)
    assert [balancer.choose() for _ in range(3)] == [b, b, b]
    clock.now += FAIL_TIMEOUT
    assert a.in_rotation(clock.now)  # eligible again: /readyz counts it
    probe = balancer.choose()
    assert probe is a
    # Until it answers, the others keep off it.
    assert [balancer.choose() for _ in range(3)] == [b, b, b]
    balancer.answered(a)
    assert not a.down
    assert changes == [("a:80", False), ("a:80", True)]
    assert names([balancer.choose() for _ in range(4)]) in ("abab", "baba")


def test_a_failed_probe_keeps_the_server_out_for_another_fail_timeout() -> None:
    balancer, servers, clock, changes = make(2)
    a, b = servers
    for _ in range(3):
        balancer.failed(a)
    clock.now += FAIL_TIMEOUT
    assert balancer.choose() is a
    balancer.failed(a)
    assert a.down
    clock.now += FAIL_TIMEOUT - 1
    assert [balancer.choose() for _ in range(3)] == [b, b, b]
    clock.now += 1
    assert balancer.choose() is a
    assert changes == [("a:80", False)]  # never back in between


def test_a_probe_that_got_no_verdict_is_repeated_after_fail_timeout() -> None:
    """A probing request that ended without an answer or a failure (its
    client left): the server is probed again, it does not stay out for ever."""
    balancer, servers, clock, _ = make(2)
    a, b = servers
    for _ in range(3):
        balancer.failed(a)
    clock.now += FAIL_TIMEOUT
    assert balancer.choose() is a
    assert balancer.choose() is b
    clock.now += FAIL_TIMEOUT
    assert balancer.choose() is a


def test_every_server_out_still_sends_to_the_next_in_rotation() -> None:
    balancer, servers, _, _ = make()
    for server in servers:
        for _ in range(3):
            balancer.failed(server)
    assert balancer.all_out()
    assert names([balancer.choose() for _ in range(6)]) == "abcabc"
    a = servers[0]
    balancer.answered(a)
    assert not balancer.all_out()
    assert names([balancer.choose() for _ in range(3)]) == "aaa"


# -- active probes --


def test_a_failed_probe_takes_the_server_out_until_a_probe_passes() -> None:
    balancer, servers, clock, changes = make(2)
    a, b = servers
    balancer.probed(a, False, "status 503")
    assert not a.in_rotation(clock.now)
    clock.now += 10 * FAIL_TIMEOUT  # not a passive timeout: time does not help
    assert [balancer.choose() for _ in range(3)] == [b, b, b]
    balancer.answered(a)  # nor does an answer to a request sent anyway
    assert not a.in_rotation(clock.now)
    balancer.probed(a, True)
    assert a.in_rotation(clock.now)
    assert changes == [("a:80", False), ("a:80", True)]


def test_a_passing_probe_ends_a_passive_fail_timeout() -> None:
    balancer, [a, _b], clock, changes = make(2)
    for _ in range(3):
        balancer.failed(a)
    balancer.probed(a, True)
    assert a.in_rotation(clock.now)
    assert not a.down
    assert changes == [("a:80", False), ("a:80", True)]


@pytest.mark.parametrize("probe_first", [True, False])
def test_passive_and_active_marks_are_counted_once(probe_first: bool) -> None:
    balancer, [a, b], clock, changes = make(2)
    if probe_first:
        balancer.probed(a, False, "refused")
    for _ in range(3):
        balancer.failed(a)
    if not probe_first:
        balancer.probed(a, False, "refused")
    assert changes == [("a:80", False)]
    assert balancer.out_of_rotation() == [a]
    balancer.probed(a, True)
    assert balancer.out_of_rotation() == []
    assert not balancer.all_out()
    assert names([balancer.choose() for _ in range(2)]) in ("ab", "ba")
    assert b.in_rotation(clock.now)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fail", "answer", "probe_ok", "probe_fail", "tick", "choose"]),
            st.integers(min_value=0, max_value=2),
        ),
        max_size=60,
    )
)
def test_the_count_of_servers_out_matches_their_marks(
    steps: list[tuple[str, int]],
) -> None:
    """However failures, answers, probes and time interleave, the balancer's
    count of servers out (which lets the common choice skip the clock) agrees
    with the servers' own marks, and a server whose marks say out is never
    chosen while another is in rotation."""
    balancer, servers, clock, _ = make()
    for action, index in steps:
        server = servers[index]
        if action == "fail":
            balancer.failed(server)
        elif action == "answer" and server.down:
            balancer.answered(server)
        elif action == "probe_ok":
            balancer.probed(server, True)
        elif action == "probe_fail":
            balancer.probed(server, False, "x")
        elif action == "tick":
            clock.now += FAIL_TIMEOUT / 2
        else:
            in_rotation = [s for s in servers if s.in_rotation(clock.now)]
            chosen = balancer.choose()
            if in_rotation:
                assert chosen in in_rotation
        assert balancer._out == sum(s.down or s.probe_failed for s in servers)
