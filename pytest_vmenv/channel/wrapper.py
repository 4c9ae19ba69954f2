"""The one POSIX ``sh`` wrapper a remote channel runs every command under, and its group kill.

Every remote channel (SSH, the libvirt guest agent, vSphere guest operations) promises the
same ``execute``: the command's exit code, ``128 + N`` when signal N killed it, 127 for a
program that does not exist; ``input`` fed to stdin and then closed; stdout and stderr as
separate bytes; a background process left running (``sleep 60 &``) does not hold ``execute``
open; on a timeout the command's whole process group is killed. A remote shell gives none of
that by itself, so the command runs under :attr:`Wrapper.script`:

* it gets a **run directory** of its own (:class:`RunDir`);
* it runs under ``setsid`` in a new session and process group, through an inner shell that
  writes its own pid (the group's id) to ``pid`` in the run directory *after* ``setsid``,
  so a pid file always names a group that exists. ``setsid`` is called without ``-w``
  (busybox has no ``-w``): a non-interactive shell's child is never a process-group leader,
  so ``setsid`` calls setsid(2) in place instead of forking, and the wrapper waits for it;
* stdout and stderr go to the files ``o`` and ``e`` there, so a background child holds a
  file, not the channel's pipe, and the wrapper returns when the command itself ends;
* stdin is the file ``i`` when the caller put one in the run directory first (it is
  removed once open), else :class:`Stdin` says which;
* its exit status is the command's (the shell reports death by signal N as ``128 + N``);
  125 means it could not make its run directory;
* the output comes back as :class:`Delivery` says.

:data:`KILL` is the other half: given the run directories the command may be in, it waits up
to two seconds for a pid file and kills that process group with SIGKILL. Both need only
POSIX ``sh``, ``setsid``, ``mktemp``, ``mkdir``, ``cat``, ``wc``, ``rm``, ``sleep`` and
``kill``: busybox has them all.
"""

from __future__ import annotations

import enum
import functools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["INLINE_MAX", "KILL", "Delivery", "RunDir", "Sized", "Stdin", "Wrapper", "as_user"]

INLINE_MAX = 2 * 1024 * 1024
KILL = r"""for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for d in "$@"; do
    if [ -s "$d/pid" ]; then kill -KILL "-$(cat "$d/pid")"; exit; fi
  done
  sleep 0.1
done
exit 1"""


class RunDir(enum.Enum):
    """Where the command's run directory comes from (the wrapper's first argument, if any)."""

    MKTEMP = "mktemp"
    """``mktemp -d`` in the guest's ``$TMPDIR`` (else ``/tmp``); the wrapper prints its path
    as its first line of stdout, before the command starts. No argument."""
    GIVEN = "given"
    """The first argument: a directory the caller made."""
    NAMED = "named"
    """The first argument is an id the caller chose; the directory is ``PREFIX + id`` for the
    first of :attr:`Wrapper.prefixes` where it exists or can be made, so the caller knows
    where the pid file will be before the command starts (:meth:`Wrapper.dirs`)."""


class Stdin(enum.Enum):
    """What the command reads when the caller put no file ``i`` in the run directory."""

    CHANNEL = "channel"
    """The wrapper's own stdin."""
    NULL = "null"
    """``/dev/null`` (the channel gives the wrapper no usable stdin)."""


class Delivery(enum.Enum):
    """How the output comes back once the command has ended."""

    STREAM = "stream"
    """``o`` copied to the wrapper's stdout and ``e`` to its stderr (after the run
    directory's line for :attr:`RunDir.MKTEMP`); the run directory is removed."""
    SIZED = "sized"
    """A header line, then: ``vmenv-inline OLEN ELEN`` followed by both files (and the run
    directory removed) when together they fit :attr:`Wrapper.inline_max`, else
    ``vmenv-files OLEN ELEN O E``, both left for the caller to read and remove
    (:meth:`Sized.parse`)."""
    FILES = "files"
    """Left in the run directory as ``o`` and ``e`` for the caller to fetch and remove."""


_PROLOGUE = {
    RunDir.MKTEMP: (
        't=$(mktemp -d "${TMPDIR:-/tmp}/vmenv.XXXXXX") || exit 125\nprintf \'%s\\n\' "$t"'
    ),
    RunDir.GIVEN: "t=$1; shift",
    RunDir.NAMED: (
        "id=$1; shift\n"
        'for t in PREFIXES; do [ -d "$t" ] || mkdir -p -m 700 "$t" 2>/dev/null && break; t=; done\n'
        '[ -n "$t" ] || exit 125'
    ),
}
_STDIN = {
    Stdin.CHANNEL: 'if [ -e "$t/i" ]; then exec <"$t/i"; rm -f "$t/i"; fi',
    Stdin.NULL: 'if [ -e "$t/i" ]; then exec <"$t/i"; rm -f "$t/i"; else exec </dev/null; fi',
}
_RUN = """setsid SHELL -c 'echo $$ >"$1/pid"; shift; exec "$@"' vmenv "$t" "$@" >"$t/o" 2>"$t/e"
rc=$?"""
_DELIVERY = {
    Delivery.STREAM: 'cat "$t/o"; cat "$t/e" >&2; rm -rf "$t"',
    Delivery.SIZED: """ol=$(wc -c <"$t/o"); el=$(wc -c <"$t/e")
if [ $((ol + el)) -le INLINE_MAX ]; then
  echo "vmenv-inline $ol $el"; cat "$t/o" "$t/e"; rm -rf "$t"
else
  echo "vmenv-files $ol $el $t/o $t/e"
fi""",
    Delivery.FILES: "",
}


