"""Remotes: where repositories live. A remote stores opaque named objects; it knows no VMs."""
