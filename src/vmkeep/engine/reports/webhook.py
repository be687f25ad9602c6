"""Report by webhook: POST the run document as JSON, signed so the receiver can check it came
from this vmkeep and is not a replay. Signed material: `<timestamp>.` + the exact body bytes;
HMAC-SHA256 under the shared secret (docs/REPORTS.md has the verification recipe)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import ssl
from urllib.parse import urlsplit

from vmkeep import __version__
from vmkeep.engine.reports.model import Run
from vmkeep.engine.reports.summary import redacted_run
from vmkeep.engine.reports.targets import WebhookTarget
from vmkeep.errors import DeliveryError

SIGNATURE_HEADER = "X-Vmkeep-Signature"
TIMESTAMP_HEADER = "X-Vmkeep-Timestamp"
DELIVERY_HEADER = "X-Vmkeep-Delivery"
TOLERANCE_SECONDS = 300


def webhook_body(run: Run) -> bytes:
    """The exact bytes POSTed: the redacted run document, UTF-8 JSON."""
    doc = redacted_run(run).to_json()
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header value: `sha256=<hex HMAC-SHA256 of b"<timestamp>." + body>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str | bytes,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does: the timestamp is recent and the signature matches (constant time)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def post_webhook(run: Run, target: WebhookTarget, *, now: float, delivery_id: str) -> int:
    """POST the signed run; returns the HTTP status (2xx), DeliveryError otherwise.
    Redirects are not followed: a 3xx is a failure (the body would not be re-sent)."""
    body = webhook_body(run)
    ts = int(now)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"vmkeep/{__version__}",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(target.secret.get_secret_value(), ts, body),
        DELIVERY_HEADER: delivery_id,
    }
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=target.ca_file)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=target.timeout, context=ctx
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=target.timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(65536)
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(
            f"webhook {target.name}: {parts.hostname}: {exc or type(exc).__name__}"
        ) from None
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook {target.name}: HTTP {status} {resp.reason}".strip())
    return status
