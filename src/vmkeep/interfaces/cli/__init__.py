"""The `vmkeep` command line."""
