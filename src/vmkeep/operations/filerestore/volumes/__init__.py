"""Partition tables and volume managers (MBR, GPT, LVM2) read in user space."""
