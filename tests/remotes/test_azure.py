"""The Azure Blob remote against a real Azurite: the shared contract (remote_contract.py, with
a whole backup/restore/verify/gc run), plus what only Azure meets: the location and its
credentials, prefixes, pagination, clear errors (bad key, missing container, dead or silent
server), retries through a fault proxy, uncommitted blocks of dead writers."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is not installed")

from azure.storage.blob import (
    BlobServiceClient,
    ContainerSasPermissions,
    generate_container_sas,
)

from vmkeep.errors import ObjectExistsError, RemoteError, UsageError
from vmkeep.remotes.azure import AzureRemote, open_azure

from .azure_server import (
    ACCOUNT,
    ACCOUNT_KEY,
    AzuriteServer,
    FaultProxy,
    ServerUnavailable,
    start_azurite,
    stop_azurite,
)
from .remote_contract import RemoteContract, Reopen, Stored

ENV_VARS = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")


@pytest.fixture(scope="module")
def azurite() -> Iterator[AzuriteServer]:
    try:
        server = start_azurite()
    except ServerUnavailable as exc:
        print(f"skipping the Azure tests: {exc}")
        pytest.skip(str(exc))
    yield server
    stop_azurite(server)


@pytest.fixture(autouse=True)
def _no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _service(server: AzuriteServer) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(server.connection_string)


@pytest.fixture
def container(azurite: AzuriteServer) -> str:
    """A fresh, empty container for each test."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    _service(azurite).create_container(name)
    return name


def _remote(server: AzuriteServer, container: str, **kwargs: object) -> AzureRemote:
    options: dict[str, object] = {
        "account": ACCOUNT,
        "endpoint": server.endpoint,
        "account_key": ACCOUNT_KEY,
    }
    options.update(kwargs)
    return AzureRemote(container, "backups/site1", **options)  # type: ignore[arg-type]


@pytest.fixture
def remote(azurite: AzuriteServer, container: str) -> AzureRemote:
    return _remote(azurite, container, page_size=7)  # small pages: listings must paginate


@pytest.fixture
def reopen(azurite: AzuriteServer, remote: AzureRemote) -> Reopen:
    return lambda: _remote(azurite, remote.container)


@pytest.fixture
def stored(azurite: AzuriteServer, remote: AzureRemote) -> Stored:
    def read() -> dict[str, bytes]:
        raw = _service(azurite).get_container_client(remote.container)
        return {
            b.name.removeprefix(remote.prefix): raw.download_blob(b.name).readall()
            for b in raw.list_blobs(name_starts_with=remote.prefix)
        }

    return read


class TestContract(RemoteContract):
    free_space_known = False


def test_objects_live_under_the_prefix(azurite: AzuriteServer, remote: AzureRemote) -> None:
    remote.put("config", b"c")
    raw = _service(azurite).get_container_client(remote.container)
    assert [b.name for b in raw.list_blobs()] == ["backups/site1/config"]
    other = _remote(azurite, remote.container)
    other.prefix = "elsewhere/"
    assert list(other.list("")) == []


def test_list_paginates(remote: AzureRemote) -> None:
    names = {f"chunks/{i % 3:02x}/{i:064x}" for i in range(40)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: remote.put(n, n.encode()), names))
    remote.put("manifests/p1", b"m")
    calls = 0
    real_list_blobs = remote._client.list_blobs

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        assert kwargs["results_per_page"] == 7
        return real_list_blobs(*args, **kwargs)  # type: ignore[arg-type]

    remote._client.list_blobs = counting  # type: ignore[method-assign,assignment]
    listed = list(remote.list("chunks/"))
    assert calls == 1
    assert {o.name for o in listed} == names and len(listed) == len(names)
    assert all(o.size == len(o.name) for o in listed)
    assert {o.name for o in remote.list("chunks/01/")} == {n for n in names if "/01/" in n}


def test_wrong_key_fails_authentication(azurite: AzuriteServer, container: str) -> None:
    wrong = ACCOUNT_KEY[:10] + ("A" if ACCOUNT_KEY[10] != "A" else "B") + ACCOUNT_KEY[11:]
    bad = _remote(azurite, container, account_key=wrong)
    for op in (
        lambda: bad.put("x", b"1"),
        lambda: bad.get("x"),
        lambda: bad.stat("x"),
        lambda: list(bad.list("")),
        lambda: bad.delete("x"),
    ):
        with pytest.raises(RemoteError, match="authentication failed"):
            op()
    with pytest.raises(RemoteError, match=r"authentication failed.*account key is invalid"):
        _remote(azurite, container, account_key="not base64!").put("x", b"1")
    with pytest.raises(RemoteError, match="authentication failed"):
        _remote(azurite, container, account_key=None, sas_token="sv=2021-08-06&sig=bad").get("x")


def test_missing_container_is_named(azurite: AzuriteServer) -> None:
    gone = _remote(azurite, "no-such-container")
    for op in (
        lambda: gone.put("x", b"1"),
        lambda: gone.get("x"),
        lambda: gone.stat("x"),
        lambda: list(gone.list("")),
        lambda: gone.delete("x"),
    ):
        with pytest.raises(RemoteError, match="container 'no-such-container' does not exist"):
            op()


def test_stopped_server_fails_cleanly_not_a_hang() -> None:
    try:
        server = start_azurite()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        _service(server).create_container("doomed")
        r = _remote(server, "doomed", retries=2, backoff=0.1, connect_timeout=2.0)
        r.put("x", b"1")
    finally:
        stop_azurite(server)
    started = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach the endpoint"):
        r.get("x")
    with pytest.raises(RemoteError, match="cannot reach"):
        r.put("y", b"2")
    assert time.monotonic() - started < 10


