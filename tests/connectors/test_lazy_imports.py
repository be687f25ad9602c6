"""Start-up weight of a libvirt run (docs/RUN-OVERHEAD.md): the libvirt connector does not
pull in the files connector's pydantic models, and the files package still exports its names."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement` (a subprocess: this one has
    imported everything already)."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_libvirt_connector_does_not_import_the_files_connector() -> None:
    loaded = loaded_after("import vmkeep.connectors.libvirt")
    assert "vmkeep.connectors.files.qcow2" in loaded  # what it does use
    assert "vmkeep.connectors.files.connector" not in loaded
    assert "vmkeep.connectors.files.vmdir" not in loaded


def test_files_package_names_resolve() -> None:
    import vmkeep.connectors.files as files
    from vmkeep.connectors.files.connector import FilesConnector
    from vmkeep.connectors.files.raw import RawDiskReader

    assert files.FilesConnector is FilesConnector
    assert files.RawDiskReader is RawDiskReader
    assert all(getattr(files, name) is not None for name in files.__all__)
    try:
        files.NoSuchName  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchName" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_the_key_derivation_starts_before_the_data_path_is_imported() -> None:
    """repository/opening.py reads the config and starts Argon2id with config_read.py alone;
    repository.py and the chunk/pack modules are imported while the key is derived."""
    loaded = loaded_after("import vmkeep.repository.opening")
    assert "vmkeep.repository.config_read" in loaded
    assert "vmkeep.repository.repository" not in loaded
    assert "vmkeep.repository.packed_store" not in loaded
