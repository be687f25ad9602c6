"""Smart-mode VM selection: which VMs a job backs up, decided afresh at every run from what the
connector lists now, so a new VM matching the rules is picked up without editing the job."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from vmkeep.connectors.base import TAGS_KEY, VmConfig
from vmkeep.engine.jobs.spec import PointFilter, VmMatch, VmSelection

Power = Literal["running", "stopped", "unknown"]

# libvirt's state words (connectors/libvirt/domxml.py) by what a selection sees: a domain with
# a QEMU process (even paused) is running; shut off or crashed is stopped.
_LIBVIRT_STATE_KEY = "libvirt.state"
_LIBVIRT_RUNNING = {"running", "idle", "paused", "in shutdown", "pmsuspended"}
_LIBVIRT_STOPPED = {"shut off", "crashed"}
_FILES_LOCATION_KEY = "vmkeep.files.location"


@dataclass(frozen=True)
class VmInfo:
    """What selection looks at: name, uuid (lower case), tags and power state."""

    name: str
    uuid: str
    tags: frozenset[str] = frozenset()
    power: Power = "unknown"


def describe(vm: VmConfig) -> VmInfo:
    """The VmInfo of a connector's VmConfig. A files VM is never running (images at rest);
    a libvirt domain's state is read from the connector's metadata."""
    raw = vm.metadata.get(TAGS_KEY)
    tags = frozenset(t for t in raw if isinstance(t, str)) if isinstance(raw, list) else frozenset()
    state = vm.metadata.get(_LIBVIRT_STATE_KEY)
    power: Power = "unknown"
    if state in _LIBVIRT_RUNNING:
        power = "running"
    elif state in _LIBVIRT_STOPPED or _FILES_LOCATION_KEY in vm.metadata:
        power = "stopped"
    return VmInfo(vm.name, vm.uuid.lower(), tags, power)


def matches(rule: VmMatch, vm: VmInfo) -> bool:
    """Every field of the rule matches: name by glob (case-sensitive; `*`, `?`, `[...]`),
    uuid exactly (any case), tags all present on the VM."""
    if rule.name is not None and not fnmatchcase(vm.name, rule.name):
        return False
    if rule.uuid is not None and rule.uuid.lower() != vm.uuid:
        return False
    return rule.tags is None or set(rule.tags) <= vm.tags


def _chosen(include: Iterable[VmMatch], exclude: Iterable[VmMatch], vm: VmInfo) -> bool:
    return any(matches(r, vm) for r in include) and not any(matches(r, vm) for r in exclude)


def select_vms(selection: VmSelection, vms: Iterable[VmInfo]) -> list[VmInfo]:
    """The VMs a run handles, in the order given: included by a rule, excluded by none, in the
    asked power state (a VM whose state is unknown only matches `any`)."""
    return [
        vm
        for vm in vms
        if _chosen(selection.include, selection.exclude, vm)
        and (selection.power == "any" or selection.power == vm.power)
    ]


def select_configs(selection: VmSelection, configs: Iterable[VmConfig]) -> list[VmConfig]:
    """select_vms over a connector's listing, returning the VmConfigs themselves."""
    return [c for c in configs if select_vms(selection, [describe(c)])]


def point_selected(selection: PointFilter | None, vm: VmInfo) -> bool:
    """Whether a mirror copies the points of `vm` (None: every VM's points)."""
    return selection is None or _chosen(selection.include, selection.exclude, vm)
