"""The proxy listener's TLS context, made from the PEM files ``tls:`` names.

One function makes it for ``gateway check`` (every problem of the pair,
each at its key), for the start and for each SIGHUP, so what ``check``
accepts is what serves. OpenSSL says little when a pair fails to load
(``[SSL] PEM lib``), so the files are looked at first: unreadable, no PEM
block, a block that is not base64 or not X.509, an encrypted key. Then
``load_cert_chain`` loads the chain as given and checks that the key is the
certificate's.

The context: TLS 1.2 at least (as Mozilla's "intermediate" profile and
nginx's default since 1.23.4), ALPN ``http/1.1`` (HTTP/2 is not served),
Python's default server ciphers, no client-initiated renegotiation (a CPU
cost a client could impose at will; nginx refuses it too).
"""

from __future__ import annotations

import binascii
import re
import ssl
from typing import Final

from gateway.config.model import TlsConfig

__all__ = ["ALPN_PROTOCOLS", "TlsPairError", "pair_problems", "server_context"]

ALPN_PROTOCOLS: Final = ("http/1.1",)
_BEGIN_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
_END_CERTIFICATE: Final = b"-----END CERTIFICATE-----"
_PRIVATE_KEY: Final = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")
# load_cert_chain's reasons for a key that is not the certificate's: the same
# type (values differ), or another type (no certificate for the key's slot).
_NOT_ITS_KEY: Final = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})
# Reasons OpenSSL refuses a certificate at its security level.
_WEAK_CERTIFICATE: Final = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})

Problem = tuple[str, str]  # (key path, message), as gateway.config.validate's


class TlsPairError(ValueError):
    """The pair cannot serve; ``problems`` says why, by key (``tls.cert``,
    ``tls.key``)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


class _EncryptedKeyError(Exception):
    """The key asked for a passphrase (never prompted for on a terminal)."""


def _no_passphrase() -> str:
    raise _EncryptedKeyError


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context holding ``tls``'s chain and key; TlsPairError
    naming every problem found."""
    problems = _file_problems(tls)
    if problems:
        raise TlsPairError(problems)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    except _EncryptedKeyError:
        raise TlsPairError([("tls.key", _encrypted(tls.key))]) from None
    except ssl.SSLError as exc:
        reason = str(exc.reason)
        if reason in _NOT_ITS_KEY:
            message = f"{tls.key} is not the private key of the certificate in {tls.cert}"
            raise TlsPairError([("tls.key", message)]) from None
        if reason in _WEAK_CERTIFICATE:
            message = f"{tls.cert}: OpenSSL refuses it: {_said(reason)}"
            raise TlsPairError([("tls.cert", message)]) from None
        message = f"{tls.key}: the private key does not load: {_said(reason)}"
        raise TlsPairError([("tls.key", message)]) from None
    except OSError as exc:  # a file replaced between the reads
        raise TlsPairError([("tls.cert", f"cannot load the pair: {exc.strerror}")]) from None
    return context


def pair_problems(tls: TlsConfig) -> list[Problem]:
    """What ``server_context`` would refuse in ``tls``; empty when it serves.
    An empty name (a key the file lacks or got wrong, its problem already
    reported) is skipped, and the other file still looked at."""
    if not tls.cert or not tls.key:
        return _file_problems(tls)
    try:
        server_context(tls)
    except TlsPairError as exc:
        return exc.problems
    return []


def _file_problems(tls: TlsConfig) -> list[Problem]:
    problems: list[Problem] = []
    if tls.cert:
        cert = _read(tls.cert, "tls.cert", problems)
        if cert is not None:
            problems += _certificate_problems(tls.cert, cert)
    if tls.key:
        key = _read(tls.key, "tls.key", problems)
        if key is not None:
            problems += _key_problems(tls.key, key)
    return problems


def _read(path: str, key: str, problems: list[Problem]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        problems.append((key, f"cannot read {path}: {exc.strerror or exc}"))
        return None


def _certificate_problems(path: str, pem: bytes) -> list[Problem]:
    starts = [m.end() for m in re.finditer(re.escape(_BEGIN_CERTIFICATE), pem)]
    if not starts:
        what = "a private key, not a" if _PRIVATE_KEY.search(pem) else "no"
        return [("tls.cert", f"{path} holds {what} PEM certificate "
                 "(-----BEGIN CERTIFICATE-----)")]  # fmt: skip
    for n, start in enumerate(starts, 1):
        place = f"certificate {n} of {len(starts)} in {path}"
        end = pem.find(_END_CERTIFICATE, start)
        if end < 0:
            return [("tls.cert", f"{place} is cut short (no -----END CERTIFICATE----- line)")]
        try:
            der = binascii.a2b_base64(b"".join(pem[start:end].split()), strict_mode=True)
        except binascii.Error:
            return [("tls.cert", f"{place} is not valid base64")]
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        except ssl.SSLError:
            return [("tls.cert", f"{place} is not an X.509 certificate")]
    return []


def _key_problems(path: str, pem: bytes) -> list[Problem]:
    found = _PRIVATE_KEY.search(pem)
    if found is None:
        what = "a certificate, not a" if _BEGIN_CERTIFICATE in pem else "no"
        return [("tls.key", f"{path} holds {what} PEM private key "
                 "(-----BEGIN PRIVATE KEY-----)")]  # fmt: skip
    if found.group(1).startswith(b"ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in pem:
        return [("tls.key", _encrypted(path))]
    return []


def _encrypted(path: str) -> str:
    return (
        f"{path} is encrypted; the gateway reads unencrypted keys only "
        f"(openssl pkey -in {path} -out plain.key, then restrict who reads it)"
    )


def _said(reason: str) -> str:
    """OpenSSL's reason code as words: ``EE_KEY_TOO_SMALL`` -> ``ee key too small``."""
    return reason.replace("_", " ").lower() if reason != "None" else "not valid PEM"
