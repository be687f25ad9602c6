"""The SMB remote against a real Samba on 127.0.0.1: the shared contract (remote_contract.py,
with a whole backup/restore/verify/gc run), plus what only SMB meets: create-if-absent races
between smbd processes, temp files of dead writers, names SMB cannot store, directory paging,
clear errors (credentials, share, permissions, full disk, dead or frozen server), the URL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmkeep.errors import (
    NotFoundError,
    ObjectExistsError,
    RemoteError,
    RemoteFullError,
    UsageError,
)

from .remote_contract import RemoteContract, Reopen, Stored
from .smb_server import READ_ONLY_SHARE, SambaServer, ServerUnavailable

smb = pytest.importorskip("vmkeep.remotes.smb", reason="smbprotocol is not installed")
SmbRemote = smb.SmbRemote


@pytest.fixture(scope="module")
def server() -> Iterator[SambaServer]:
    srv = SambaServer()
    try:
        srv.start()
    except ServerUnavailable as exc:
        srv.cleanup()
        pytest.skip(f"no Samba server: {exc}")
    yield srv
    srv.cleanup()


def _remote(srv: SambaServer, path: str | None = None, **kw: object) -> SmbRemote:
    opts: dict[str, object] = {"retry_time": 5.0, "connect_timeout": 5.0}
    opts.update(kw)
    return SmbRemote(
        srv.host,
        str(opts.pop("share", srv.share)),
        username=str(opts.pop("username", srv.user)),
        password=str(opts.pop("password", srv.password)),
        port=srv.port,
        path=f"t-{uuid.uuid4().hex[:8]}" if path is None else path,
        **opts,
    )


@pytest.fixture
def remote(server: SambaServer) -> Iterator[SmbRemote]:
    r = _remote(server)
    yield r
    r.close()


def _disk(remote: SmbRemote, server: SambaServer) -> Path:
    """The repository's directory as smbd sees it on the server's disk."""
    return server.share_dir / remote.url.rsplit("/", 1)[1]


@pytest.fixture
def reopen(server: SambaServer, remote: SmbRemote) -> Reopen:
    return lambda: _remote(server, path=remote.url.rsplit("/", 1)[1])


@pytest.fixture
def stored(server: SambaServer, remote: SmbRemote) -> Stored:
    """The files as they are on the server's disk."""

    def read() -> dict[str, bytes]:
        root = _disk(remote, server)
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        }

    return read


class TestContract(RemoteContract):
    free_space_known = True


def test_a_directory_is_not_an_object(remote: SmbRemote) -> None:
    remote.put("a/b/c", b"x")
    assert remote.stat("a/b") is None
    with pytest.raises(NotFoundError):
        remote.get("a/b", 0, 1)


def test_temp_files_are_invisible_and_purged(remote: SmbRemote, server: SambaServer) -> None:
    remote.put("chunks/ab/abcd", b"x")
    dead = _disk(remote, server) / "chunks" / "ab" / ".tmp-1-dead"
    dead.write_bytes(b"partial")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    fresh = dead.with_name(".tmp-2-busy")
    fresh.write_bytes(b"being written")
    assert [o.name for o in remote.list("chunks/")] == ["chunks/ab/abcd"]
    assert remote.purge_incomplete(older_than=600) == 1
    assert not dead.exists() and fresh.exists()
    assert sorted(p.name for p in dead.parent.iterdir()) == [".tmp-2-busy", "abcd"]


@pytest.mark.parametrize("name", [".tmp-x", "a\\b", "a:b", "c*"])
def test_names_smb_cannot_store_refused(remote: SmbRemote, name: str) -> None:
    """Temp names and characters SMB gives a meaning (the contract checks escaping names)."""
    with pytest.raises(RemoteError, match="invalid object name"):
        remote.put(name, b"x")


