"""A failing S3 or Azure remote names its cause in one line: unknown host (DNS), connection
refused, untrusted TLS certificate, a plain-HTTP server behind an https URL, wrong credentials,
missing bucket or container. Real servers on loopback: SeaweedFS and Azurite, each also behind
a TLS-terminating proxy with a self-signed certificate, which a CA bundle then makes trusted;
and Azurite serving https itself (--cert/--key) with the same certificate.

Each case runs through `vmkeep remote test URL` (one `error:` line, no traceback, exit 1) and,
for the retried cause (connection refused), through the remote itself with short retries."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.remotes.azure_server import (
    ACCOUNT,
    ACCOUNT_KEY,
    AzuriteServer,
    ServerUnavailable,
    start_azurite,
    stop_azurite,
)
from tests.remotes.s3_server import SeaweedServer, started_or_skip
from tests.remotes.tls_endpoint import TlsProxy, self_signed_cert
from vmkeep.errors import RemoteError
from vmkeep.remotes.azure import AzureRemote
from vmkeep.remotes.location import open_remote
from vmkeep.remotes.s3 import S3Remote

BUCKET = "vmkeep-diag"
CA_ENV = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


@dataclass
class Backend:
    """One kind of remote: how to spell its location, and the environment it needs."""

    kind: str
    plain_port: int  # the server's own plain-HTTP port
    proxy: TlsProxy  # TLS in front of it
    location: Callable[[str, str], str]  # (endpoint base, bucket or container) -> URL
    env: dict[str, str]
    bad_credentials: dict[str, str]
    auth_failure: str  # what the message says for bad credentials
    missing: str  # ... and for a missing bucket or container
    ca_hint: str


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    with started_or_skip(server, (BUCKET,)):
        yield server


@pytest.fixture(scope="module")
def s3(seaweed: SeaweedServer, cert: tuple[Path, Path]) -> Iterator[Backend]:
    server = seaweed
    port = int(server.endpoint.rsplit(":", 1)[1])
    proxy = TlsProxy(port, *cert)
    creds = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    yield Backend(
        kind="s3",
        plain_port=port,
        proxy=proxy,
        location=lambda base, bucket: (
            f"s3://{bucket}/p?endpoint={base}&region=us-east-1&path_style=1"
        ),
        env={
            **creds,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/vmkeep-diag",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/vmkeep-diag",
        },
        bad_credentials={"AWS_SECRET_ACCESS_KEY": "wrong-" + server.secret_key},
        auth_failure="S3 authentication failed",
        missing=r"bucket 'no-such-bucket' at https?://127\.0\.0\.1:\d+ does not exist",
        ca_hint="AWS_CA_BUNDLE or REQUESTS_CA_BUNDLE",
    )
    proxy.close()


@pytest.fixture(scope="module")
def azure(cert: tuple[Path, Path]) -> Iterator[Backend]:
    try:
        server: AzuriteServer = start_azurite()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(server.connection_string).create_container(BUCKET)
    proxy = TlsProxy(server.port, *cert)
    wrong = ACCOUNT_KEY[:10] + ("A" if ACCOUNT_KEY[10] != "A" else "B") + ACCOUNT_KEY[11:]
    yield Backend(
        kind="azure",
        plain_port=server.port,
        proxy=proxy,
        location=lambda base, container: (
            f"azure://{container}/p?account={ACCOUNT}&endpoint={base}/{ACCOUNT}"
        ),
        env={"AZURE_STORAGE_KEY": ACCOUNT_KEY},
        bad_credentials={"AZURE_STORAGE_KEY": wrong},
        auth_failure="authentication failed",
        missing=f"container 'no-such-bucket' does not exist in account '{ACCOUNT}'",
        ca_hint="REQUESTS_CA_BUNDLE",
    )
    proxy.close()
    stop_azurite(server)


@pytest.fixture(params=["s3", "azure"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*CA_ENV, "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def _cli(backend: Backend, home: Path, **extra: str) -> Cli:
    cli = Cli(home)
    for var in CA_ENV:
        cli.env.pop(var, None)
    cli.env.update(backend.env, **extra)
    return cli


def error_line(stderr: str) -> str:
    """stderr is exactly one `error:` line, without a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def _remote_test_fails(cli: Cli, url: str) -> str:
    """`vmkeep remote test URL` exits 1 with one `error:` line; that line."""
    run = cli("remote", "test", url, "--size", "4", ok=False, timeout=120)
    assert run.code == 1
    return error_line(run.err)


# -- each cause, named in the one error line of `vmkeep remote test` --------------------------


def test_unknown_host_names_dns(backend: Backend, tmp_path: Path) -> None:
    url = backend.location(f"http://nosuchhost.invalid:{backend.plain_port}", BUCKET)
    began = time.monotonic()
    line = _remote_test_fails(_cli(backend, tmp_path), url)
    assert "create: " in line
    assert "host name nosuchhost.invalid not found in DNS" in line, line
    assert time.monotonic() - began < 30  # a name the DNS says does not exist is not retried


