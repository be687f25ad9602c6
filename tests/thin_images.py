"""A disk with an LVM thin pool and one thin LV holding an ext4 image, made without
device-mapper: lvcreate refuses thin pools without dm ("Can't create thin-pool without using
device-mapper kernel driver"), so the VG metadata is written with vgcfgrestore --force, the
pool metadata with thin_restore (thin-provisioning-tools) from generated XML, and the data
blocks where dm-thin would have put them (virtual blocks mapped out of order, holes left)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from tests.filerestore_images import MiB, loop_attach, loop_detach, lvm, mkfs_ext, run

EXTENT = 4 * MiB
PE_START = 1 * MiB
CHUNK = 64 * 1024  # the pool's chunk size (data_block_size = 128 sectors)
DATA_EXTENTS, META_EXTENTS, THIN_EXTENTS = 8, 1, 6
DEVICE_ID = 1


@dataclass
class ThinDisk:
    disk: Path
    fs_image: Path  # the thin LV's virtual content
    mapping: dict[int, int]  # virtual block -> data block
    meta_offset: int  # the metadata LV's byte offset on the disk
    data_offset: int


LVS = """	logical_volumes {{
		pool {{
			id = "poolAA-0000-0000-0000-0000-0000-000001"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1
			segment1 {{
				start_extent = 0
				extent_count = {data}
				type = "thin-pool"
				metadata = "pool_tmeta"
				pool = "pool_tdata"
				transaction_id = 1
				chunk_size = {chunk}
				discards = "passdown"
				zero_new_blocks = 0
			}}
		}}
		thin {{
			id = "thinAA-0000-0000-0000-0000-0000-000002"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1
			segment1 {{
				start_extent = 0
				extent_count = {thin}
				type = "thin"
				thin_pool = "pool"
				transaction_id = 0
				device_id = {dev}
			}}
		}}
		pool_tmeta {{
			id = "metaAA-0000-0000-0000-0000-0000-000003"
			status = ["READ", "WRITE"]
			flags = []
			segment_count = 1
			segment1 {{
				start_extent = 0
				extent_count = {meta}
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", {data}]
			}}
		}}
		pool_tdata {{
			id = "dataAA-0000-0000-0000-0000-0000-000004"
			status = ["READ", "WRITE"]
			flags = []
			segment_count = 1
			segment1 {{
				start_extent = 0
				extent_count = {data}
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", 0]
			}}
		}}
	}}
}}
"""


def _lvm_layout(disk: Path, work: Path) -> None:
    """PV, VG and the pool/thin LVs by vgcfgrestore; checks LVM's own reading of them."""
    loop = loop_attach(disk)
    try:
        lvm("pvcreate", "-q", loop)
        lvm("vgcreate", "-q", "vgthin", loop)
        backup = work / "vg.txt"
        lvm("vgcfgbackup", "-f", str(backup), "vgthin")
        text = backup.read_text()
        text = text[: text.rindex("}")]  # the VG block, still open: no LVs yet
        text += LVS.format(
            data=DATA_EXTENTS, meta=META_EXTENTS, thin=THIN_EXTENTS, chunk=CHUNK // 512,
            dev=DEVICE_ID,
        )  # fmt: skip
        backup.write_text(text)
        lvm("vgcfgrestore", "--force", "-f", str(backup), "vgthin")
        out = lvm("lvs", "-a", "--noheadings", "-o", "lv_name,seg_pe_ranges,thin_id", "vgthin")
    finally:
        loop_detach(loop)
    rows = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()}
    assert re.fullmatch(r".*:0-7", rows["[pool_tdata]"][0]), rows
    assert re.fullmatch(r".*:8-8", rows["[pool_tmeta]"][0]), rows
    assert rows["thin"] == [str(DEVICE_ID)], rows


def thin_xml(mapping: dict[int, int], nr_data_blocks: int) -> str:
    lines = [
        f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
        f'data_block_size="{CHUNK // 512}" nr_data_blocks="{nr_data_blocks}">',
        f'  <device dev_id="{DEVICE_ID}" mapped_blocks="{len(mapping)}" transaction="0" '
        f'creation_time="0" snap_time="0">',
    ]
    for virtual in sorted(mapping):
        lines.append(
            f'    <single_mapping origin_block="{virtual}" data_block="{mapping[virtual]}" '
            f'time="0"/>'
        )
    lines += ["  </device>", "</superblock>", ""]
    return "\n".join(lines)


def write_metadata(disk: Path, work: Path, xml: str, offset: int) -> None:
    """thin_restore into a metadata-LV-sized file, copied to the LV's place on the disk."""
    (work / "thin.xml").write_text(xml)
    meta = work / "tmeta.bin"
    with open(meta, "wb") as f:
        f.truncate(META_EXTENTS * EXTENT)
    run("thin_restore", "-i", str(work / "thin.xml"), "-o", str(meta))
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(meta.read_bytes())


def build(work: Path, tree: Path) -> ThinDisk:
    disk = work / "thin.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    _lvm_layout(disk, work)
    image = mkfs_ext(work / "thin.fs", THIN_EXTENTS * EXTENT, tree)
    content = image.read_bytes()
    blocks = len(content) // CHUNK
    used = [v for v in range(blocks) if content[v * CHUNK : (v + 1) * CHUNK].count(0) != CHUNK]
    slots = random.Random(16).sample(range(DATA_EXTENTS * EXTENT // CHUNK), len(used))
    mapping = dict(zip(used, slots, strict=True))  # out of order; zero blocks are holes
    data_offset, meta_offset = PE_START, PE_START + DATA_EXTENTS * EXTENT
    with open(disk, "r+b") as f:
        f.seek(data_offset)
        f.write(b"\xa5" * DATA_EXTENTS * EXTENT)  # unmapped blocks must not read this
        for virtual, slot in mapping.items():
            f.seek(data_offset + slot * CHUNK)
            f.write(content[virtual * CHUNK : (virtual + 1) * CHUNK])
    write_metadata(disk, work, thin_xml(mapping, DATA_EXTENTS * EXTENT // CHUNK), meta_offset)
    return ThinDisk(disk, image, mapping, meta_offset, data_offset)