def test_list_pages_through_many_entries(server: SambaServer) -> None:
    r = _remote(server, list_page_bytes=1024)  # a few entries per QUERY_DIRECTORY page
    try:
        names = {f"chunks/{i % 3:02x}/{uuid.uuid4().hex}{i:04d}" for i in range(240)}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: r.put(n, n.encode()), names))
        r.put("manifests/p1", b"m")
        before = r.list_pages
        listed = {o.name: o.size for o in r.list("chunks/")}
        assert listed == {n: len(n) for n in names}
        assert r.list_pages - before > 20  # really paged, not one big answer
        assert {o.name for o in r.list("chunks/01/")} == {
            n for n in names if n.startswith("chunks/01/")
        }
        assert [o.name for o in r.list("manifests/")] == ["manifests/p1"]
        assert len(list(r.list(""))) == 241
    finally:
        r.close()


def _burn_cpu(seconds: float) -> subprocess.Popen[bytes]:
    """A busy process: smbd's children then get preempted between the steps of a request."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def test_create_if_absent_has_one_winner_under_cpu_load(
    remote: SmbRemote, server: SambaServer
) -> None:
    """60 rounds of 16 racing create-if-absent puts, one smbd process per connection, both
    cores busy. A rename without "replace if exists" let 2 to 8 writers win in 4% of such
    rounds (Samba stats the target, then renames); the hard link must never."""
    writers, rounds = 16, 60
    burners = [_burn_cpu(60) for _ in range(2)]
    try:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(lambda i: remote.put(f"warm/{i}", b"w"), range(2 * writers)))
            for k in range(rounds):
                barrier = threading.Barrier(writers)

                def attempt(i: int, k: int = k, barrier: threading.Barrier = barrier) -> bool:
                    barrier.wait()
                    try:
                        remote.put(f"locks/l{k}", f"writer {i}".encode(), overwrite=False)
                        return True
                    except ObjectExistsError:
                        return False

                wins = list(pool.map(attempt, range(writers)))
                assert wins.count(True) == 1, f"round {k}: {wins.count(True)} winners"
                assert remote.get(f"locks/l{k}") == f"writer {wins.index(True)}".encode()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert remote._links  # the hard links were used, not the rename fallback
    locks = _disk(remote, server) / "locks"
    assert sorted(p.name for p in locks.iterdir()) == sorted(f"l{k}" for k in range(rounds))
    assert {p.stat().st_nlink for p in locks.iterdir()} == {1}  # temp names all gone


def test_create_if_absent_without_hard_links_falls_back_to_rename(
    remote: SmbRemote, server: SambaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share that cannot link (here: Samba refusing the info class we send instead of
    FileLinkInformation) still gets create-if-absent, by the rename."""
    from smbprotocol.file_info import FileInformationClass

    monkeypatch.setattr(
        smb.files.FileLinkInformation,
        "INFO_CLASS",
        FileInformationClass.FILE_PIPE_REMOTE_INFORMATION,
    )
    remote.put("manifests/m", b"first", overwrite=False)
    assert not remote._links
    with pytest.raises(ObjectExistsError):
        remote.put("manifests/m", b"second", overwrite=False)
    assert remote.get("manifests/m") == b"first"
    assert os.listdir(_disk(remote, server) / "manifests") == ["m"]


def test_wrong_password_fails_clearly(server: SambaServer) -> None:
    r = _remote(server, password="not-the-password")
    began = time.monotonic()
    with pytest.raises(RemoteError, match="authentication failed for vmkeeptest"):
        r.put("x", b"1")
    assert time.monotonic() - began < 5  # not retried


def test_unknown_user_fails_clearly(server: SambaServer) -> None:
    with pytest.raises(RemoteError, match="authentication failed for nobody-here"):
        _remote(server, username="nobody-here").stat("x")


def test_missing_share_fails_clearly(server: SambaServer) -> None:
    with pytest.raises(RemoteError, match="share 'no-such-share' does not exist"):
        _remote(server, share="no-such-share").get("config")


