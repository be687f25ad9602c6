"""`vmkeep vm`: VMs of the embedded files connector (imported by each command: every other
command starts without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .output import console, human_bytes, print_json, shown, stdout, table
from .repo_commands import JsonOpt

vm_app = typer.Typer(
    help="VMs of the files connector (a directory with vm.json and disks).", no_args_is_help=True
)


@vm_app.command("list")
def list_vms(
    root: Path = typer.Argument(Path("."), help="Directory holding VM directories."),
    json_out: bool = JsonOpt,
) -> None:
    """List the VMs found in a directory (one an in-place restore left incomplete is marked)."""
    from vmkeep.connectors.files import FilesConnector
    from vmkeep.connectors.files.vmdir import INCOMPLETE_KEY

    vms = FilesConnector(root).list_vms()
    rows: list[dict[str, Any]] = [
        {
            "name": v.name,
            "uuid": v.uuid,
            "vcpus": v.vcpus,
            "memory": v.memory,
            "disks": [{"name": d.name, "size": d.size, "format": d.format} for d in v.disks],
            "incomplete": v.metadata.get(INCOMPLETE_KEY),
        }
        for v in vms
    ]
    if json_out:
        print_json(rows)
        return
    listing = table("name", "uuid", "vcpus", "memory", "disks", "state")
    for r in rows:
        disks = ", ".join(
            f"{d['name']} ({human_bytes(d['size'])} {d['format']})" for d in r["disks"]
        )
        listing.add_row(
            shown(r["name"]),
            shown(r["uuid"]),
            str(r["vcpus"]),
            human_bytes(r["memory"]),
            shown(disks),
            "INCOMPLETE" if r["incomplete"] else "ok",
        )
    stdout.print(listing)
    for r in rows:
        if r["incomplete"]:
            console.print(f"{shown(r['name'])}: {shown(r['incomplete'])}")


@vm_app.command("create-demo")
def create_demo(
    parent: Path = typer.Argument(..., help="Where to create the VM directory."),
    name: str = typer.Option("demo", help="VM name (and directory name)."),
    size_mib: int = typer.Option(256, "--size", help="Disk size in MiB."),
    fmt: str = typer.Option("raw", "--format", help="raw or qcow2."),
) -> None:
    """Make a demo VM: a disk with a partition table and an ext4 file system with files."""
    from vmkeep.connectors.files.demo import create_demo_vm

    parent.mkdir(parents=True, exist_ok=True)
    path = create_demo_vm(parent, name, size_mib * 1024 * 1024, fmt)
    console.print(f"created demo VM {name} in {path}")


@vm_app.command("change-demo")
def change_demo(vm_dir: Path, seed: int = typer.Option(1, help="Which change to make.")) -> None:
    """Overwrite about 1% of a demo VM's data, so the next backup has a delta."""
    from vmkeep.connectors.files.demo import modify_demo_vm

    modify_demo_vm(vm_dir, seed)
    console.print(f"changed {vm_dir}")
