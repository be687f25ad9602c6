#!/usr/bin/env bash
# Installs what vmkeep needs on Debian 12 (as root) and makes the virtualenv .venv.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --test   plus the real tools the tests and benchmark use
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3-venv python3-pip e2fsprogs)
if [[ "${1:-}" == "--test" ]]; then
    packages+=(qemu-utils fdisk restic borgbackup git samba)
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

# Debian's own python3 (libvirt and libnbd bindings come from Debian for it: DESIGN.md).
python=/usr/bin/python3
[[ -x $python ]] || python=$(command -v python3)
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv --system-site-packages .venv
fi
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
stamp=".venv/.installed$extras"
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    log=.venv/pip-install.log
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >"$log" 2>&1 || true
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras" >>"$log" 2>&1; then
        cat "$log" >&2
        echo "error: pip install failed (log above, also in $log)" >&2
        exit 1
    fi
    touch "$stamp"
fi

if [[ "${1:-}" == "--test" ]]; then
    if ! command -v azurite-blob >/dev/null; then
        echo "installing Azurite (npm)" >&2
        npm install -g --silent azurite >/dev/null
    fi
    if [[ -x scripts/install-libvirt.sh ]]; then
        scripts/install-libvirt.sh
    fi
fi
