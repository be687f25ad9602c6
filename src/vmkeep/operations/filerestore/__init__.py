"""File restore in user space: partitions, LVM and file systems of a restore point's disks,
read straight from the repository (docs/FILE-RESTORE.md)."""
