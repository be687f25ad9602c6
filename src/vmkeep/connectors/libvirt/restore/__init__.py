"""Restoring into libvirt: a new domain, in place over an existing one, volumes of a remote
host."""