def test_read_only_share_refuses_writes(server: SambaServer) -> None:
    r = _remote(server, share=READ_ONLY_SHARE, path="")
    assert list(r.list("")) == []
    with pytest.raises(RemoteError, match=r"permission denied|read-only") as info:
        r.put("x", b"1")
    assert not isinstance(info.value, RemoteFullError)


def test_full_share_fails_cleanly(server: SambaServer, tmp_path: Path) -> None:
    """A 1 MiB tmpfs mounted in the share: no space -> RemoteFullError, nothing left over."""
    mnt = server.share_dir / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs root")
    try:
        os.chown(mnt, *server.owner())
        r = _remote(server, path=mnt.name)
        with pytest.raises(RemoteFullError, match="no space"):
            r.put("big", os.urandom(2 << 20))
        assert list(r.list("")) == []
        assert os.listdir(mnt) == []  # not even a temp file
        r.put("small", b"fits")
        assert r.get("small") == b"fits"
        r.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (smbd forks one per client connection)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_stopped_or_frozen_server_fails_without_hanging() -> None:
    srv = SambaServer()
    try:
        try:
            srv.start()
        except ServerUnavailable as exc:
            pytest.skip(f"no Samba server: {exc}")
        r = _remote(srv, connect_timeout=1.0, request_timeout=2.0, retry_time=2.0)
        r.put("x", b"1")  # a pooled connection now exists
        # A reset connection (its smbd child killed) is replaced transparently.
        children = _children(srv.pid())
        assert children
        for child in children:
            os.kill(child, signal.SIGKILL)
        assert r.get("x") == b"1"
        # A server that restarts within the retry time is waited for.
        srv.stop()
        restart = threading.Timer(1.0, srv.start)
        restart.start()
        slow = _remote(srv, path=r.url.rsplit("/", 1)[1], retry_time=20.0)
        assert slow.get("x") == b"1"
        restart.join()
        slow.close()
        # Frozen: TCP still accepts, nothing answers -> request and connect timeouts.
        os.killpg(srv.pid(), signal.SIGSTOP)
        began = time.monotonic()
        try:
            with pytest.raises(RemoteError, match="timed out"):
                r.get("x")
        finally:
            os.killpg(srv.pid(), signal.SIGCONT)
        assert time.monotonic() - began < 20
        # Stopped: connection lost, then refused.
        srv.stop()
        began = time.monotonic()
        with pytest.raises(RemoteError, match=r"connection refused|connection lost"):
            r.put("y", b"2")
        with pytest.raises(RemoteError, match="connection refused"):
            list(r.list(""))
        assert time.monotonic() - began < 15
        r.close()
    finally:
        srv.cleanup()


def test_open_smb_url(monkeypatch: pytest.MonkeyPatch, server: SambaServer) -> None:
    monkeypatch.delenv(smb.PASSWORD_ENV, raising=False)
    with pytest.raises(UsageError, match=smb.PASSWORD_ENV):
        smb.open_smb(server.url("repo"))
    monkeypatch.setenv(smb.PASSWORD_ENV, server.password)
    with pytest.raises(UsageError, match="password in the URL"):
        smb.open_smb(f"smb://{server.user}:secret@{server.host}/{server.share}")
    for bad in ("smb://host/share", f"smb://u@{server.host}", "s3://u@h/share"):
        with pytest.raises(UsageError):
            smb.open_smb(bad)
    r = smb.open_smb(server.url("repo/sub"))
    assert r.url == server.url("repo/sub") and server.password not in r.url
    r.put("config", b"{}")
    assert (server.share_dir / "repo" / "sub" / "config").read_bytes() == b"{}"
    r.close()
    d = smb.open_smb("smb://CORP;alice@files.example:1445/backups")
    assert d.url == "smb://CORP;alice@files.example:1445/backups"
    assert smb.open_smb("smb://bob@nas/b").url == "smb://bob@nas/b"  # port 445 is implied
