#!/usr/bin/env bash
# libvirt backend CI helper: `.ci/libvirt.sh start` installs what the backend's tests need
# (the libvirt group of .ci/programs, and pytest-vmenv-libvirt into `python3`), starts
# virtlogd + libvirtd (no systemd here) under a tiny subreaper unless a libvirtd already
# answers, and registers this checkout as one of the daemon's users; `.ci/libvirt.sh stop`
# unregisters it and stops the daemons only when this script started them and no other live
# run is registered.
#
# libvirtd is one per machine (qemu:///system), whichever checkout, state dir or CI run
# started it, so its bookkeeping is machine-wide, in $VMENV_CI_LIBVIRT_RUN (default
# /run/pytest-vmenv-ci/libvirtd), under a lock:
#   daemon          the daemons this script started: "NAME PID START COMM" lines (START: the
#                   process's start time, so a recycled pid is never taken for them) and the
#                   checkout that started them
#   users/<checkout>  "PID START" of the process the run belongs to ($VMENV_CI_USER_PID,
#                   default the caller of this script: test-all, or your shell); an entry whose
#                   process has exited is dropped
# So a run never stops a daemon another live run uses, never stops a libvirtd it did not
# start (systemd's, yours), and the last run to stop stops the daemons this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/lib.sh
. .ci/lib.sh

URI="qemu:///system"
DIR="${VMENV_CI_LIBVIRT_RUN:-/run/pytest-vmenv-ci/libvirtd}"
ME="$(checkout_key)"
USER_PID="${VMENV_CI_USER_PID:-$PPID}"
# libvirtd, virtlogd live in sbin, which a login shell of a normal user lacks
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

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

running() { virsh -c "$URI" version >/dev/null 2>&1; }

lock() {  # the bookkeeping's lock, on fd 9 (closed for every daemon started under it)
    mkdir -p "$DIR/users"
    chmod 700 "$DIR"
    exec 9>"$DIR/lock"
    flock 9
}

recorded() {  # NAME -> "PID START" of the daemon this script started, if that one still runs
    local name pid start comm
    [ -f "$DIR/daemon" ] || return 1
    while read -r name pid start comm; do
        if [ "$name" = "$1" ] && is_process "$pid" "$start" "$comm"; then
            echo "$pid $start"
            return 0
        fi
    done <"$DIR/daemon"
    return 1
}

others() {  # the live users other than this checkout; drops the entries of exited processes
    local entry pid start
    for entry in "$DIR"/users/*; do
        [ -f "$entry" ] && [ "${entry%.part}" = "$entry" ] || continue
        read -r pid start <"$entry" || true
        if ! is_process "${pid:-}" "${start:-}"; then
            rm -f "$entry"
        elif [ "${entry##*/}" != "$ME" ]; then
            echo "${entry##*/}"
        fi
    done
}

register() {
    local start
    start=$(started_at "$USER_PID") \
        || { echo "libvirt.sh: VMENV_CI_USER_PID=$USER_PID is no running process" >&2; exit 2; }
    echo "$USER_PID $start" >"$DIR/users/$ME.part"
    mv "$DIR/users/$ME.part" "$DIR/users/$ME"
}

start() {
    local name pid
    install
    fix_kvm
    lock
    register
    if running; then
        if recorded libvirtd >/dev/null; then
            echo "libvirt.sh: reusing libvirtd $(recorded libvirtd | cut -d' ' -f1), started by" \
                 "$(awk '$1 == "starter" {print $2}' "$DIR/daemon")"
        else
            rm -f "$DIR/daemon"
            echo "libvirt.sh: libvirtd already answers on $URI (not started by this script):" \
                 "reusing it; stop will leave it running"
        fi
        return 0
    fi
    rm -f "$DIR/daemon"
    # The subreaper: PR_SET_CHILD_SUBREAPER, starts the daemons (they daemonize and are
    # re-parented to it, and so are the QEMUs libvirtd forks), reaps every child at once
    # (PID 1 here reaps ~1 s late and libvirtd waits for its dead QEMUs), exits when none is left.
    setsid python3 - "$DIR" >"$DIR/reaper.log" 2>&1 </dev/null 9>&- <<'PY' &
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
    running || { echo "libvirt.sh: libvirtd did not come up"; cat "$DIR/reaper.log"; exit 1; }
    {
        for name in libvirtd virtlogd reaper; do
            if [ "$name" = reaper ]; then pid=$(cat "$DIR/reaper.pid"); else pid=$(cat "/run/$name.pid"); fi
            echo "$name $pid $(started_at "$pid") $(cat "/proc/$pid/comm")"
        done
        echo "starter $ME"
    } >"$DIR/daemon.part"
    mv "$DIR/daemon.part" "$DIR/daemon"
    echo "libvirt.sh: libvirtd $(recorded libvirtd | cut -d' ' -f1) and virtlogd" \
         "$(recorded virtlogd | cut -d' ' -f1) started"
}

stop() {
    local name pid start users
    [ -f "$DIR/users/$ME" ] || return 0  # this checkout's start did not run: nothing of ours
    lock
    rm -f "$DIR/users/$ME"
    users=$(others)
    if [ -n "$users" ]; then
        echo "libvirt.sh: libvirtd left running: still used by" "${users//$'\n'/ }"
        return 0
    fi
    if ! recorded libvirtd >/dev/null && ! recorded virtlogd >/dev/null; then
        rm -f "$DIR/daemon"
        return 0  # not started by this script (or gone): not ours to stop
    fi
    for name in libvirtd virtlogd; do
        read -r pid start < <(recorded "$name" || echo "")
        [ -n "${pid:-}" ] || continue
        kill -TERM "$pid"
        for _ in $(seq 1 100); do is_process "$pid" "$start" || break; sleep 0.1; done
        if is_process "$pid" "$start"; then kill -KILL "$pid"; fi
    done
    if read -r pid start < <(recorded reaper || echo ""); [ -n "${pid:-}" ]; then
        for _ in $(seq 1 50); do is_process "$pid" "$start" || break; sleep 0.1; done
    fi
    rm -f "$DIR/daemon" "$DIR/reaper.pid"
    echo "libvirt.sh: libvirtd and virtlogd stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    install) install ;;
    *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
