"""What went wrong below HTTP, in one line: a host name that does not resolve, a refused
connection, a TLS certificate that is not trusted, an endpoint that does not speak TLS.

The SDKs (botocore, azure-core) wrap the socket and ssl errors several layers deep and report
them all as "could not connect"; the user needs the cause to fix it, so the wrapped chain is
walked to find the original error."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

# OpenSSL reasons that mean the peer answered with something that is not TLS at all.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)
_MAX_DEPTH = 12


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error it wraps: chained, `inner_exception` (azure-core), `reason`
    (urllib3) and exceptions passed as arguments (requests, botocore)."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_DEPTH:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        linked = [cur.__cause__, cur.__context__]
        linked += [getattr(cur, "inner_exception", None), getattr(cur, "reason", None)]
        linked += list(cur.args)
        todo += [e for e in linked if isinstance(e, BaseException)]


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def _named(exc: BaseException, *names: str) -> BaseException | None:
    """The first wrapped error whose class has one of `names` (urllib3's, without importing)."""
    return next((e for e in _causes(exc) if type(e).__name__ in names), None)


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason ("WRONG_VERSION_NUMBER"), from the error or from its "[SSL: X]" text."""
    if exc.reason:
        return str(exc.reason)
    return str(exc).split("]")[0].lstrip("[").split(":")[-1].strip()


def host_of(url: str) -> str:
    """ "host:port" of an http(s) URL, with the scheme's default port when it has none."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_permanent(exc: BaseException) -> bool:
    """Failures no retry can cure: an untrusted certificate, a server that does not speak TLS,
    a host name the DNS says does not exist (not a DNS server that did not answer)."""
    if _first(exc, ssl.SSLCertVerificationError) or _named(exc, "CertificateError"):
        return True
    tls = _first(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLError) and _ssl_reason(tls).upper() in _NOT_TLS_REASONS:
        return True
    gai = _first(exc, socket.gaierror)
    return isinstance(gai, socket.gaierror) and gai.errno == socket.EAI_NONAME


def describe(exc: BaseException, host: str, ca_hint: str) -> str | None:
    """One line naming the cause of a failure to reach `host` ("name:port"), or None when it
    is none of the causes this knows. `ca_hint` says how to give a CA bundle."""
    cert = _first(exc, ssl.SSLCertVerificationError)
    if isinstance(cert, ssl.SSLCertVerificationError):
        detail = cert.verify_message or _ssl_reason(cert)
        return (
            f"TLS certificate of {host} not trusted: {detail} "
            f"(give its CA certificate with {ca_hint})"
        )
    name_check = _named(exc, "CertificateError")  # urllib3's own host name check
    if name_check is not None:
        return (
            f"TLS certificate of {host} not trusted: {name_check} "
            "(use the host name the certificate is for)"
        )
    tls = _first(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLError):
        reason = _ssl_reason(tls)
        if reason.upper() in _NOT_TLS_REASONS:
            return (
                f"TLS handshake with {host} failed: the server there does not speak TLS "
                "(for plain HTTP use an http:// endpoint)"
            )
        return f"TLS handshake with {host} failed: {reason or tls}"
    dns = _first(exc, socket.gaierror) or _named(exc, "NameResolutionError")
    if dns is not None:
        name = host.rsplit(":", 1)[0]
        why = dns.strerror if isinstance(dns, socket.gaierror) else "name not resolved"
        return f"host name {name} not found in DNS ({why}): check the endpoint's host name"
    if _first(exc, ConnectionRefusedError) is not None:
        return f"connection to {host} refused: nothing listens there (wrong port, or server down)"
    if _first(exc, socket.timeout) is not None or _named(
        exc, "ConnectTimeoutError", "ReadTimeoutError"
    ):
        return f"{host} did not answer in time"
    return None
