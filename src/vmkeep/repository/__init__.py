"""The repository: chunks, manifests, keys on a remote. The format is docs/FORMAT.md."""