@dataclass(frozen=True)
class Wrapper:
    """One channel's wrapper: its three real differences, and two guest-side details.

    ``inline_max`` bounds :attr:`Delivery.SIZED`'s inline output (both streams together);
    ``prefixes`` are :attr:`RunDir.NAMED`'s candidate directories (an id is appended);
    ``shell`` is the guest's POSIX shell, outer and inner.
    """

    rundir: RunDir
    stdin: Stdin
    delivery: Delivery
    inline_max: int = INLINE_MAX
    prefixes: tuple[str, ...] = ("/run/vmenv/", "/tmp/vmenv.")
    shell: tuple[str, ...] = ("/bin/sh",)

    @functools.cached_property
    def script(self) -> str:
        """The ``sh -c`` script: ``script [RUNDIR-ARGUMENT] ARGV...``."""
        parts = [
            self._prologue(),
            _STDIN[self.stdin],
            _RUN.replace("SHELL", shlex.join(self.shell)),
        ]
        if self.delivery is not Delivery.FILES:
            parts.append(_DELIVERY[self.delivery].replace("INLINE_MAX", str(self.inline_max)))
        return "\n".join([*parts, "exit $rc"])

    def _prologue(self) -> str:
        candidates = " ".join(shlex.quote(prefix) + '"$id"' for prefix in self.prefixes)
        return _PROLOGUE[self.rundir].replace("PREFIXES", candidates)

    def argv(self, command: Sequence[str], where: str | None = None) -> list[str]:
        """The argv that runs ``command`` under the wrapper; ``where`` is the run directory
        (:attr:`RunDir.GIVEN`) or its id (:attr:`RunDir.NAMED`), None for ``MKTEMP``."""
        if (where is None) != (self.rundir is RunDir.MKTEMP):
            raise TypeError(f"a {self.rundir.value} run directory takes where={where!r}")
        return [*self.shell, "-c", self.script, "vmenv", *([] if where is None else [where]),
                *command]  # fmt: skip

    def setup(self, where: str) -> str:
        """A script that makes :attr:`RunDir.NAMED`'s run directory for id ``where`` and prints
        its path: where to stage a large stdin as ``i`` before the command starts."""
        if self.rundir is not RunDir.NAMED:
            raise TypeError("only a named run directory can be made ahead of the command")
        return f"set -- {shlex.quote(where)}\n{self._prologue()}\nprintf '%s\\n' \"$t\""

    def dirs(self, where: str) -> list[str]:
        """The directories the command's files may be in, for :data:`KILL` and cleanup."""
        if self.rundir is RunDir.NAMED:
            return [prefix + where for prefix in self.prefixes]
        return [where]

    def kill_argv(self, where: str, script: str = KILL) -> list[str]:
        """The argv that kills the process group of the command whose run is ``where``."""
        return [*self.shell, "-c", script, "vmenv-kill", *self.dirs(where)]


@dataclass(frozen=True)
class Sized:
    """What a :attr:`Delivery.SIZED` wrapper printed: both streams inline, or their files."""

    stdout_size: int
    stderr_size: int
    stdout: bytes = b""
    stderr: bytes = b""
    files: tuple[str, str] | None = None

    @classmethod
    def parse(cls, raw: bytes, max_output: int) -> Sized | None:
        """The header and inline output of ``raw``, at most ``max_output`` bytes per stream
        kept; None when there is no header (the wrapper itself did not finish)."""
        head, _, body = raw.partition(b"\n")
        fields = head.decode("ascii", "replace").split()
        try:
            if len(fields) >= 3 and fields[0] == "vmenv-inline":
                olen, elen = int(fields[1]), int(fields[2])
                out = body[: min(olen, max_output)]
                err = body[olen : olen + min(elen, max_output)]
                return cls(olen, elen, out, err)
            if len(fields) >= 5 and fields[0] == "vmenv-files":
                return cls(int(fields[1]), int(fields[2]), files=(fields[3], fields[4]))
        except ValueError:
            return None
        return None


def as_user(
    argv: Sequence[str], env: Mapping[str, str] | None, user: str | None, login: str
) -> list[str]:
    """``argv`` with ``env`` set (through ``env``: sshd and guest tools drop most variables)
    and run as ``user`` when that is not ``login``, the channel's own user (``runuser`` for
    root, else ``sudo -n``)."""
    prefix: list[str] = []
    if user and user != login:
        switch = ["runuser", "-u"] if login == "root" else ["sudo", "-n", "-u"]
        prefix = [*switch, user, "--"]
    if env:
        bad = [k for k in env if not k or "=" in k]
        if bad:
            raise ValueError(f"invalid environment variable name {bad[0]!r}")
        prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
    return [*prefix, *argv]
