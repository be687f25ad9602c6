"""Interfaces: the CLI (and later the REST server), thin layers over the same engine."""
