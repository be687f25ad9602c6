"""Reports against real parts: an aiosmtpd server on loopback (plain, STARTTLS, implicit TLS,
AUTH LOGIN/PLAIN), an http.server listener that checks the HMAC, an outbox on disk that a
later retry empties once the SMTP server is up."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import http.client
import http.server
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmkeep.engine.reports import (
    ReportWhen,
    RetryPolicy,
    deliver,
    load_targets,
    parse_run,
    report_run,
    retry_outbox,
    should_report,
    summary_html,
    summary_text,
    verify_signature,
    webhook_body,
)
from vmkeep.engine.reports.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER
from vmkeep.errors import ReportError

UTC = dt.UTC
FINISHED = dt.datetime(2026, 12, 6, 2, 30, tzinfo=UTC)
MIB = 1 << 20
LEAKY = "s3://AKIAEXAMPLE:hunter2-secret@s3.example.net/bucket"
SMTP_PASSWORD = "smtp-pa55word"
# Tests that pair AUTH with a plain (or, for aiosmtpd, invisible implicit-TLS) session on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
WEBHOOK_SECRET = "webhook-shared-secret-0123456789"


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def a_run(state: str = "partial") -> dict[str, Any]:
    start = FINISHED - dt.timedelta(minutes=62)
    target = {
        "kind": "target",
        "label": "remote-a",
        "vm": "web01",
        "target": "remote-a",
        "state": "success",
        "started": iso(start),
        "finished": iso(start + dt.timedelta(minutes=3)),
        "stats": {
            "bytes_read": 100 * MIB,
            "bytes_written": 40 * MIB,
            "bytes_new": 10 * MIB,
            "seconds": 180.0,
            "dedup_ratio": 2.5,
            "compression_ratio": 1.6,
        },
        "warnings": ["fell back to full read: checkpoint missing"],
    }
    vms = [
        {"kind": "vm", "label": "web01", "vm": "web01", "state": "success", "children": [target]},
        {
            "kind": "vm",
            "label": "db01",
            "vm": "db01",
            "state": "failed",
            "stats": {"bytes_read": 5 * MIB, "bytes_written": 0},
            "error": f"cannot reach {LEAKY}: timed out",
        },
        {"kind": "vm", "label": "mail01", "vm": "mail01", "state": "skipped"},
    ]
    return {
        "id": "run-42",
        "job": "nightly",
        "schedule": "daily",
        "state": state,
        "trigger": "schedule",
        "started": iso(start),
        "finished": iso(FINISHED),
        "tasks": [{"kind": "run", "label": "nightly", "state": state, "children": vms}],
        "newest_good_points": {
            "web01": iso(FINISHED - dt.timedelta(hours=2, minutes=5)),
            "db01": iso(FINISHED - dt.timedelta(days=3, hours=4)),
        },
    }


# ------------------------------------------------------------------------ summary and policy


def test_summary_comes_first_and_counts_vms() -> None:
    text = summary_text(a_run())
    head, details = text.split("\nDetails\n", 1)
    assert head.splitlines()[0] == "Job nightly, schedule daily: partial"
    assert "VMs: 1 ok, 1 failed, 1 skipped (3 total)" in head
    assert "Data: read 105.0 MiB, written 40.0 MiB (new 10.0 MiB)" in head
    assert "Duration: 1 h 2 min" in head
    assert "  web01: 2 h 5 min" in head
    assert "  db01: 3 d 4 h" in head
    assert "  mail01: none" in head
    assert "fell back to full read: checkpoint missing" in details
    assert "dedup 2.50x, compression 1.60x" in details
    assert "target remote-a: success, 3 min" in details


def test_no_url_userinfo_leaks() -> None:
    run = a_run()
    for out in (summary_text(run), summary_html(run), webhook_body(parse_run(run)).decode()):
        assert "hunter2" not in out and "AKIAEXAMPLE" not in out
        assert "s3://***@s3.example.net/bucket" in out


def test_html_escapes_and_has_summary() -> None:
    run = a_run()
    run["job"] = "<script>x</script>"
    page = summary_html(run)
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert page.index("1 ok, 1 failed, 1 skipped") < page.index("Details")


def test_bad_run_document_names_the_field() -> None:
    run = a_run()
    run["tasks"][0]["children"][1]["state"] = "exploded"
    with pytest.raises(ReportError, match=r"tasks\[0\]\.children\[1\]\.state"):
        parse_run(run)
    del run["job"]
    with pytest.raises(ReportError, match=r"\bjob: Field required"):
        parse_run(run)
    run = a_run()
    run["started"] = "2026-12-06T01:00:00"  # no time zone
    with pytest.raises(ReportError, match="started"):
        parse_run(run)


REPORTED = {
    "never": set(),
    "always": {"success", "partial", "failed", "skipped", "cancelled", "interrupted"},
    "failure": {"partial", "failed", "skipped", "cancelled", "interrupted"},
    "error": {"failed", "interrupted"},
}


@pytest.mark.parametrize("when", sorted(REPORTED))
@pytest.mark.parametrize(
    "state", ["success", "partial", "failed", "skipped", "cancelled", "interrupted"]
)
def test_report_when_truth_table(when: str, state: str) -> None:
    assert should_report(when, state) is (state in REPORTED[when])


def test_report_run_applies_the_policy(tmp_path: Path) -> None:
    hook = load_targets(
        [{"kind": "webhook", "name": "h", "url": "http://127.0.0.1:9/", "secret": WEBHOOK_SECRET}]
    )
    assert report_run(a_run("success"), ReportWhen.FAILURE, hook, outbox=tmp_path) == []
    assert report_run(a_run("partial"), "error", hook, outbox=tmp_path) == []
    [result] = report_run(a_run("failed"), "error", hook, outbox=tmp_path)
    assert not result.ok and result.queued is not None


def test_bad_target_settings_name_the_field() -> None:
    base = {"kind": "email", "name": "m", "host": "h", "from": "a@b.c", "to": ["x@y.z"]}
    with pytest.raises(ReportError, match=r"report target \[0\]\.to"):
        load_targets([{**base, "to": []}])
    with pytest.raises(ReportError, match="user and password go together"):
        load_targets([{**base, "user": "u"}])
    with pytest.raises(ReportError, match=r"\[1\]\.url: .*user:password@"):
        load_targets(
            [
                base,
                {"kind": "webhook", "name": "w", "url": "https://u:p@h/", "secret": WEBHOOK_SECRET},
            ]
        )
    with pytest.raises(ReportError, match="used twice"):
        load_targets([base, base])
    assert SMTP_PASSWORD not in repr(
        load_targets([{**base, "user": "u", "password": SMTP_PASSWORD}])
    )


# ------------------------------------------------------------------------ SMTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it through `ca_file`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmkeep test")])
    now = dt.datetime.now(UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("cert")
    (d / "cert.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return d / "cert.pem", d / "key.pem"


def server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    return ctx


@dataclass
class Mailbox:
    messages: list[email.message.EmailMessage] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        self.messages.append(msg)
        return "250 OK"

    def authenticator(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"reporter",
            SMTP_PASSWORD.encode(),
        )
        if ok:
            self.logins.append((mechanism, data.login.decode()))
        return AuthResult(success=ok, handled=False)  # False: aiosmtpd answers 535


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    """Start aiosmtpd with the given options; every started controller is stopped after."""
    started: list[Controller] = []

    def start(port: int | None = None, **kwargs: Any) -> tuple[Mailbox, int]:
        box = Mailbox()
        port = port or free_port()
        if kwargs.pop("auth", False):
            kwargs.update(authenticator=box.authenticator, auth_required=True)
        ctl = Controller(box, hostname="127.0.0.1", port=port, **kwargs)
        ctl.start()
        started.append(ctl)
        return box, port

    yield start
    for ctl in started:
        ctl.stop()


def email_target(port: int, **extra: Any) -> Any:
    base = {
        "kind": "email",
        "name": "ops-mail",
        "host": "127.0.0.1",
        "port": port,
        "from": "vmkeep@example.net",
        "to": ["ops@example.net", "boss@example.net"],
        "timeout": 5,
    }
    [target] = load_targets([{**base, **extra}])
    return target


def check_report_mail(msg: email.message.EmailMessage) -> None:
    assert msg["Subject"] == "[vmkeep] nightly (daily): partial"
    assert msg["To"] == "ops@example.net, boss@example.net"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    text = plain.get_content().replace("\r\n", "\n")
    assert text.startswith("Job nightly, schedule daily: partial\nVMs: 1 ok, 1 failed, 1 skipped")
    assert text.index("web01: 2 h 5 min") < text.index("Details")
    assert "<h2>nightly: partial</h2>" in html.get_content()
    raw = msg.as_string()
    assert "hunter2" not in raw and SMTP_PASSWORD not in raw


def test_email_plain_smtp(smtp_server: Any) -> None:
    box, port = smtp_server()
    [result] = deliver(a_run(), [email_target(port, starttls="off")])
    assert result.ok, result.error
    [msg] = box.messages
    check_report_mail(msg)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_email_starttls_with_auth(
    smtp_server: Any, cert: tuple[Path, Path], mechanism: str
) -> None:
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    box, port = smtp_server(
        tls_context=server_context(cert),
        require_starttls=True,
        auth=True,
        auth_exclude_mechanism=[other],
    )
    target = email_target(
        port, starttls="required", user="reporter", password=SMTP_PASSWORD, ca_file=str(cert[0])
    )
    [result] = deliver(a_run(), [target])
    assert result.ok, result.error
    assert box.logins == [(mechanism, "reporter")]
    check_report_mail(box.messages[0])


def test_email_implicit_tls(smtp_server: Any, cert: tuple[Path, Path]) -> None:
    # aiosmtpd does not see its own implicit TLS, so it must be told AUTH is fine here
    box, port = smtp_server(ssl_context=server_context(cert), auth=True, auth_require_tls=False)
    target = email_target(
        port, tls=True, user="reporter", password=SMTP_PASSWORD, ca_file=str(cert[0])
    )
    [result] = deliver(a_run(), [target])
    assert result.ok, result.error
    check_report_mail(box.messages[0])


def test_email_refusals(smtp_server: Any, cert: tuple[Path, Path], tmp_path: Path) -> None:
    box, port = smtp_server()  # no STARTTLS offered
    [r1] = deliver(a_run(), [email_target(port, starttls="required")])
    assert not r1.ok and "does not offer STARTTLS" in (r1.error or "")
    [r2] = deliver(
        a_run(), [email_target(port, starttls="optional", user="reporter", password=SMTP_PASSWORD)]
    )
    assert not r2.ok and "refusing to send the password unencrypted" in (r2.error or "")
    assert box.messages == []
    # an untrusted certificate is refused
    _, tls_port = smtp_server(tls_context=server_context(cert))
    [r3] = deliver(a_run(), [email_target(tls_port, starttls="required")])
    assert not r3.ok and "CERTIFICATE_VERIFY_FAILED" in (r3.error or "")
    # wrong password: the server's answer, and never the password itself
    _, auth_port = smtp_server(tls_context=server_context(cert), auth=True)
    bad = email_target(auth_port, user="reporter", password="wrong-pass", ca_file=str(cert[0]))
    [r4] = deliver(a_run(), [bad], outbox=tmp_path)
    assert not r4.ok and "535" in (r4.error or "") and "wrong-pass" not in (r4.error or "")


def test_smtp_down_then_retry_succeeds(
    smtp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens yet
    target = email_target(
        port, starttls="off", user="reporter", password=SMTP_PASSWORD, allow_plain_auth=True
    )
    outbox = tmp_path / "outbox"
    now = FINISHED
    with caplog.at_level(logging.WARNING):
        [result] = deliver(a_run(), [target], outbox=outbox, now=now)
    assert not result.ok and result.queued is not None and result.queued.exists()
    assert "retry queued" in caplog.text
    entry = json.loads(result.queued.read_text())
    assert entry["target"] == "ops-mail" and entry["attempts"] == 1
    assert SMTP_PASSWORD not in result.queued.read_text()
    assert result.queued.stat().st_mode & 0o777 == 0o600

    assert retry_outbox(outbox, now + dt.timedelta(seconds=30), [target]) == []  # not due yet
    box, _ = smtp_server(port=port, auth=True, auth_require_tls=False)
    [again] = retry_outbox(outbox, now + dt.timedelta(seconds=61), [target])
    assert again.ok and again.attempts == 2
    assert list(outbox.glob("*.json")) == []
    check_report_mail(box.messages[0])


def test_retry_gives_up_after_max_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = email_target(free_port(), starttls="off")
    policy = RetryPolicy(max_attempts=3, base_delay=10, max_delay=15)
    now = FINISHED
    [r] = deliver(a_run(), [target], outbox=tmp_path, now=now, policy=policy)
    assert r.queued is not None
    [r2] = retry_outbox(tmp_path, now + dt.timedelta(seconds=10), [target], policy=policy)
    assert not r2.ok and r2.attempts == 2 and not r2.dropped
    next_attempt = dt.datetime.fromisoformat(json.loads(r.queued.read_text())["next_attempt"])
    assert next_attempt == now + dt.timedelta(seconds=25)  # 10 s, then min(15, 20) s
    assert retry_outbox(tmp_path, now + dt.timedelta(seconds=24), [target], policy=policy) == []
    with caplog.at_level(logging.ERROR):
        [r3] = retry_outbox(tmp_path, now + dt.timedelta(seconds=25), [target], policy=policy)
    assert r3.dropped and r3.attempts == 3
    assert "dropped after 3 attempts" in caplog.text
    assert list(tmp_path.glob("*.json")) == []


def test_retry_drops_entry_of_removed_target(tmp_path: Path) -> None:
    target = email_target(free_port(), starttls="off")
    deliver(a_run(), [target], outbox=tmp_path, now=FINISHED)
    [r] = retry_outbox(tmp_path, FINISHED + dt.timedelta(hours=1), [])
    assert r.dropped and "no longer configured" in (r.error or "")
    assert list(tmp_path.glob("*.json")) == []


def test_deliver_never_raises_on_a_bad_run(tmp_path: Path) -> None:
    target = email_target(free_port(), starttls="off")
    [r] = deliver({"id": "x"}, [target], outbox=tmp_path)
    assert not r.ok and "invalid run document" in (r.error or "")


# ------------------------------------------------------------------------ webhook


@dataclass
class Hook:
    received: list[tuple[dict[str, str], bytes, bool]] = field(default_factory=list)
    status: int | None = None  # force this status instead of checking

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify_signature(
                    WEBHOOK_SECRET,
                    body,
                    self.headers.get(TIMESTAMP_HEADER, ""),
                    self.headers.get(SIGNATURE_HEADER, ""),
                    now=time.time(),
                )
                hook.received.append((dict(self.headers), body, ok))
                self.send_response(hook.status or (204 if ok else 401))
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def hook() -> Iterator[tuple[Hook, int]]:
    h = Hook()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield h, server.server_address[1]
    server.shutdown()
    server.server_close()


def hook_target(port: int, secret: str = WEBHOOK_SECRET) -> Any:
    [t] = load_targets(
        [
            {
                "kind": "webhook",
                "name": "hook",
                "url": f"http://127.0.0.1:{port}/vmkeep?x=1",
                "secret": secret,
                "timeout": 5,
            }
        ]
    )
    return t


def post(port: int, headers: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/vmkeep", body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_webhook_signed_and_verified(hook: tuple[Hook, int]) -> None:
    h, port = hook
    [result] = deliver(a_run(), [hook_target(port)])
    assert result.ok, result.error
    [(headers, body, valid)] = h.received
    assert valid
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body.decode("utf-8"))
    assert doc == json.loads(webhook_body(parse_run(a_run())))
    assert doc["state"] == "partial" and "hunter2" not in body.decode()

    # the receiver rejects a tampered body, and a replayed signature under another timestamp
    sig = {k: headers[k] for k in (TIMESTAMP_HEADER, SIGNATURE_HEADER, "Content-Type")}
    assert post(port, sig, body.replace(b'"partial"', b'"success"', 1)) == 401
    assert post(port, {**sig, TIMESTAMP_HEADER: str(int(sig[TIMESTAMP_HEADER]) + 1)}, body) == 401
    assert post(port, sig, body) == 204
    ts = sig[TIMESTAMP_HEADER]
    assert not verify_signature(WEBHOOK_SECRET, body, ts, sig[SIGNATURE_HEADER], now=int(ts) + 301)


def test_webhook_wrong_secret_or_error_is_queued(hook: tuple[Hook, int], tmp_path: Path) -> None:
    h, port = hook
    [r] = deliver(a_run(), [hook_target(port, "another-secret-of-16+")], outbox=tmp_path)
    assert not r.ok and "HTTP 401" in (r.error or "") and r.queued is not None
    h.status = 500
    [r2] = retry_outbox(tmp_path, dt.datetime.now(UTC) + dt.timedelta(hours=1), [hook_target(port)])
    assert not r2.ok and "HTTP 500" in (r2.error or "") and r2.attempts == 2
    h.status = None
    [r3] = retry_outbox(tmp_path, dt.datetime.now(UTC) + dt.timedelta(hours=5), [hook_target(port)])
    assert r3.ok and r3.attempts == 3
    # the same delivery id every time, so the receiver can drop duplicates
    ids = {headers["X-Vmkeep-Delivery"] for headers, _, _ in h.received}
    assert len(ids) == 1


def test_one_target_down_does_not_stop_the_other(hook: tuple[Hook, int], tmp_path: Path) -> None:
    _, port = hook
    results = deliver(
        a_run(), [email_target(free_port(), starttls="off"), hook_target(port)], outbox=tmp_path
    )
    assert [(r.target, r.ok) for r in results] == [("ops-mail", False), ("hook", True)]
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_outbox_sets_aside_bad_files_and_honours_the_lock(tmp_path: Path) -> None:
    from vmkeep.engine.reports.outbox import Outbox

    target = email_target(free_port(), starttls="off")
    [r] = deliver(a_run(), [target], outbox=tmp_path, now=FINISHED)
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / ".tmp-leftover").write_text("half")  # a crash between write and link
    later = FINISHED + dt.timedelta(hours=1)
    with Outbox(tmp_path).exclusive() as mine:
        assert mine
        assert retry_outbox(tmp_path, later, [target]) == []  # another process holds it
    [again] = retry_outbox(tmp_path, later, [target])
    assert again.target == "ops-mail" and again.attempts == 2
    assert (tmp_path / "garbage.bad").exists() and not (tmp_path / "garbage.json").exists()
    assert r.queued is not None and r.queued.exists()
