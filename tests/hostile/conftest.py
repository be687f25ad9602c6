"""Hostile-input fixtures: the e2e CLI helpers (the `cli`, `make_vm` and `repo_dir` fixtures)."""

from __future__ import annotations

from tests.e2e.conftest import cli, make_vm, repo_dir  # noqa: F401
