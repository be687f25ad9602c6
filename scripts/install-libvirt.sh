#!/usr/bin/env bash
# Installs and starts libvirt + QEMU for the libvirt connector's tests (Debian 12, as root).
# Idempotent: installs only the missing packages, starts virtlogd/libvirtd only when they are
# not running (there is no systemd on the test machines), then waits for libvirtd to answer.
#
#   scripts/install-libvirt.sh            install + start + link libnbd's binding into the venv
#   VMKEEP_VENV=/path/to/venv scripts/install-libvirt.sh
#
# Exit status: 0 when `virsh -c qemu:///system list` answers and the venv (if made) imports\n# libvirt + nbd. scripts/setup.sh --libvirt / --test run it after making the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'install-libvirt: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# openssh-server + openssh-client: the restore tests reach libvirtd over qemu+ssh:// through an
# sshd they start on a loopback port (the package's own sshd is not started: no systemd).
packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libnbd-bin
          python3-libnbd openssh-server openssh-client)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing Debian packages: ${missing[*]} (run as root)"
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No --no-install-recommends: libvirt-daemon-system's recommends are what a qemu:///system
    # host normally has (dnsmasq-base, iptables, ...); harmless and closer to a real host.
    # Package postinst scripts try to start services through invoke-rc.d and fail softly
    # without systemd; that is fine, we start the daemons ourselves below.
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[[ $(id -u) -eq 0 ]] || die "libvirtd/virtlogd must be started as root"

# The guest-agent tests' tiny real guest (tests/libvirt/real_guest.py) is built from these
# .debs, extracted with dpkg-deb, never installed here: Debian's cloud kernel, busybox-static
# and qemu-guest-agent. e2fsprogs (mkfs.ext4, e2fsck, debugfs) makes and checks its disk.
dpkg-query -W -f='${Status}' e2fsprogs 2>/dev/null | grep -q "install ok installed" \
    || apt-get install -y -qq e2fsprogs >/dev/null
debs=/var/cache/vmkeep-tests/debs
mkdir -p "$debs"
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
guest_debs=()
if ! ls "$debs"/linux-image-*-amd64_*.deb >/dev/null 2>&1; then
    k=$(kernel_pkg)
    [[ -n $k ]] || { apt-get update -qq; k=$(kernel_pkg); }
    [[ -n $k ]] || die "apt knows no kernel behind linux-image-cloud-amd64"
    guest_debs+=("$k")
fi
for p in busybox-static qemu-guest-agent; do
    ls "$debs/${p}"_*.deb >/dev/null 2>&1 || guest_debs+=("$p")
done
if ((${#guest_debs[@]})); then
    log "downloading for the test guest: ${guest_debs[*]}"
    (cd "$debs" && apt-get download -qq "${guest_debs[@]}" 2>/dev/null) \
        || { apt-get update -qq && (cd "$debs" && apt-get download -qq "${guest_debs[@]}"); }
fi

# Runtime directories that systemd would otherwise create.
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/lib/libvirt/images /var/log/libvirt/qemu

# Not zombies: a just-killed daemon stays <defunct> until init reaps it.
running() { pgrep -x -r R,S,D "$1" >/dev/null 2>&1; }

if ! running virtlogd; then
    log "starting virtlogd -d"
    virtlogd -d
fi
if ! running libvirtd; then
    # A stale pid file from a killed daemon makes libvirtd refuse to start.
    rm -f /run/libvirtd.pid
    log "starting libvirtd -d"
    libvirtd -d
fi

ok=""
for _ in $(seq 1 150); do     # up to 30 s
    if virsh -c qemu:///system list >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
done
[[ -n $ok ]] || { virsh -c qemu:///system list || true; die "libvirtd does not answer on qemu:///system"; }
log "libvirtd answers: $(virsh -c qemu:///system version --daemon 2>/dev/null | tr '\n' ' ' | sed 's/  */ /g')"

# libnbd's binding alone, from Debian's python3-libnbd (nbd.py and libnbdmod*.so), linked into
# the venv: PyPI has none. libvirt-python comes from the lock (requirements/libvirt.txt).
venv=${VMKEEP_VENV:-.venv}
if [[ -x $venv/bin/python ]]; then
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-*.so; do
        [[ -e $f ]] || die "$f missing (Debian package python3-libnbd)"
        ln -sfn "$f" "$site/$(basename "$f")"
    done
    "$venv/bin/python" -c "import libvirt, nbd" 2>/dev/null \
        || die "$venv/bin/python cannot import libvirt and nbd: run scripts/setup.sh --libvirt"
    log "$venv/bin/python imports libvirt (locked) and nbd (Debian's, linked)"
else
    log "no venv at $venv yet: scripts/setup.sh --libvirt makes it"
fi
