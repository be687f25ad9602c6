"""Files-connector VM directories that tests build by hand (connectors/files/vmdir.py reads
them): the `vm.json` of a VM with one raw disk, its uuid drawn from the test's seeded random
generator so that a run is reproducible."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path


def write_raw_vm_json(vm: Path, name: str, rng: random.Random) -> None:
    """`vm/vm.json` for one raw disk `disk0` in `vm/disk0.img`."""
    doc = {
        "name": name,
        "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "vcpus": 1,
        "memory_mib": 64,
        "metadata": {},
        "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
    }
    (vm / "vm.json").write_text(json.dumps(doc))
