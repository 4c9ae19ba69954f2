#!/usr/bin/env bash
# vcsim (the vCenter simulator) for the vSphere backend's tests, one per checkout.
#
#   eval "$(bash .ci/vsphere.sh start)"
#       installs what is missing (the vsphere group of .ci/programs), builds vcsim (patched,
#       offline; once per machine, under a lock), and starts this checkout's vcsim as `nobody`
#       on 127.0.0.1:<free port>. Prints `export` lines (GOVC_URL, VMENV_VCSIM_CA,
#       VMENV_VCSIM_BIN); a vcsim this checkout started before is stopped first.
#   bash .ci/vsphere.sh stop
#       stops the vcsim this checkout's `start` started (by its recorded pid, and only if that
#       pid is still nobody's vcsim) and removes its run directory; nothing else.
#
# Layout under $VMENV_VCSIM_DIR (default /var/lib/vmenv-vcsim, outside any checkout: user
# nobody must traverse every parent dir): vcsim, gopath/, gocache/ (the shared build cache),
# and runs/<checkout>-<hash of its path>/, one run directory per checkout: pid, vcsim.log, and
# nobody's out/ (url, cert.pem), work/ and tmp/. vcsim deletes datastore paths with
# os.RemoveAll and derives them from VM names, so it runs as `nobody` in a working directory
# and TMPDIR of its own, never as root and never in /tmp. Two checkouts side by side each have
# their own simulator, and neither's start or stop touches the other's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="${VMENV_VCSIM_DIR:-/var/lib/vmenv-vcsim}"
run="$out/runs/$(basename "$repo")-$(printf '%s' "$repo" | sha256sum | cut -c1-12)"

ours() {  # PID: is it the vcsim of this run (nobody's vcsim, working in this run's work/)?
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null \
        && [ "$(ps -o user= -p "$1" | tr -d ' ')" = nobody ] \
        && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = vcsim ] \
        && [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$run/work" ]
}

stop() {
    local pid
    pid=$(cat "$run/pid" 2>/dev/null || true)
    if ours "$pid"; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -rf "$run"
}

build() {
    mkdir -p "$out"
    chmod 755 "$out"
    # one build at a time; a second start waits for it and then finds the binary up to date
    exec 9>"$out/build.lock"
    flock 9
    bash "$repo/backends/vsphere/vcsim/build.sh" "$out" >&2
    exec 9>&-
}

start() {
    bash "$repo/.ci/deps" install vsphere >&2
    build
    stop
    mkdir -p "$out/runs" "$run/work" "$run/tmp"
    chmod 755 "$out/runs" "$run"
    chown -R nobody "$run/work" "$run/tmp"
    if ! su -s /bin/sh nobody -c "test -x '$out/vcsim' && test -w '$run/tmp'"; then
        echo "vsphere.sh: user nobody cannot reach $out (a parent directory is not" \
             "world-executable); set VMENV_VCSIM_DIR to a directory nobody can traverse" >&2
        exit 1
    fi
    # vcsim writes these as nobody: a directory of theirs, never a path root reads blindly
    mkdir -p "$run/out" && chown nobody "$run/out"
    # setsid: vcsim outlives this script (and the shell that ran it) until `stop`
    setsid su -s /bin/sh nobody -c "cd '$run/work' && TMPDIR='$run/tmp' exec '$out/vcsim' \
        -l 127.0.0.1:0 -url-file '$run/out/url' -cert-file '$run/out/cert.pem' \
        -pid-file '$run/out/pid'" >"$run/vcsim.log" 2>&1 </dev/null &
    for _ in $(seq 100); do [ -s "$run/out/url" ] && break; sleep 0.1; done
    if [ ! -s "$run/out/url" ]; then
        echo "vsphere.sh: vcsim did not start; its log:" >&2; cat "$run/vcsim.log" >&2; exit 1
    fi
    cp "$run/out/pid" "$run/pid"
    url=$(cat "$run/out/url")
    case "$url" in
        https://127.0.0.1:*) ;;
        *) echo "vsphere.sh: unexpected URL $url" >&2; stop; exit 1 ;;
    esac
    printf 'export GOVC_URL=%s\nexport VMENV_VCSIM_CA=%s\nexport VMENV_VCSIM_BIN=%s\n' \
        "$url" "$run/out/cert.pem" "$out/vcsim"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
