"""Smart-mode VM selection over real files-connector VM directories, and the libvirt tag
conventions parsed from domain XML strings (no libvirt needed)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from vmkeep.connectors.base import TAGS_KEY, VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.vmdir import from_vm_config, load_vm_json
from vmkeep.connectors.libvirt.tags import domain_tags
from vmkeep.engine.jobs.selection import (
    VmInfo,
    describe,
    point_selected,
    select_configs,
    select_vms,
)
from vmkeep.engine.jobs.spec import PointFilter, VmSelection
from vmkeep.errors import ConnectorError


def _vm(root: Path, name: str, tags: list[str] | None = None) -> str:
    """A VM directory without disks (selection needs none); returns its uuid."""
    vm_uuid = str(uuid.uuid4())
    doc: dict[str, object] = {"name": name, "uuid": vm_uuid, "vcpus": 1, "memory_mib": 64}
    if tags is not None:
        doc["tags"] = tags
    (root / name).mkdir()
    (root / name / "vm.json").write_text(json.dumps(doc))
    return vm_uuid


def _names(selection: VmSelection, root: Path) -> list[str]:
    return [vm.name for vm in select_configs(selection, FilesConnector(root).list_vms())]


def test_globs_tags_and_exclusions_over_files_vms(tmp_path: Path) -> None:
    _vm(tmp_path, "web01", ["prod", "frontend"])
    _vm(tmp_path, "web02", ["staging"])
    _vm(tmp_path, "web-test", ["prod"])
    _vm(tmp_path, "db01", ["prod", "sql"])
    _vm(tmp_path, "mail", [])
    selection = VmSelection.model_validate(
        {
            "include": [{"name": "web*"}, {"tags": ["prod"]}],
            "exclude": [{"name": "web-test"}],
        }
    )
    assert _names(selection, tmp_path) == ["db01", "web01", "web02"]
    # All tags of a rule must be present; rules are alternatives.
    both = VmSelection.model_validate({"include": [{"tags": ["prod", "sql"]}]})
    assert _names(both, tmp_path) == ["db01"]
    # A glob's character class and `?`; matching is case-sensitive.
    glob = VmSelection.model_validate({"include": [{"name": "web0[2-9]"}, {"name": "MAI?"}]})
    assert _names(glob, tmp_path) == ["web02"]
    # Exclusion by tag wins over inclusion by name.
    no_prod = VmSelection.model_validate(
        {"include": [{"name": "*"}], "exclude": [{"tags": ["prod"]}]}
    )
    assert _names(no_prod, tmp_path) == ["mail", "web02"]


def test_by_uuid_in_any_case(tmp_path: Path) -> None:
    target = _vm(tmp_path, "a")
    _vm(tmp_path, "b")
    selection = VmSelection.model_validate({"include": [{"uuid": target.upper()}]})
    assert _names(selection, tmp_path) == ["a"]


def test_a_new_vm_is_picked_up_without_editing_the_job(tmp_path: Path) -> None:
    selection = VmSelection.model_validate({"include": [{"tags": ["backup"]}]})
    _vm(tmp_path, "old", ["backup"])
    assert _names(selection, tmp_path) == ["old"]
    _vm(tmp_path, "new", ["backup"])
    _vm(tmp_path, "other", ["scratch"])
    assert _names(selection, tmp_path) == ["new", "old"]


def test_power_states() -> None:
    vms = [
        VmInfo("on", "1", power="running"),
        VmInfo("off", "2", power="stopped"),
        VmInfo("what", "3", power="unknown"),
    ]
    for power, expected in (
        ("running", ["on"]),
        ("stopped", ["off"]),
        ("any", ["on", "off", "what"]),
    ):
        selection = VmSelection.model_validate({"include": [{"name": "*"}], "power": power})
        assert [v.name for v in select_vms(selection, vms)] == expected


@pytest.mark.parametrize(
    ("state", "power"),
    [
        ("running", "running"),
        ("paused", "running"),
        ("shut off", "stopped"),
        ("crashed", "stopped"),
        (None, "unknown"),
    ],
)
def test_libvirt_state_is_read_from_the_connector_metadata(state: str | None, power: str) -> None:
    metadata = {"libvirt.state": state} if state else {}
    config = VmConfig("d", "ABC", 1, 1, [], {**metadata, TAGS_KEY: ["prod", 3]})
    info = describe(config)
    assert info.power == power
    assert info.tags == frozenset({"prod"}) and info.uuid == "abc"


def test_files_vms_are_stopped_and_carry_their_tags(tmp_path: Path) -> None:
    _vm(tmp_path, "web", ["prod", "eu"])
    (vm,) = FilesConnector(tmp_path).list_vms()
    assert vm.metadata[TAGS_KEY] == ["prod", "eu"]
    assert describe(vm) == VmInfo("web", vm.uuid, frozenset({"prod", "eu"}), "stopped")


def test_tags_survive_a_restore_and_are_omitted_when_empty(tmp_path: Path) -> None:
    _vm(tmp_path, "web", ["prod"])
    _vm(tmp_path, "plain")
    web, plain = sorted(FilesConnector(tmp_path).list_vms(), key=lambda v: v.name != "web")
    doc = from_vm_config(web, [])
    assert doc.tags == ["prod"] and TAGS_KEY not in doc.metadata
    assert from_vm_config(plain, []).tags == []
    assert TAGS_KEY not in plain.metadata


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["two words"], "'two words' is not a tag"),
        (["a", "a"], "tags must be unique"),
        ([""], "is not a tag"),
    ],
)
def test_bad_tags_in_vm_json_are_one_line(tmp_path: Path, tags: list[str], message: str) -> None:
    _vm(tmp_path, "web", tags)
    with pytest.raises(ConnectorError, match=message) as caught:
        load_vm_json(tmp_path / "web")
    assert "\n" not in str(caught.value) and "vm.json" in str(caught.value)


def test_mirror_point_filter() -> None:
    flt = PointFilter.model_validate({"include": [{"tags": ["prod"]}], "exclude": [{"name": "x*"}]})
    assert point_selected(flt, VmInfo("web", "1", frozenset({"prod"})))
    assert not point_selected(flt, VmInfo("xweb", "1", frozenset({"prod"})))
    assert not point_selected(flt, VmInfo("web", "1"))
    assert point_selected(None, VmInfo("anything", "1"))


DOMAIN = """\
<domain type='kvm'>
  <name>web01</name>
  <title>Web front end #prod #web #prod</title>
  <description>Serves www.
tags: frontend, eu-west  nginx
Tags:backup-daily
not tags: ignored</description>
  <metadata>
    <vmkeep:tags xmlns:vmkeep="urn:vmkeep:tags:1">
      <vmkeep:tag>pci</vmkeep:tag>
      <tag> tier1 </tag>
      <tag>has space</tag>
    </vmkeep:tags>
    <other:tags xmlns:other="http://example.com/other"><tag>not-ours</tag></other:tags>
  </metadata>
</domain>
"""


def test_libvirt_tags_from_metadata_title_and_description() -> None:
    assert domain_tags(DOMAIN) == [
        "pci", "tier1", "prod", "web", "frontend", "eu-west", "nginx", "backup-daily",
    ]  # fmt: skip


def test_libvirt_domain_without_tags() -> None:
    assert domain_tags("<domain><name>x</name><title>plain title</title></domain>") == []
    assert domain_tags("<domain><name>x") == []