def test_silent_server_times_out() -> None:
    """A server that accepts connections and never answers: read timeouts, then RemoteError."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accept(): the kernel completes handshakes, nobody answers
        port = listener.getsockname()[1]
        r = AzureRemote(
            "silent",
            account=ACCOUNT,
            endpoint=f"http://127.0.0.1:{port}/{ACCOUNT}",
            account_key=ACCOUNT_KEY,
            retries=10,
            backoff=0.1,
            retry_deadline=2.0,  # the total budget, not the retry count, ends it
            connect_timeout=1.0,
            read_timeout=1.0,
        )
        started = time.monotonic()
        with pytest.raises(RemoteError, match=r"timed out|cannot reach"):
            r.get("x")
        assert time.monotonic() - started < 6


@pytest.fixture
def proxy(azurite: AzuriteServer) -> Iterator[FaultProxy]:
    p = FaultProxy(azurite.port, {})
    yield p
    p.close()


def test_throttling_and_lost_answers_are_retried(
    azurite: AzuriteServer, container: str, proxy: FaultProxy
) -> None:
    r = _remote(azurite, container, endpoint=proxy.endpoint, backoff=0.05)
    proxy.plan = {1: "503", 2: "503", 4: "drop", 6: "drop", 7: "503"}
    r.put("chunks/a", b"A")  # 1: 503, 2: 503, 3: stored
    assert r.get("chunks/a") == b"A"  # 4: lost answer, 5: read again
    # 6: the create is stored but its answer lost; 7: busy; 8: the retry finds the object:
    # it holds exactly our bytes (9: read back), so the put did happen
    r.put("manifests/p1", b"M", overwrite=False)
    assert r.get("manifests/p1") == b"M"
    assert len(proxy.requests) == 10
    with pytest.raises(ObjectExistsError):  # a plain conflict stays a conflict
        r.put("manifests/p1", b"other", overwrite=False)


def test_retries_are_bounded(azurite: AzuriteServer, container: str, proxy: FaultProxy) -> None:
    r = _remote(azurite, container, endpoint=proxy.endpoint, retries=3, backoff=0.05)
    proxy.plan = {i: "503" for i in range(1, 100)}
    with pytest.raises(RemoteError, match=r"server error.*503"):
        r.put("x", b"1")
    assert len(proxy.requests) == 4  # the first attempt and 3 retries


def test_purge_incomplete_discards_only_dead_uncommitted_blocks(
    azurite: AzuriteServer, remote: AzureRemote
) -> None:
    raw = _service(azurite).get_container_client(remote.container)
    remote.put("chunks/aa/done", b"complete")
    raw.get_blob_client("backups/site1/chunks/aa/half").stage_block("MDAwMDAx", b"partial")
    raw.get_blob_client("backups/site1/chunks/aa/done").stage_block("MDAwMDAx", b"next")
    raw.get_blob_client("outside/half").stage_block("MDAwMDAx", b"not ours")
    assert [o.name for o in remote.list("")] == ["chunks/aa/done"]
    assert remote.purge_incomplete(older_than=3600) == 0  # too young
    assert remote.purge_incomplete(older_than=0) == 1
    assert remote.purge_incomplete(older_than=0) == 0
    # even if the listings' merge went wrong, a committed blob is never taken for a leftover
    done = next(raw.list_blobs(name_starts_with="backups/site1/chunks/aa/done"))
    assert not remote._discard_uncommitted(done.name, done.last_modified)
    assert remote.get("chunks/aa/done") == b"complete"
    left = {b.name for b in raw.list_blobs(include=["uncommittedblobs"])}
    assert left == {"backups/site1/chunks/aa/done", "outside/half"}


def test_open_azure_reads_credentials_from_the_environment(
    azurite: AzuriteServer, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = f"azure://{container}/vm/backups?account={ACCOUNT}&endpoint={azurite.endpoint}"
    with pytest.raises(UsageError, match="no credentials"):
        open_azure(location)

    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    r = open_azure(location)
    assert r.url == location and ACCOUNT_KEY not in r.url
    assert r.prefix == "vm/backups/"
    r.put("config", b"via key")
    assert open_azure(r.url).get("config") == b"via key"  # the url attribute reopens it
    monkeypatch.delenv("AZURE_STORAGE_KEY")

    sas = generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(
            read=True, write=True, delete=True, list=True, create=True
        ),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + sas)
    r = open_azure(location)
    assert "sig=" not in r.url
    assert r.get("config") == b"via key"
    r.put("sas", b"via sas")
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN")

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    r = open_azure(f"azure://{container}/vm/backups")
    assert "AccountKey" not in r.url and r.url == location
    assert r.get("sas") == b"via sas"
    with pytest.raises(UsageError, match="is for account"):
        open_azure(f"azure://{container}?account=someoneelse")


@pytest.mark.parametrize(
    "location, message",
    [
        ("s3://bucket", "invalid azure location"),
        ("azure:///prefix?account=a", "invalid azure location"),
        ("azure://Bad_Name?account=a", "invalid azure container name"),
        ("azure://ab?account=a", "invalid azure container name"),
        ("azure://cont?account=a&key=secret", "unknown parameter"),
        ("azure://user:pw@cont?account=a", "credentials in the environment"),
        ("azure://cont?account=a&endpoint=ftp://x", "must be an http"),
        ("azure://cont", "needs \\?account=NAME"),
    ],
)
def test_bad_locations(location: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    with pytest.raises(UsageError, match=message):
        open_azure(location)
