#!/usr/bin/env bash
# Installs what vmkeep needs on Debian 12 (as root) and makes the virtualenv .venv from the lock.
#   scripts/setup.sh            what the demo needs            (requirements/runtime.txt)
#   scripts/setup.sh --libvirt  plus the libvirt connector     (requirements/libvirt.txt)
#   scripts/setup.sh --test     plus the tools tests and benchmarks use (requirements/test.txt)
#   --fresh                     with any of them: remove .venv and build it anew
#
# Python packages come from the hashed lock files only (scripts/lock.sh updates them). The venv
# sees nothing of Debian's dist-packages except libnbd's binding, which PyPI does not have: its
# two files are linked into the venv alone (DESIGN.md, "Environment and licence").
set -euo pipefail
cd "$(dirname "$0")/.."

set_name=runtime
fresh=""
for arg in "$@"; do
    case $arg in
        --libvirt) set_name=libvirt ;;
        --test) set_name=test ;;
        --fresh) fresh=1 ;;
        *) echo "error: unknown option $arg (see the top of $0)" >&2; exit 2 ;;
    esac
done

packages=(python3-venv e2fsprogs)
if [[ $set_name != runtime ]]; then
    packages+=(libvirt-dev pkg-config gcc python3-dev)  # libvirt-python builds from its sdist
fi
if [[ $set_name == test ]]; then
    packages+=(qemu-utils fdisk restic borgbackup git samba virtnbdbackup)
    # file restore tests build real file systems (issue 16); mount needs FUSE 3
    packages+=(xfsprogs btrfs-progs ntfs-3g exfatprogs dosfstools mtools lvm2 fuse3)
    packages+=(thin-provisioning-tools)  # thin_restore: LVM thin pools of the thin tests
    command -v npm >/dev/null || packages+=(nodejs npm)  # Azurite, the Azure Blob emulator
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own python3: the libnbd binding linked below is built for it.
python=/usr/bin/python3
[[ -x $python ]] || { echo "error: $python not found (Debian's python3)" >&2; exit 1; }
[[ -n $fresh ]] && rm -rf .venv
if [[ -x .venv/bin/python ]] && grep -q "include-system-site-packages = true" .venv/pyvenv.cfg; then
    echo "replacing .venv: it was made with --system-site-packages" >&2
    rm -rf .venv
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv

lock=requirements/$set_name.txt
stamp=.venv/.installed-$set_name
want="$(sha256sum "$lock" requirements/build.txt pyproject.toml | sha256sum | cut -c1-64)"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "installing $lock into .venv" >&2
    log=.venv/pip-install.log
    pip=(.venv/bin/python -m pip install -q --disable-pip-version-check --no-input)
    # setuptools first (locked), so that nothing is built with an unpinned build backend; then
    # exactly the locked set, then vmkeep itself from this checkout.
    if ! { "${pip[@]}" --require-hashes --no-deps -r requirements/build.txt &&
        "${pip[@]}" --require-hashes --no-deps --no-build-isolation -r "$lock" &&
        "${pip[@]}" --no-deps --no-build-isolation -e . && .venv/bin/python -m pip check; } \
        >"$log" 2>&1; then
        cat "$log" >&2
        echo "error: installing $lock failed (log above, also in $log)" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
fi

if [[ $set_name != runtime ]]; then
    scripts/install-libvirt.sh  # libvirt + QEMU, started; Debian's libnbd binding linked into .venv
fi

if [[ $set_name == test ]]; then
    # Azurite at the version in requirements/node/package-lock.json, in the venv (not global).
    node=.venv/node
    if ! cmp -s requirements/node/package-lock.json "$node/package-lock.json" ||
        [[ ! -x $node/node_modules/.bin/azurite-blob ]]; then
        echo "installing Azurite (npm ci from requirements/node/package-lock.json)" >&2
        rm -rf "$node"
        mkdir -p "$node"
        cp requirements/node/package.json requirements/node/package-lock.json "$node/"
        (cd "$node" && npm ci --silent --no-audit --no-fund >/dev/null)
    fi
    ln -sfn ../node/node_modules/.bin/azurite-blob .venv/bin/azurite-blob
fi
