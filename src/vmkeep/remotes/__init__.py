"""Remotes: where repositories live. A remote stores opaque named objects and knows nothing of VMs."""
