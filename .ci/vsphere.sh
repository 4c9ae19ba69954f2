#!/usr/bin/env bash
# vcsim (the vCenter simulator) for the vSphere backend's tests, one per checkout.
#
#   exports=$(bash .ci/vsphere.sh start) && eval "$exports"
#       installs what is missing (the vsphere group of .ci/programs), builds vcsim (patched,
#       offline; once per machine, under a lock), and starts this checkout's vcsim as `nobody`
#       on 127.0.0.1:<free port>. Prints `export` lines (GOVC_URL, VMENV_VCSIM_CA,
#       VMENV_VCSIM_BIN); a vcsim this checkout started before is stopped first. On any
#       failure it prints nothing on stdout, stops what it started and exits 1.
#   bash .ci/vsphere.sh env
#       the same `export` lines for the vcsim this checkout's `start` started (another shell).
#   bash .ci/vsphere.sh stop
#       stops the vcsim this checkout's `start` started (by its recorded pid, and only if that
#       pid is still nobody's vcsim working in this checkout's run directory) and removes the
#       run directory; nothing else.
#   bash .ci/vsphere.sh validate-url URL
#       exits 0 when URL is one vcsim on 127.0.0.1 would write (https://127.0.0.1:PORT/sdk).
#
# Layout under $VMENV_VCSIM_DIR (default /var/lib/vmenv-vcsim, outside any checkout: user
# nobody must traverse every parent dir): vcsim, gopath/, gocache/ (the shared build cache),
# and runs/<checkout>-<hash of its path>/, one run directory per checkout (root's): pid,
# vcsim.log, ca.pem (root's copy of the certificate) and nobody's out/ (url, cert.pem, pid),
# work/ and tmp/. vcsim deletes datastore paths with os.RemoveAll and derives them from VM
# names, so it runs as `nobody` in a working directory and TMPDIR of its own, never as root
# and never in /tmp. Two checkouts side by side each have their own simulator, and neither's
# start or stop touches the other's.
#
# What nobody wrote is read as untrusted: out/url and out/pid only when they are regular
# files (never through a symlink), the pid only when it is vcsim's, the URL only when it is
# exactly https://127.0.0.1:PORT/sdk; the certificate is copied to ca.pem the same way before
# its path is printed, and every printed value is shell-quoted (the lines are eval'd as root).
set -euo pipefail
# shellcheck source=.ci/lib.sh
. "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/.." && pwd -P)
out=$(realpath -m "${VMENV_VCSIM_DIR:-/var/lib/vmenv-vcsim}")
run="$out/runs/$(checkout_key)"

