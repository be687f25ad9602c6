"""The contract every remote keeps (remotes/base.py), run against each real backend.

A backend's test module subclasses `RemoteContract` as `TestContract` and provides three
fixtures: `remote` (a fresh, empty remote), `reopen` (a second, independent handle on the same
repository) and `stored` (every stored object's raw bytes, read without vmkeep). What only one
backend meets (its URL, credentials, dead servers, leftovers of dead writers) stays in its own
module."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmkeep.errors import NotFoundError, ObjectExistsError, RemoteError, VmkeepError
from vmkeep.remotes.base import Remote, put_parts

# Names no remote may accept: each would escape the repository or is ambiguous.
BAD_NAMES = ["../x", "/etc/passwd", "a/../../b", "", "a//b", "a/./b"]

Reopen = Callable[[], Remote]
Stored = Callable[[], dict[str, bytes]]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _disk_sha(vm_dir: Path) -> str:
    doc = json.loads((vm_dir / "vm.json").read_text())
    h = hashlib.sha256()
    with open(vm_dir / doc["disks"][0]["file"], "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class RemoteContract:
    """Tests every remote must pass. `free_space_known`: whether the backend can tell."""

    free_space_known: bool = False

    def test_put_get_list_delete_ranges(self, remote: Remote) -> None:
        remote.put("a/b/c", b"hello world")
        remote.put("a/x", b"1")
        remote.put("empty", b"")
        assert remote.get("a/b/c") == b"hello world"
        assert remote.get("a/b/c", 6, 3) == b"wor"
        assert remote.get("a/b/c", 6) == b"world"
        assert remote.get("a/b/c", 8, 100) == b"rld"  # a range past the end is cut short
        assert remote.get("a/b/c", 11) == b""  # at the end, like a file
        assert remote.get("a/b/c", 50) == b""  # beyond it too
        assert remote.get("a/b/c", 3, 0) == b""
        assert remote.get("empty") == b""
        st = remote.stat("a/b/c")
        assert st is not None and st.name == "a/b/c" and st.size == 11
        assert abs(st.mtime - time.time()) < 300
        empty = remote.stat("empty")
        assert empty is not None and empty.size == 0
        assert sorted(o.name for o in remote.list("a/")) == ["a/b/c", "a/x"]
        assert [o.name for o in remote.list("a/b")] == ["a/b/c"]
        assert [o.name for o in remote.list("a/b/")] == ["a/b/c"]
        assert [o.name for o in remote.list("a/x")] == ["a/x"]
        assert list(remote.list("zz/")) == []
        assert {o.name: o.size for o in remote.list("")} == {"a/b/c": 11, "a/x": 1, "empty": 0}
        with pytest.raises(ObjectExistsError):
            remote.put("a/x", b"2", overwrite=False)
        assert remote.get("a/x") == b"1"
        remote.put("a/x", b"3")  # overwrite=True replaces
        assert remote.get("a/x") == b"3"
        remote.put("a/new", b"n", overwrite=False)
        assert remote.get("a/new") == b"n"
        remote.delete("a/x")
        remote.delete("a/x")  # missing is fine
        with pytest.raises(NotFoundError):
            remote.get("a/x")
        with pytest.raises(NotFoundError):
            remote.get("a/x", 1, 0)
        with pytest.raises(NotFoundError):
            remote.get("a/b")  # a common prefix ("directory") is not an object
        assert remote.stat("a/b") is None
        assert remote.stat("a/x") is None
        assert "a/x" not in {o.name for o in remote.list("a/")}
        remote.flush()
        free = remote.free_space()
        if self.free_space_known:
            assert free is not None and free > 0
        else:
            assert free is None

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_bad_names_refused(self, remote: Remote, name: str) -> None:
        with pytest.raises(RemoteError, match="invalid object name"):
            remote.put(name, b"x")
        assert list(remote.list("")) == []

    def test_large_object_and_ranges(self, remote: Remote) -> None:
        """Larger than one request of most servers (SMB 8 MiB, Azure's 8 MiB chunked gets)."""
        data = os.urandom((12 << 20) + 17)
        remote.put("big", data)
        assert _sha(remote.get("big")) == _sha(data)
        start = (8 << 20) - 7
        assert remote.get("big", start, 100) == data[start : start + 100]
        assert remote.get("big", (9 << 20) + 7, 5 << 20) == data[(9 << 20) + 7 : (14 << 20) + 7]
        assert [(o.name, o.size) for o in remote.list("big")] == [("big", len(data))]

    def test_object_from_parts(self, remote: Remote) -> None:
        """A data pack is stored from its pieces (remotes/base.py put_parts): the backend's own
        way (LocalRemote: writev; S3: a PUT whose body reads them; SMB: each WRITE's bytes
        taken from them) or joined; larger than a WRITE, with empty pieces and views."""
        parts: list[bytes] = [b"", os.urandom(5 << 20), b"", b"x", os.urandom(333)]
        parts += [memoryview(os.urandom(7 << 20))[11:], os.urandom(65536), b""]  # type: ignore[list-item]
        whole = b"".join(parts)
        remote.put("packs/p", b"an older object under the name")
        put_parts(remote, "packs/p", parts)
        assert parts == []  # emptied: the caller holds no copy
        assert _sha(remote.get("packs/p")) == _sha(whole)
        assert remote.get("packs/p", (5 << 20) - 3, 10) == whole[(5 << 20) - 3 : (5 << 20) + 7]
        stat = remote.stat("packs/p")
        assert stat is not None and stat.size == len(whole)

    def test_concurrent_puts_and_gets_from_8_threads(self, remote: Remote) -> None:
        """Parallel writers and readers; rewrites racing with reads only ever show a whole
        object, old or new, never a mix or a partial one."""
        old = {f"chunks/{i % 4:02x}/{i:064x}": os.urandom(100_000 + i * 997) for i in range(48)}
        new = {n: os.urandom(len(b) + 1) for n, b in list(old.items())[:16]}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: remote.put(n, old[n]), old))
            got = dict(pool.map(lambda n: (n, _sha(remote.get(n))), old))
            parts = list(pool.map(lambda n: remote.get(n, 1000, 5000) == old[n][1000:6000], old))
            assert got == {n: _sha(b) for n, b in old.items()} and all(parts)

            def rewrite(n: str) -> None:
                remote.put(n, new[n])

            def read(n: str) -> bool:
                return _sha(remote.get(n)) in (_sha(old[n]), _sha(new[n]))

            writes = [pool.submit(rewrite, n) for n in new]
            reads = [pool.submit(read, n) for n in new for _ in range(2)]
            for w in writes:
                w.result()
            assert all(r.result() for r in reads)
        assert {n: _sha(remote.get(n)) for n in new} == {n: _sha(b) for n, b in new.items()}
        sizes = {n: len(new.get(n, b)) for n, b in old.items()}
        assert {o.name: o.size for o in remote.list("chunks/")} == sizes

    def test_create_if_absent_has_one_winner(self, remote: Remote) -> None:
        """8 writers race to create the same name: exactly one wins, and it is its bytes."""
        barrier = threading.Barrier(8)

        def attempt(i: int) -> bool:
            barrier.wait()
            try:
                remote.put("locks/exclusive", f"writer {i}".encode(), overwrite=False)
                return True
            except ObjectExistsError:
                return False

        with ThreadPoolExecutor(8) as pool:
            wins = list(pool.map(attempt, range(8)))
        assert wins.count(True) == 1
        assert remote.get("locks/exclusive") == f"writer {wins.index(True)}".encode()
        assert [o.name for o in remote.list("locks/")] == ["locks/exclusive"]

    @pytest.mark.parametrize("fmt", [1, 3])
    def test_repository_end_to_end(
        self, remote: Remote, reopen: Reopen, stored: Stored, tmp_path: Path, fmt: int
    ) -> None:
        """Backup, restore through a second handle, verify, gc, verify again; the restored
        disk hashes like the original, and no stored byte holds the plaintext."""
        from vmkeep.connectors.files import FilesConnector
        from vmkeep.connectors.files.demo import DEMO_MARKER, create_demo_vm
        from vmkeep.operations.backup import BackupOptions, backup_vm
        from vmkeep.operations.restore import restore_vm
        from vmkeep.progress import SilentProgress
        from vmkeep.repository.gc import collect_garbage
        from vmkeep.repository.repository import Repository
        from vmkeep.repository.verify import verify

        repo = Repository.init(remote, "aes-256-gcm", lambda: b"pw", format_version=fmt)
        with pytest.raises(VmkeepError):
            Repository.init(reopen(), "aes-256-gcm", lambda: b"pw")  # never over another
        (tmp_path / "vms").mkdir()
        vm_dir = create_demo_vm(tmp_path / "vms", "vm1", 32 * 1024 * 1024)
        report = backup_vm(repo, FilesConnector(), str(vm_dir), BackupOptions(), SilentProgress())
        target = tmp_path / "restored"
        target.mkdir()
        reopened = Repository.open(reopen(), lambda: b"pw")
        restored = restore_vm(
            reopened, FilesConnector(), report.restore_point, str(target), SilentProgress()
        )
        assert _disk_sha(Path(restored.location)) == _disk_sha(vm_dir)
        assert verify(reopened, None, SilentProgress()).ok
        collect_garbage(reopened, SilentProgress())
        assert verify(Repository.open(reopen(), lambda: b"pw"), None, SilentProgress()).ok

        objects = stored()
        names = set(objects)
        assert "config" in names
        assert any(n.startswith("chunks/" if fmt == 1 else "packs/") for n in names)
        assert any(n.startswith("manifests/") for n in names)
        assert {o.name for o in remote.list("")} == names  # nothing hidden, nothing extra
        marker = DEMO_MARKER.encode()
        for name, body in objects.items():
            assert marker not in body, f"plaintext marker found in {name}"
