"""The engine: decision logic between the interfaces and the repository (e.g. `retention`)."""