validate_url() {  # URL: the only shape of URL that is ever printed
    [[ ${1:-} =~ ^https://127\.0\.0\.1:[0-9]{1,5}/sdk$ ]]
}

read_untrusted() {  # PATH MAX [DEST]: a regular file of nobody's, opened with O_NOFOLLOW
    # Prints its content (at most MAX bytes, else refused), or copies it to DEST (root's,
    # mode 0644, replaced atomically). Exit 1 with the reason when it is a symlink, a FIFO,
    # a device, a directory or too big: root never reads through a link nobody planted.
    /usr/bin/python3 - "$@" <<'PY'
import os, stat, sys
path, limit = sys.argv[1], int(sys.argv[2])
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
except OSError as exc:
    sys.exit(f"vsphere.sh: refusing {path}: {exc.strerror} (a symlink, or missing)")
with os.fdopen(fd, "rb") as f:
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        sys.exit(f"vsphere.sh: refusing {path}: not a regular file")
    data = f.read(limit + 1)
if len(data) > limit:
    sys.exit(f"vsphere.sh: refusing {path}: larger than {limit} bytes")
if len(sys.argv) > 3:
    dest = sys.argv[3]
    with open(dest + ".part", "wb") as f:
        f.write(data)
    os.chmod(dest + ".part", 0o644)
    os.replace(dest + ".part", dest)
else:
    sys.stdout.buffer.write(data)
PY
}

ours() {  # PID: is it the vcsim of this run (nobody's vcsim, working in this run's work/)?
    alive "${1:-}" \
        && [ "$(ps -o user= -p "$1" | tr -d ' ')" = nobody ] \
        && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = vcsim ] \
        && [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$(realpath -m "$run/work")" ]
}

stop() {
    # The recorded pid, else the one vcsim wrote (a start that failed before recording it),
    # else the child of the `su` that started it (vcsim not yet as far as writing its pid):
    # each only if it is this run's vcsim.
    local pid candidates=() children=() su_pid su_start
    candidates+=("$(cat "$run/pid" 2>/dev/null || true)")
    candidates+=("$(read_untrusted "$run/out/pid" 32 2>/dev/null | tr -d '[:space:]' || true)")
    read -r su_pid su_start 2>/dev/null <"$run/su" || true
    if is_process "${su_pid:-}" "${su_start:-}" su; then
        read -r -a children 2>/dev/null <<<"$(cat "/proc/$su_pid/task/"*/children 2>/dev/null)"
        candidates+=("${children[@]}")
    fi
    for pid in "${candidates[@]}"; do
        ours "$pid" || continue
        kill "$pid"
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid"; fi
    done
    # a `su` still waiting for a child that had not exec'd vcsim yet takes that child along
    if is_process "${su_pid:-}" "${su_start:-}" su; then
        kill "$su_pid" 2>/dev/null || true
        for _ in $(seq 50); do is_process "$su_pid" "$su_start" su || break; sleep 0.1; done
    fi
    rm -rf --one-file-system "$run"
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

exports() {  # the export lines of this run's vcsim, after checking everything nobody wrote
    local pid url
    if [ ! -d "$run/out" ]; then
        echo "vsphere.sh: this checkout has no vcsim running: start it with" \
             "\`exports=\$(bash .ci/vsphere.sh start) && eval \"\$exports\"\`" >&2
        return 1
    fi
    pid=$(read_untrusted "$run/out/pid" 32) || return 1
    pid=${pid%$'\n'}
    if ! ours "$pid"; then
        echo "vsphere.sh: $run/out/pid names no vcsim of this checkout (${pid:0:32})" >&2
        return 1
    fi
    echo "$pid" >"$run/pid"
    url=$(read_untrusted "$run/out/url" 256) || return 1
    url=${url%$'\n'}
    if ! validate_url "$url"; then
        printf 'vsphere.sh: unexpected URL in %s: %q\n' "$run/out/url" "$url" >&2
        return 1
    fi
    read_untrusted "$run/out/cert.pem" 65536 "$run/ca.pem" || return 1
    if ! grep -q -- '-----BEGIN CERTIFICATE-----' "$run/ca.pem"; then
        echo "vsphere.sh: $run/out/cert.pem is not a PEM certificate" >&2
        return 1
    fi
    printf 'export GOVC_URL=%q\nexport VMENV_VCSIM_CA=%q\nexport VMENV_VCSIM_BIN=%q\n' \
        "$url" "$run/ca.pem" "$out/vcsim"
}

fail() {  # MESSAGE: stop what start started, say why, exit 1
    echo "vsphere.sh: $*" >&2
    if [ -s "$run/vcsim.log" ]; then echo "vcsim's log:" >&2; cat "$run/vcsim.log" >&2; fi
    stop
    exit 1
}

start() {
    local lines
    bash "$repo/.ci/deps" install vsphere >&2
    build
    stop
    mkdir -p "$out/runs" "$run/work" "$run/tmp"
    chmod 755 "$out/runs" "$run"
    chown -R nobody "$run/work" "$run/tmp"
    # shellcheck disable=SC2016  # $1, $2 are expanded by nobody's sh, as arguments
    if ! su -s /bin/sh nobody -c 'test -x "$1" && test -w "$2"' vsphere.sh "$out/vcsim" \
            "$run/tmp"; then
        echo "vsphere.sh: user nobody cannot reach $out (a parent directory is not" \
             "world-executable); set VMENV_VCSIM_DIR to a directory nobody can traverse" >&2
        exit 1
    fi
    # vcsim writes these as nobody: a directory of theirs, never a path root reads blindly
    mkdir -p "$run/out" && chown nobody "$run/out"
    # setsid: vcsim outlives this script (and the shell that ran it) until `stop`
    # shellcheck disable=SC2016
    setsid su -s /bin/sh nobody -c 'cd "$1" && TMPDIR="$2" exec "$3" -l 127.0.0.1:0 \
        -url-file "$4" -cert-file "$5" -pid-file "$6"' vsphere.sh "$run/work" "$run/tmp" \
        "$out/vcsim" "$run/out/url" "$run/out/cert.pem" "$run/out/pid" \
        >"$run/vcsim.log" 2>&1 </dev/null &
    echo "$! $(started_at $! || true)" >"$run/su"
    for _ in $(seq "$((${VMENV_VCSIM_START_SECONDS:-30} * 10))"); do
        if [ -e "$run/out/url" ] || [ -L "$run/out/url" ]; then break; fi
        sleep 0.1
    done
    [ -e "$run/out/url" ] || [ -L "$run/out/url" ] || fail "vcsim did not start in ${VMENV_VCSIM_START_SECONDS:-30} s"
    lines=$(exports) || fail "vcsim's run directory $run failed the checks above"
    printf '%s\n' "$lines"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) exports ;;
    validate-url)
        validate_url "${2:-}" || { printf 'vsphere.sh: not a vcsim URL: %q\n' "${2:-}" >&2; exit 1; }
        ;;
    *) echo "usage: $0 start|env|stop|validate-url URL" >&2; exit 2 ;;
esac
