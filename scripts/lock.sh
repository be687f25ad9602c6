#!/usr/bin/env bash
# Re-resolves the locked Python dependencies from pyproject.toml's ranges: one command,
#   scripts/lock.sh              newest versions the ranges allow
#   scripts/lock.sh --keep       keep today's pins where they still satisfy the ranges
# then run scripts/test.sh and commit requirements/*.txt with the result.
#
# Three hashed lock files, one per install set (and requirements/build.txt: setuptools, installed
# first so nothing is built with an unpinned backend), all resolved to the same versions (the smaller
# ones are constrained by the test set, so the demo runs exactly what the tests passed with):
#   requirements/runtime.txt   vmkeep                (scripts/setup.sh)
#   requirements/libvirt.txt   vmkeep[libvirt]       (scripts/setup.sh --libvirt)
#   requirements/test.txt      vmkeep[libvirt,test]  (scripts/setup.sh --test)
# uv resolves; installs use plain pip --require-hashes, so users need no uv.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
/usr/bin/python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
uv=$tools/venv/bin/uv

compile() {  # compile OUT [uv pip compile options...]
    local out=$1
    shift
    local keep=()
    [[ ${KEEP:-} && -f $out ]] || keep+=(--upgrade)
    "$uv" pip compile -q pyproject.toml requirements/build.in --python-version 3.11 \
        --universal --generate-hashes --no-header \
        "${keep[@]}" "$@" -o "$out"
}
[[ "${1:-}" == "--keep" ]] && KEEP=1
compile requirements/test.txt --extra libvirt --extra test
compile requirements/libvirt.txt --extra libvirt -c requirements/test.txt
compile requirements/runtime.txt -c requirements/test.txt
"$uv" pip compile -q requirements/build.in --python-version 3.11 --universal --generate-hashes \
    --no-header -c requirements/test.txt -o requirements/build.txt
echo "locked: $(grep -c '==' requirements/test.txt) packages in requirements/test.txt" >&2
