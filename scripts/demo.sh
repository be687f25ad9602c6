#!/usr/bin/env bash
# The main job on the embedded default (files connector, local remote), start to finish:
# make a demo VM, back it up, change it, back it up again (delta), restore the first
# restore point as a new VM, read a file out of it, get a file straight from the repository,
# verify the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

work=${VMKEEP_DEMO_DIR:-$PWD/demo-work}
rm -rf "$work"
mkdir -p "$work"
export VMKEEP_CONFIG_DIR="$work/config"
export VMKEEP_DATA_DIR="$work/state"  # named remotes live in the state database: the demo keeps its own
export VMKEEP_CACHE_DIR="$work/cache"
export VMKEEP_PASSPHRASE="${VMKEEP_PASSPHRASE:-demo passphrase, change me}"
vmkeep=.venv/bin/vmkeep
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a demo VM: MBR + ext4 with files, sparse raw disk"
$vmkeep vm create-demo "$work/vms" --name web01
$vmkeep vm list "$work/vms"

step "an encrypted repository on a local remote"
$vmkeep remote add local "$work/repo"

step "full backup"
$vmkeep backup "$work/vms/web01" --mode full
first=$($vmkeep list --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["restore_points"][-1]["restore_point"])')

step "change 1% of the disk, then a delta backup"
$vmkeep vm change-demo "$work/vms/web01" --seed 1
$vmkeep backup "$work/vms/web01" --mode delta
$vmkeep list

step "restore the first restore point as a new VM"
$vmkeep restore "$first" --to "$work/restored" --name web01-restored
disk=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["file"])' "$work/restored/web01-restored/vm.json")

step "read a file from the restored disk (ext4 partition at 1 MiB)"
debugfs -R "cat /home/demo/notes.txt" "$work/restored/web01-restored/$disk?offset=1048576" 2>/dev/null

latest=$($vmkeep list --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["restore_points"][-1]["restore_point"])')
step "file restore straight from the repository: no restore, no mount, no root needed"
$vmkeep files ls "$latest"
$vmkeep files ls "$latest" disk0:1/home/demo
$vmkeep files get "$latest" disk0:1 /home/demo/notes.txt --to "$work/files"
cat "$work/files/notes.txt"

step "export the latest restore point's disk as qcow2, verify the repository"
$vmkeep export "$latest" disk0 "$work/web01-latest.qcow2" --format qcow2
$vmkeep verify
printf '\ndemo done: everything is in %s\n' "$work"
