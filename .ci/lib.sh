# Sourced by the .ci scripts: what identifies this checkout, and process identity checks.

# This checkout, as a name safe in a path and in a shell word: its directory name with every
# character outside [A-Za-z0-9._-] replaced by `_`, then a hash of its canonical path (two
# clones with the same name get different keys; the same path always gets the same key).
checkout_key() {
    local repo name
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    name=${repo##*/}
    name=${name//[^A-Za-z0-9._-]/_}
    printf '%s-%s\n' "$name" "$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
}

# PID's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names
# one process, never a later one that got the same pid. Fails for a zombie.
started_at() {
    local stat
    [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }  # the fields after the command name, which may hold spaces and ')'
    # shellcheck disable=SC2086
    set -- $stat
    [ "$1" != Z ] || return 1  # exited, not yet reaped
    printf '%s\n' "${20}"
}

# PID START [COMM]: is that very process still there (and running COMM)?
is_process() {
    [ -n "${2:-}" ] && [ "$(started_at "$1")" = "$2" ] || return 1
    [ -z "${3:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$3" ]
}

alive() { started_at "${1:-}" >/dev/null; }  # PID: running (not exited, not a zombie)
