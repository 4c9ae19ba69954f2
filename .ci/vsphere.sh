#!/usr/bin/env bash
# vcsim for the vSphere backend's tests.
#
#   bash .ci/vsphere.sh start   install what is missing, build vcsim (patched, offline), start it
#                               as `nobody` on 127.0.0.1:<free port>; prints `export` lines
#                               (GOVC_URL, VMENV_VCSIM_CA), also written to $VMENV_VCSIM_DIR/env
#   bash .ci/vsphere.sh stop    stop the vcsim this script started (by its recorded pid)
#
# vcsim deletes datastore paths with os.RemoveAll and derives them from VM names, so it runs
# as `nobody` with a working directory and TMPDIR of its own ($VMENV_VCSIM_DIR/run), never as root
# and never in /tmp.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# Outside the checkout: user nobody must traverse every parent dir, whatever the clone's path.
out="${VMENV_VCSIM_DIR:-/var/lib/vmenv-vcsim}"
run="$out/run"
pidfile="$out/vcsim.pid"

need() {
    local missing=()
    command -v go >/dev/null || missing+=(golang-go)
    [ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] \
        || missing+=(golang-github-vmware-govmomi-dev)
    command -v ssh >/dev/null || missing+=(openssh-client)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "vsphere.sh: installing ${missing[*]}" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

stop() {
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
            && [ "$(ps -o user= -p "$pid" | tr -d ' ')" = nobody ]; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    fi
}

start() {
    need
    bash "$repo/backends/vsphere/vcsim/build.sh" "$out" >&2
    stop
    # nobody must reach the binary and own its directories: check the whole path
    rm -rf "$run"
    mkdir -p "$run/work" "$run/tmp"
    chmod 755 "$out"
    chown -R nobody "$run"
    if ! su -s /bin/sh nobody -c "test -x '$out/vcsim' && test -w '$run/tmp'"; then
        echo "vsphere.sh: user nobody cannot reach $out (a parent directory is not" \
             "world-executable); clone the repository somewhere nobody can traverse" >&2
        exit 1
    fi
    rm -f "$run/url" "$run/cert.pem"
    # setsid: vcsim outlives this script (and the shell that ran it) until `stop`
    setsid su -s /bin/sh nobody -c "cd '$run/work' && TMPDIR='$run/tmp' exec '$out/vcsim' \
        -l 127.0.0.1:0 -url-file '$run/url' -cert-file '$run/cert.pem' \
        -pid-file '$run/pid'" >"$run/vcsim.log" 2>&1 </dev/null &
    for _ in $(seq 100); do [ -s "$run/url" ] && break; sleep 0.1; done
    if [ ! -s "$run/url" ]; then
        echo "vsphere.sh: vcsim did not start; its log:" >&2; cat "$run/vcsim.log" >&2; exit 1
    fi
    cp "$run/pid" "$pidfile"
    url=$(cat "$run/url")
    case "$url" in https://127.0.0.1:*) ;; *) echo "vsphere.sh: unexpected URL $url" >&2; stop; exit 1;; esac
    printf 'export GOVC_URL=%s\nexport VMENV_VCSIM_CA=%s\n' "$url" "$run/cert.pem" | tee "$out/env"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
