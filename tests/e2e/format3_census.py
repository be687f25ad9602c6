"""What a format 3 remote really holds, read in this process: every pack listed is read
whole, its trailer checked against its name and every blob it lists decoded (a partial pack
left by a cut upload would fail here), and the packs the index names are compared with the
packs listed (after a complete gc, none may be missing and none left over)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmkeep.remotes.location import open_remote
from vmkeep.repository.packs import pack_id_of_name, read_trailer
from vmkeep.repository.repository import Repository

from .conftest import Cli


@dataclass
class Census:
    packs: int  # complete pack objects listed
    blobs: int  # blobs their trailers list, each decoded
    unindexed: int  # packs listed that no index entry names
    absent: int  # packs index entries name that are not listed
    index_objects: int
    other: list[str]  # anything but packs, index, manifests, config, gc-epoch, locks


def census(cli: Cli, url: str) -> Census:
    saved = dict(os.environ)
    os.environ.update(
        {k: v for k, v in cli.env.items() if k.startswith(("AWS_", "AZURE_", "VMKEEP_"))}
    )
    try:
        remote = open_remote(url)
        repo = Repository.open(remote, lambda: cli.env["VMKEEP_PASSPHRASE"].encode())
        store = repo.packed
        assert store is not None
        listed = {}
        for obj in remote.list("packs/"):
            pack_id = pack_id_of_name(obj.name)
            assert pack_id is not None, f"a temporary or foreign object in packs/: {obj.name}"
            listed[pack_id] = obj.name
        blobs = 0
        for pack_id, name in listed.items():
            data = remote.get(name)
            for entry in read_trailer(store.sealer, pack_id, data):
                raw = data[entry.offset : entry.offset + entry.length]
                store.codec.decode(entry.kind, entry.blob_id, raw)  # raises on a bad blob
                blobs += 1
        indexed = {e.pack for e in store.reload().index.entries()}
        known = ("packs/", "index/", "manifests/", "config", "gc-epoch", "locks/")
        return Census(
            packs=len(listed),
            blobs=blobs,
            unindexed=len(set(listed) - indexed),
            absent=len(indexed - set(listed)),
            index_objects=len(list(remote.list("index/"))),
            other=sorted(o.name for o in remote.list("") if not o.name.startswith(known)),
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
