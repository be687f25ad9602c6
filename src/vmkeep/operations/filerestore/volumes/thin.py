"""LVM thin volumes read in user space: the pool's metadata LV holds dm-thin's two-level
btree (thin device id -> virtual block -> data block), the pool's data LV holds the blocks.

vmkeep parses the superblock and btree nodes with dissect.volume's structure definitions but
walks the tree itself, because dissect's reader follows a node that points to itself (or to
an ancestor) forever, returns zeros for a whole read once it meets one unmapped block (losing
the mapped blocks before it and after it), and returns short reads for a mapping past the end
of the data LV. Here every walk is bounded by a depth limit, every node and data block must
lie inside its LV, and unmapped blocks read as zeros one block at a time (format reference:
the kernel's Documentation/admin-guide/device-mapper/thin-provisioning.rst and
drivers/md/persistent-data/dm-btree.c)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from dissect.volume.dm.btree import Node
from dissect.volume.dm.c_dm import c_dm

from vmkeep.errors import ImageError

from .source import Source

SECTOR = 512
MAX_DEPTH = 8  # 4 KiB nodes of 126+ entries: 8 levels address far more than 2^40 blocks
NODE_CACHE = 64
INTERNAL, LEAF = 1, 2


class ThinVolume:
    """One thin device of a pool, as a Source (unmapped blocks read as zeros)."""

    def __init__(self, metadata: Source, data: Source, device_id: int, size: int, name: str):
        self.size, self.name = size, name
        self._metadata, self._data = metadata, data
        self._lock = threading.Lock()
        self._nodes: OrderedDict[int, Node] = OrderedDict()
        head = metadata.pread(0, len(c_dm.thin_disk_superblock))
        if len(head) < len(c_dm.thin_disk_superblock):
            raise ImageError(f"{name}: thin pool metadata is truncated")
        sb = c_dm.thin_disk_superblock(head)
        if sb.magic != c_dm.THIN_SUPERBLOCK_MAGIC:
            raise ImageError(f"{name}: thin pool metadata has no superblock")
        self._node_size = int(sb.metadata_block_size) * SECTOR
        self._block = int(sb.data_block_size) * SECTOR
        if not 512 <= self._node_size <= 1 << 20 or self._block <= 0:
            raise ImageError(f"{name}: invalid thin pool block sizes")
        root = self._lookup(int(sb.data_mapping_root), device_id)
        if root is None:
            raise ImageError(f"{name}: thin device {device_id} is not in its pool")
        self._root = int.from_bytes(root, "little")

    def pread(self, offset: int, length: int) -> bytes:
        length = max(min(length, self.size - offset), 0)
        out = bytearray()
        while len(out) < length:
            pos = offset + len(out)
            block, within = divmod(pos, self._block)
            take = min(length - len(out), self._block - within)
            out += self._read_block(block, within, take)
        return bytes(out)

    def _read_block(self, block: int, within: int, take: int) -> bytes:
        with self._lock:
            value = self._lookup(self._root, block)
        if value is None:
            return bytes(take)
        data_block = int.from_bytes(value, "little") >> 24  # the low 24 bits are a time
        start = data_block * self._block
        if start + self._block > self._data.size:
            raise ImageError(f"{self.name}: a thin mapping points past the end of its pool")
        got = self._data.pread(start + within, take)
        if len(got) != take:
            raise ImageError(f"{self.name}: short read from the thin pool")
        return got

    def _lookup(self, root: int, key: int) -> bytes | None:
        """The value for key in the btree at root (None: absent); at most MAX_DEPTH nodes."""
        block = root
        for _ in range(MAX_DEPTH):
            node = self._node(block)
            index = _floor(node, key)
            if index < 0:
                return None
            flags = int(node.header.flags)
            if flags & INTERNAL:
                block = int.from_bytes(node.value(index), "little")
                continue
            if flags & LEAF and node.key(index) == key:
                return bytes(node.value(index))
            return None
        raise ImageError(f"{self.name}: thin pool btree is deeper than {MAX_DEPTH} (a loop?)")

    def _node(self, block: int) -> Node:
        node = self._nodes.get(block)
        if node is not None:
            self._nodes.move_to_end(block)
            return node
        start = block * self._node_size
        if start + self._node_size > self._metadata.size:
            raise ImageError(f"{self.name}: thin pool btree points past its metadata LV")
        node = Node(self._metadata.pread(start, self._node_size))
        header = len(c_dm.node_header)
        room = header + int(node.max_entries) * (8 + int(node.value_size))
        if node.num_entries > node.max_entries or room > self._node_size or node.value_size < 8:
            raise ImageError(f"{self.name}: corrupt thin pool btree node {block}")
        self._nodes[block] = node
        if len(self._nodes) > NODE_CACHE:
            self._nodes.popitem(last=False)
        return node


def _floor(node: Node, key: int) -> int:
    """Index of the last key <= key (-1: none), keys being sorted."""
    low, high = -1, int(node.num_entries)
    while high - low > 1:
        mid = (low + high) // 2
        if node.key(mid) <= key:
            low = mid
        else:
            high = mid
    return low
