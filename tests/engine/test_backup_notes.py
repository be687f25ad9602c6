"""Notes a connector adds when its session finishes (e.g. an --offline backup could not start
the VM again) reach the report and the restore point's caller, not only the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.repository.test_data_path import make_vm
from vmkeep.connectors.base import BackupSession, VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

LATE = "domain web could not be started again: (a fault only a wrapper can stage)"


class LateNoteConnector(FilesConnector):
    """The real files connector, whose session adds a note in finish() as the libvirt offline
    session does when the restart fails (that fault needs a hypervisor refusing to start)."""

    def begin_backup(self, vm: VmConfig, previous: Any) -> BackupSession:
        session = super().begin_backup(vm, previous)
        finish = session.finish

        def finish_with_note(ok: bool) -> None:
            finish(ok)
            session.notes.append(LATE)

        session.finish = finish_with_note  # type: ignore[method-assign]
        return session


class NoteRecorder(SilentProgress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_note_added_by_finish_is_reported(tmp_path: Path) -> None:
    vm, _ = make_vm(tmp_path, chunks=3)
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"")
    progress = NoteRecorder()
    report = backup_vm(repo, LateNoteConnector(), str(vm), BackupOptions(), progress)
    assert report.notes.count(LATE) == 1
    assert progress.notes.count(LATE) == 1
    assert report.to_json()["notes"].count(LATE) == 1
