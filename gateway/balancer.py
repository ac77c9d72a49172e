"""④ Choose a server: round robin or least connections over the servers in
rotation, and the servers' health, as nginx keeps it.

No I/O: the upstream (upstream.py) reports what happened, the active probes
(health_check.py) what they found, and the clock is passed in.

    choose(exclude)        the server for a request (another than ``exclude``
                           for the one retry after a failure)
    failed(server)         a connect failure, a reset or a read timeout before
                           any response head: counts toward ``max_fails``
    answered(server)       a response head arrived (any status)
    probed(server, ok)     an active probe's verdict

**Passive health** (nginx ``max_fails``/``fail_timeout``): ``max_fails``
failures within ``fail_timeout`` of the first take a server out of the
rotation for ``fail_timeout`` (``max_fails: 0``: never). Then one request
probes it: the rotation hands it that request and keeps it out for another
``fail_timeout``, unless an answer brings it back first; a failure keeps it
out. Any answer from a server that is out brings it back. Answers with a 5xx
status are answers: the server is up, whatever it says. **Active probes** put a
server out until a probe passes; a passing probe also ends a passive
``fail_timeout``.

**Every server out**: the request is still sent, to the next server in the
rotation, rather than answered 502 without trying. This is Envoy's panic
mode (below its healthy threshold it balances over every host), not modern
nginx's "no live upstreams" 502: a backend that came back answers at once,
and its answer brings it back, where a 502 would wait out fail_timeout.

A lone server is marked the same way (for /readyz and
``gateway_upstream_server_up``), though every request still goes to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from mypy_extensions import mypyc_attr

from gateway.config.model import Balance

__all__ = ["Balancer", "ServerState"]


# Subclassed by the upstream's servers, and by tests' servers when this
# module is compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
class ServerState:
    """One server of an upstream as the balancer sees it: its health, and
    (``active``) the connections in use to it now, for least_conn."""

    __slots__ = ("address", "down", "down_until", "failures", "first_failure_at",
                 "probe_failed", "url")  # fmt: skip

    def __init__(self, url: str, address: str) -> None:
        self.url = url
        self.address = address  # host:port, as nginx's $upstream_addr
        self.down = False  # out after max_fails failures (passive health)
        self.down_until = 0.0  # ... until then; afterwards one request probes it
        self.failures = 0  # within fail_timeout of the first
        self.first_failure_at = 0.0
        self.probe_failed = False  # the last active probe failed

    @property
    def active(self) -> int:
        """Connections in use to this server now (least_conn's measure)."""
        return 0

    def in_rotation(self, now: float) -> bool:
        """Not marked down: a passive ``fail_timeout`` that is over counts as
        in rotation (the next request may go there)."""
        return not self.probe_failed and (not self.down or self.down_until <= now)


S = TypeVar("S", bound=ServerState)


class Balancer(Generic[S]):
    """The servers of one upstream and the choice among them (see the module
    docstring). ``now``: monotonic seconds; read only while a server is out.
    ``on_change(server, up, why)``: a server left or rejoined the rotation."""

    def __init__(
        self,
        servers: Sequence[S],
        balance: Balance,
        *,
        max_fails: int,
        fail_timeout_seconds: float,
        now: Callable[[], float],
        on_change: Callable[[S, bool, str], None] | None = None,
    ) -> None:
        if not servers:
            raise ValueError("an upstream needs at least one server")
        self.servers: tuple[S, ...] = tuple(servers)
        self._count = len(self.servers)
        self._least_conn = balance is Balance.LEAST_CONN
        self._max_fails = max_fails
        self._fail_timeout = fail_timeout_seconds
        self._now = now
        self._on_change = on_change
        # A lone server: every request goes to it, whatever its health.
        self._only = self.servers[0] if self._count == 1 else None
        self._next = 0  # the rotation's position
        # Servers marked down (passively or by a probe): while none is, a
        # round-robin choice reads no clock.
        self._out = 0

    def choose(self, exclude: S | None = None) -> S:
        """The server for the next request: the next in rotation (round_robin)
        or the one with the fewest connections in use, the rotation breaking
        ties (least_conn), among those in rotation; when none is, the next in
        rotation anyway. ``exclude``: a server already tried (with a single
        server, it is chosen again)."""
        only = self._only
        if only is not None:
            return only
        if not self._out and not self._least_conn and exclude is None:
            i = self._next
            self._next = i + 1 if i + 1 < self._count else 0
            return self.servers[i]
        return self._choose(exclude)

    def _choose(self, exclude: S | None) -> S:
        servers = self.servers
        count = self._count
        now = self._now() if self._out else 0.0
        start = self._next
        best: S | None = None
        best_at = start
        fallback: S | None = None
        fallback_at = start
        for k in range(count):
            at = start + k
            if at >= count:
                at -= count
            server = servers[at]
            if server is exclude:
                continue
            if fallback is None:
                fallback, fallback_at = server, at
            if server.probe_failed or (server.down and server.down_until > now):
                continue
            if not self._least_conn:
                best, best_at = server, at
                break
            if best is None or server.active < best.active:
                best, best_at = server, at
        if best is None:
            if fallback is None:  # only ``exclude`` exists
                assert exclude is not None
                return exclude
            best, best_at = fallback, fallback_at
        self._next = best_at + 1 if best_at + 1 < count else 0
        if best.down and best.down_until <= now:
            # Its fail_timeout is over: this request probes it; the others
            # keep off it for another fail_timeout, unless it answers.
            best.down_until = now + self._fail_timeout
        return best

    def failed(self, server: S) -> None:
        """A failure of the server's own before any response head."""
        if not self._max_fails:
            return
        now = self._now()
        timeout = self._fail_timeout
        if server.down:
            # A probe (or a request sent while every server was out) failed:
            # out for another fail_timeout.
            server.down_until = now + timeout
            return
        if server.failures and now - server.first_failure_at > timeout:
            server.failures = 0
        if not server.failures:
            server.first_failure_at = now
        server.failures += 1
        if server.failures >= self._max_fails:
            failures, server.failures = server.failures, 0
            server.down = True
            server.down_until = now + timeout
            self._changed(
                server,
                f"{failures} failures within {timeout:g}s (max_fails {self._max_fails}); "
                f"out for {timeout:g}s",
                was_out=server.probe_failed,
            )

    def answered(self, server: S) -> None:
        """A response head arrived from ``server``: a server out after
        failures is back (callers check ``server.down`` first: this runs
        only then)."""
        if server.down:
            server.down = False
            server.failures = 0
            self._changed(server, "answered a request", was_out=True)

    def probed(self, server: S, ok: bool, detail: str = "") -> None:
        """An active probe's verdict: a failure puts the server out until a
        probe passes; a pass brings it back (a passive fail_timeout too)."""
        was_out = server.probe_failed or server.down
        if ok:
            server.probe_failed = False
            server.down = False
            server.failures = 0
            if was_out:
                self._changed(server, "its health check passed", was_out=True)
        elif not server.probe_failed:
            server.probe_failed = True
            if not was_out:
                self._changed(server, f"its health check failed: {detail}", was_out=False)

    def _changed(self, server: S, why: str, *, was_out: bool) -> None:
        out = server.down or server.probe_failed
        if out == was_out:
            return
        self._out += 1 if out else -1
        if self._on_change is not None:
            self._on_change(server, not out, why)

    def all_out(self) -> bool:
        """No server is in rotation (``ServerState.in_rotation``)."""
        if not self._out:
            return False
        now = self._now()
        return not any(server.in_rotation(now) for server in self.servers)

    def out_of_rotation(self) -> list[S]:
        """The servers marked down now."""
        if not self._out:
            return []
        now = self._now()
        return [server for server in self.servers if not server.in_rotation(now)]
