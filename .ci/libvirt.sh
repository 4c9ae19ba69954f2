#!/usr/bin/env bash
# libvirt backend CI helper: `.ci/libvirt.sh start` installs what the backend's tests need
# (the libvirt group of .ci/programs, and pytest-vmenv-libvirt into `python3`) and
# starts virtlogd + libvirtd (no systemd here) under a tiny subreaper; `.ci/libvirt.sh stop`
# stops the daemons this script started (by their recorded pids) and nothing else.
# Idempotent: a libvirtd that already answers is reused (and then left alone by `stop`).
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${VMENV_STATE_DIR:-/var/lib/pytest-vmenv}"
RUN="$STATE/libvirt/ci"
URI="qemu:///system"

install() {
    # the packages of .ci/programs' libvirt group (QEMU, libvirtd, dnsmasq, mkfs.ext4, the
    # headers libvirt-python builds against), then the preflight of that group
    bash .ci/deps install libvirt
    # The tiny image is built with `apt-get download`: the package lists must be there.
    if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -qq
    fi
    python3 -m pip install -q -e backends/libvirt
}

fix_kvm() {
    # Debian's udev default; with 0600 libvirt re-probes QEMU on every lookup (define ~68 s).
    if [ -e /dev/kvm ]; then
        getent group kvm >/dev/null || groupadd -r kvm
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    fi
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

running() { virsh -c "$URI" version >/dev/null 2>&1; }

start() {
    install
    fix_kvm
    mkdir -p "$RUN"
    if running; then
        echo "libvirt.sh: libvirtd already answers on $URI; reusing it"
        return 0
    fi
    # The subreaper: PR_SET_CHILD_SUBREAPER, starts the daemons (they daemonize and are
    # re-parented to it, and so are the QEMUs libvirtd forks), reaps every child at once
    # (PID 1 here reaps ~1 s late and libvirtd waits for its dead QEMUs), exits when none is left.
    setsid python3 - "$RUN" >"$RUN/reaper.log" 2>&1 </dev/null <<'PY' &
import ctypes, os, subprocess, sys, time
run = sys.argv[1]
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
with open(os.path.join(run, "reaper.pid"), "w") as f:
    f.write(str(os.getpid()))
for argv in (["virtlogd", "-d"], ["libvirtd", "-d"]):
    subprocess.run(argv, check=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
PY
    for _ in $(seq 1 300); do
        running && break
        sleep 0.1
    done
    running || { echo "libvirt.sh: libvirtd did not come up"; cat "$RUN/reaper.log"; exit 1; }
    cp /run/libvirtd.pid "$RUN/libvirtd.pid"
    cp /run/virtlogd.pid "$RUN/virtlogd.pid"
    echo "libvirt.sh: libvirtd $(cat "$RUN/libvirtd.pid") and virtlogd $(cat "$RUN/virtlogd.pid") started"
}

stop() {
    local name pid
    for name in libvirtd virtlogd; do
        pid="$(cat "$RUN/$name.pid" 2>/dev/null || true)"
        if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            kill -TERM "$pid"
            for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
            alive "$pid" && kill -KILL "$pid"
        fi
        rm -f "$RUN/$name.pid"
    done
    pid="$(cat "$RUN/reaper.pid" 2>/dev/null || true)"
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    rm -f "$RUN/reaper.pid"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    install) install ;;
    *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
