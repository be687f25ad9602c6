"""`vmkeep report-target` end to end: a webhook target stored through the CLI receives the
report of a real job run on a real HTTP listener that checks the HMAC signature; secrets are
never printed; bad input is one line."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmkeep.engine.reports.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

from .conftest import Cli

SECRET = "a webhook signing secret of some length"


@dataclass
class Listener:
    url: str
    received: list[dict[str, object]] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    box = Listener("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ts, sig = self.headers[TIMESTAMP_HEADER] or "", self.headers[SIGNATURE_HEADER] or ""
            box.valid.append(verify_signature(SECRET, body, ts, sig, now=time.time()))
            box.received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield box
    server.shutdown()
    server.server_close()


def test_webhook_target_receives_a_signed_job_report(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, listener: Listener
) -> None:
    vm = make_vm("web01", 32 << 20)
    cli("remote", "add", "nas", str(tmp_path / "nas"), "--chunk-size", "256K")
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    cli("report-target", "add", "ops", "--webhook", listener.url, "--secret-file", str(secret_file))

    listed = cli("report-target", "list", "--json")
    assert SECRET not in listed.out
    assert listed.json() == [
        {"kind": "webhook", "name": "ops", "url": listener.url, "secret": "set"}
    ]

    cli("report-target", "test", "ops")
    assert listener.valid == [True] and listener.received[0]["job"] == "report-target-test"

    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"""kind: backup
name: nightly
remotes: [nas]
connector: {{type: files, root: {vm.parent}}}
vms: ["*"]
report: {{when: always, webhook: [ops]}}
"""
    )
    cli("job", "apply", "-f", str(jobs))
    run = cli("job", "run", "nightly", "--json", timeout=300).json()
    assert run["state"] == "success"
    assert listener.valid == [True, True]
    report = listener.received[1]
    assert report["job"] == "nightly" and report["state"] == "success"
    assert report["id"] == str(run["id"])
    assert SECRET not in json.dumps(report)

    # a job naming a removed target is not applied; a second add of a name is refused
    again = cli(
        "report-target",
        "add",
        "ops",
        "--webhook",
        listener.url,
        "--secret-file",
        str(secret_file),
        ok=False,
    )
    assert "ops" in again.err.strip().splitlines()[-1]
    cli("report-target", "remove", "ops")
    bad = cli("job", "apply", "-f", str(jobs), ok=False)
    assert "ops" in bad.err.strip().splitlines()[-1]


def test_bad_report_target_input_is_one_line(cli: Cli, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too short")
    run = cli(
        "report-target", "add", "x", "--webhook", "http://h/", "--secret-file", str(short), ok=False
    )
    assert "secret" in run.err.strip().splitlines()[-1]
    run = cli(
        "report-target",
        "add",
        "x",
        "--webhook",
        "ftp://h/",
        "--secret-file",
        str(tmp_path / "missing"),
        ok=False,
    )
    assert "--secret-file" in run.err
    run = cli("report-target", "add", "x", "--email", "ops@example.org", ok=False)
    assert "--smtp-host" in run.err
    assert "no report target named 'nope'" in cli("report-target", "test", "nope", ok=False).err
    assert cli("report-target", "list", "--json").json() == []
