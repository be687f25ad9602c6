"""Hostile-input tests reuse the end-to-end fixtures: the real `vmkeep`, demo VMs, repositories."""

from tests.e2e.conftest import Cli, cli, make_vm, repo_dir  # noqa: F401
