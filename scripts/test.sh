#!/usr/bin/env bash
# Installs everything and runs the checks CI runs: ruff, mypy, the test suite.
# The virtualenv is built anew from the lock files on every run (a .venv left from an earlier
# run or another lock is never trusted), so what passes here is what a fresh machine gets.
# Arguments go to pytest, e.g. scripts/test.sh tests/e2e -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test --fresh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
