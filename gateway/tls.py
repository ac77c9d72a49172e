"""⓪ TLS on the proxy listener: its context, a new certificate on SIGHUP,
failed handshakes counted.

The listener keeps the context it was started with (asyncio and uvloop take
it once, at ``create_server``). A reload makes a whole new context from the
files (gateway.config.tls) and only then points new handshakes at it: the
listener context's SNI callback, which OpenSSL calls on every ClientHello
(with or without a server name), moves the connection to the current
context before the certificate is chosen. A pair that fails to load leaves
nothing half-changed, and a connection already open keeps the certificate it
was made with.

A handshake that fails is no request and has no peer to answer: asyncio
and uvloop close such a connection quietly (an ``ssl.SSLError`` is an
``OSError``, logged only in the loop's debug mode). The listener context's
SSL objects report the failure here, so it is counted
(``gateway_rejected_requests_total``: ``plain_http`` for an HTTP request
sent to the TLS port, ``tls_handshake`` otherwise) and logged at debug level.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from gateway.config.model import TlsConfig
from gateway.config.tls import server_context

__all__ = ["TlsListener"]

log = logging.getLogger("gateway.connection")

# OpenSSL's reasons for a plain-text request where a ClientHello belongs.
_PLAIN_HTTP_REASONS = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST"})


class TlsListener:
    """The proxy listener's TLS: ``context`` is what the listener serves
    with; ``reload`` gives new connections a new certificate."""

    def __init__(self, tls: TlsConfig, on_failed: Callable[[str], None]) -> None:
        """Raises gateway.config.tls.TlsPairError when the pair cannot serve."""
        self.context = server_context(tls)
        self._current = self.context
        self.context.sni_callback = self._choose_context
        self.context.sslobject_class = _watched(on_failed)

    def reload(self, tls: TlsConfig) -> None:
        """New connections get ``tls``'s pair, read now; open ones keep
        theirs. Raises TlsPairError (nothing changed) when it cannot serve."""
        self._current = server_context(tls)

    def _choose_context(
        self, ssl_object: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self._current
        if current is not context:
            ssl_object.context = current


def _watched(on_failed: Callable[[str], None]) -> type[ssl.SSLObject]:
    """The listener's SSL object class: a failed handshake is reported to
    ``on_failed`` with its reason."""

    class WatchedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # more bytes to come: not a failure
            except ssl.SSLError as exc:
                reason = str(exc.reason)
                plain = reason in _PLAIN_HTTP_REASONS
                on_failed("plain_http" if plain else "tls_handshake")
                log.debug(
                    "TLS handshake failed: %s%s",
                    reason, " (plain HTTP sent to the TLS port)" if plain else "",
                )  # fmt: skip
                raise

    return WatchedSSLObject