def test_self_signed_certificate_is_named_and_a_ca_bundle_fixes_it(
    backend: Backend, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    url = backend.location(f"https://127.0.0.1:{backend.proxy.port}", BUCKET)
    line = _remote_test_fails(_cli(backend, tmp_path), url)
    assert f"TLS certificate of 127.0.0.1:{backend.proxy.port} not trusted: " in line, line
    assert "self-signed certificate" in line and f"with {backend.ca_hint})" in line, line
    # The same certificate as the CA bundle: the same URL now passes every check.
    for var in backend.ca_hint.split(" or "):
        run = _cli(backend, tmp_path, **{var: str(cert[0])})("remote", "test", url, "--size", "4")
        assert "Traceback" not in run.err and run.code == 0, (var, run.err)


def test_certificate_for_another_name_is_named(
    backend: Backend, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """Trusted CA, but the certificate is for 127.0.0.1 and the URL says localhost."""
    url = backend.location(f"https://localhost:{backend.proxy.port}", BUCKET)
    cli = _cli(backend, tmp_path, REQUESTS_CA_BUNDLE=str(cert[0]))
    line = _remote_test_fails(cli, url)
    assert f"TLS certificate of localhost:{backend.proxy.port} not trusted: " in line, line
    assert re.search(r"[Hh]ostname (mismatch|'localhost' doesn't match)", line), line


def test_plain_http_server_behind_an_https_url(backend: Backend, tmp_path: Path) -> None:
    url = backend.location(f"https://127.0.0.1:{backend.plain_port}", BUCKET)
    line = _remote_test_fails(_cli(backend, tmp_path), url)
    assert f"TLS handshake with 127.0.0.1:{backend.plain_port} failed: " in line, line
    assert "does not speak TLS (for plain HTTP use an http:// endpoint)" in line, line


def test_wrong_credentials(backend: Backend, tmp_path: Path) -> None:
    url = backend.location(f"http://127.0.0.1:{backend.plain_port}", BUCKET)
    line = _remote_test_fails(_cli(backend, tmp_path, **backend.bad_credentials), url)
    assert backend.auth_failure in line, line


def test_missing_bucket_or_container(backend: Backend, tmp_path: Path) -> None:
    url = backend.location(f"http://127.0.0.1:{backend.plain_port}", "no-such-bucket")
    line = _remote_test_fails(_cli(backend, tmp_path), url)
    assert re.search(backend.missing, line), line


def test_connection_refused(backend: Backend) -> None:
    """Refused connections are retried (a restarting server), so this one runs through the
    remote with a 1 s retry budget instead of the CLI's 30 s."""
    port = _dead_port()
    remote: S3Remote | AzureRemote
    if backend.kind == "s3":
        remote = S3Remote(
            BUCKET,
            endpoint=f"http://127.0.0.1:{port}",
            access_key="k",
            secret_key="s",
            retry_time=1.0,
        )
    else:
        remote = AzureRemote(
            BUCKET,
            account=ACCOUNT,
            endpoint=f"http://127.0.0.1:{port}/{ACCOUNT}",
            account_key=ACCOUNT_KEY,
            retry_deadline=1.0,
            backoff=0.1,
        )
    began = time.monotonic()
    for op in (lambda: remote.put("x", b"1"), lambda: remote.get("x")):
        with pytest.raises(RemoteError) as info:
            op()
        message = str(info.value)
        assert f"connection to 127.0.0.1:{port} refused: nothing listens there" in message
        assert "\n" not in message
    assert time.monotonic() - began < 15


def test_tls_proxy_really_carries_the_data(
    backend: Backend, cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the CA bundle, objects written over TLS read back byte for byte."""
    for k, v in backend.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert[0]))
    url = backend.location(f"https://127.0.0.1:{backend.proxy.port}", BUCKET)
    remote = open_remote(url)
    data = os.urandom(3 << 20)
    name = f"tls/{uuid.uuid4().hex}"
    remote.put(name, data)
    got = remote.get(name)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    plain = open_remote(backend.location(f"http://127.0.0.1:{backend.plain_port}", BUCKET))
    assert plain.get(name) == data  # the same server behind the proxy
    remote.delete(name)


def test_azurite_serving_tls_itself(cert: tuple[Path, Path], tmp_path: Path) -> None:
    """Azurite's own https (--cert/--key), no proxy: the same diagnosis, and the CA bundle."""
    from azure.storage.blob import BlobServiceClient

    try:
        server = start_azurite(tls=(str(cert[0]), str(cert[1])))
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        assert server.endpoint.startswith("https://127.0.0.1:")
        BlobServiceClient.from_connection_string(
            server.connection_string, connection_verify=str(cert[0])
        ).create_container(BUCKET)
        url = f"azure://{BUCKET}/p?account={ACCOUNT}&endpoint={server.endpoint}"
        cli = Cli(tmp_path)
        for var in CA_ENV:
            cli.env.pop(var, None)
        cli.env["AZURE_STORAGE_KEY"] = ACCOUNT_KEY
        line = _remote_test_fails(cli, url)
        assert f"TLS certificate of 127.0.0.1:{server.port} not trusted: self-signed" in line
        run = cli(
            "remote", "test", url, "--size", "4", "--json", env={"REQUESTS_CA_BUNDLE": str(cert[0])}
        )
        assert run.json()["ok"] is True and run.json()["checks"]["read"] == "ok"
    finally:
        stop_azurite(server)
