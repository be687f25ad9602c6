"""Run Azurite's blob service on a free loopback port for the tests (the locked copy that
`scripts/setup.sh --test` puts in .venv/bin, else one on PATH)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Azurite's built-in development account and its well-known key (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
STARTUP_TIMEOUT = 15.0


class ServerUnavailable(Exception):
    """Azurite is not installed or did not start: the tests skip with this reason."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AzuriteServer:
    """One Azurite blob service process; `endpoint` is its path-style account URL."""

    port: int
    workdir: str
    process: subprocess.Popen[bytes] | None = None
    log_path: str = field(default="")
    tls: tuple[str, str] | None = None  # (cert, key) PEM files: serve https with them

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={'https' if self.tls else 'http'};"
            f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self) -> None:
        beside = Path(sys.executable).with_name("azurite-blob")
        exe = str(beside) if beside.exists() else shutil.which("azurite-blob")
        if exe is None:
            raise ServerUnavailable("azurite-blob not found: run scripts/setup.sh --test")
        self.log_path = os.path.join(self.workdir, "azurite.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    exe,
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    self.workdir,
                    "--skipApiVersionCheck",
                    "--loose",
                    "--silent",
                    "--disableTelemetry",
                    *(["--cert", self.tls[0], "--key", self.tls[1]] if self.tls else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerUnavailable(f"azurite-blob exited at startup: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ServerUnavailable(f"azurite-blob not ready within {STARTUP_TIMEOUT:.0f} s")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return " ".join(f.read().split())[-300:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop our own process group (node may start children), by its id."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def start_azurite(tls: tuple[str, str] | None = None) -> AzuriteServer:
    """Azurite on a free loopback port; with `tls` (cert, key), over https."""
    server = AzuriteServer(
        port=free_port(), workdir=tempfile.mkdtemp(prefix="vmkeep-azurite-"), tls=tls
    )
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.workdir, ignore_errors=True)
        raise
    return server


def stop_azurite(server: AzuriteServer) -> None:
    server.stop()
    shutil.rmtree(server.workdir, ignore_errors=True)


class FaultProxy:
    """An HTTP proxy in front of Azurite that injects the faults a real network and service show:
    `plan` maps a request number (1, 2, ...) to "503" (answer Server Busy without forwarding) or
    "drop" (forward, then close the connection without relaying the answer)."""

    def __init__(self, upstream_port: int, plan: dict[int, str]) -> None:
        self.upstream_port = upstream_port
        self.plan = plan
        self.requests: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests.append(f"{self.command} {self.path}")
                    fault = proxy.plan.get(len(proxy.requests))
                if fault == "503":
                    self.send_response(503, "Server Busy")
                    self.send_header("Content-Length", "0")
                    self.send_header("x-ms-error-code", "ServerBusy")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _relay

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
