"""The unprivileged mode: guests in a user namespace when pytest does not run as root.

When ``os.geteuid() != 0`` (:func:`rootless`), the keeper first unshares ``CLONE_NEWUSER``,
then the other namespaces as in root mode, all owned by that user namespace. Its map:

* with subordinate ids (``/etc/subuid`` and ``/etc/subgid`` give the user 65536 or more, and
  ``newuidmap``/``newgidmap`` exist; :mod:`pytest_vmenv.images.subids`), a full one in rootless
  podman's layout: 0 is the user, 1..count the subordinate range, written by ``newuidmap``
  from a child of the keeper. Every guest user exists (``www-data``, a ``useradd`` user;
  ``setgroups`` allowed), and a guest user other than root is a subordinate id on the host,
  which owns nothing there but files in the guest's own dirs. Debian images are built in the
  same layout (``mmdebstrap`` runs as root of such a namespace), so their owners are right in
  the guest. Host-side commands on guest trees (snapshot copies, removal) run in a namespace
  of that map (:func:`mapped_argv`). ``RLIMIT_NPROC`` then bounds the guest as a whole
  through a second, nested namespace (see :func:`..guest.userns.enter`);
* without, only the caller's uid and gid, as 0, with single-line ``uid_map``/``gid_map``
  files (``setgroups`` denied; no helper needed): only root exists in the guest, and Debian
  images are refused (their trees hold files of system users).

What changes in the guest:

* overlayfs is mounted with ``userxattr``: whiteouts and opaque dirs use ``user.overlay.*``
  xattrs (``cp -a`` keeps them when a snapshot is copied; whiteouts are 0/0 character
  devices, which an unprivileged process may create);
* ``/dev`` holds bind mounts of the host's ``null``, ``zero``, ``full``, ``random``,
  ``urandom`` and ``tty`` (``mknod`` is impossible in a user namespace);
* ``/sys`` is a fresh read-only sysfs of the guest's network namespace; if the kernel refuses
  it, ``/sys`` is left an empty read-only tmpfs (never the host's ``/sys``), noted in
  ``boot.log``;
* with the single map, only root (uid 0) exists: ``user=`` another account fails with a
  clear message;
* cgroups only where the user has delegated ones (groups it owns, see :mod:`.cgroups`):
  there ``memory``/``cpus``/``pids`` are applied as for root; elsewhere ``memory``/``cpus``
  are not (warned once, :class:`.support.LimitNotApplied`), destroy kills through PID 1 (the kernel
  kills its PID namespace with it), and a live snapshot stops the guest's processes with
  SIGSTOP from its PID 1 instead of the cgroup freezer;
* ``RLIMIT_NPROC`` is ``pids_max`` (:data:`.cgroups.DEFAULT_PIDS_MAX` by default), set by
  the keeper once inside the user namespace (:func:`enter`): the kernel counts that limit per
  user *and* user namespace, and nothing else runs as root of this one, so it bounds the
  guest's processes and threads only (guest root cannot raise it: that takes
  CAP_SYS_RESOURCE in the host's user namespace). ``RLIMIT_AS`` is not used for ``memory``:
  it caps every process's address space on its own, not the guest's memory (ten processes
  get ten times it), and programs that reserve large address ranges (JVMs, Go runtimes,
  sanitizers) fail under it while using little;
* ``init="systemd"`` needs a cgroup v2 group delegated to the user (pytest's own, see
  :mod:`.cgroups`): systemd manages the guest's leaf as its ``/sys/fs/cgroup``;
* ``network=`` is a userspace switch (:mod:`.userlan`) instead of a bridge;
* refused with :class:`~pytest_vmenv.errors.BackendUnavailable`: ``image="host"`` (its mask
  layer needs ``trusted.*`` xattrs and a view of the whole host), Debian images without
  subordinate ids or built by root, and ``init="systemd"`` without a delegated cgroup v2 group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ... import errors
from ...images import subids

__all__ = [
    "HOST_REASON",
    "limit_problems",
    "mapped_argv",
    "probe",
    "rmtree",
    "rootless",
    "sysctl_reason",
    "unsearchable",
]

HOST_REASON = (
    "image='host' needs root (its read-only view of the host's / cannot be built in a user "
    "namespace): use a rootfs directory or tarball image instead (image='/path/to/rootfs', or "
    "[images.NAME] emulator = { rootfs = PATH } in vmenv.toml), or run as root"
)
_CACHE: dict[str, str | None] = {}

# Run as ``python -I -S -c``: userns + mount ns, maps, tmpfs, overlay with userxattr.
_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def fail(step):
    err = ctypes.get_errno()
    print("%s %d %s" % (step, err, os.strerror(err)))
    sys.exit(1)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000 | 0x00020000) != 0:
    fail("unshare")
try:
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1\n" % uid),
                       ("gid_map", "0 %d 1\n" % gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
except OSError as exc:
    print("map %d %s" % (exc.errno, exc.strerror))
    sys.exit(1)
def mount(src, dst, fs, flags, data):
    return libc.mount(src.encode(), dst.encode(), fs.encode() if fs else None,
                      ctypes.c_ulong(flags), data.encode() if data else None)
if mount("none", "/", None, (1 << 18) | 16384, "") != 0:
    fail("mount")
if mount("tmpfs", "/dev", "tmpfs", 0, "size=64k") != 0:
    fail("mount")
for d in ("l", "u", "w", "m"):
    os.mkdir("/dev/" + d)
if mount("overlay", "/dev/m", "overlay", 0,
         "lowerdir=/dev/l,upperdir=/dev/u,workdir=/dev/w,userxattr") != 0:
    fail("overlay")
print("ok")
"""


def rootless() -> bool:
    """True when the emulator must use its user-namespace mode (not running as root)."""
    return os.geteuid() != 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def sysctl_reason(proc: Path = Path("/proc")) -> str | None:
    """Which sysctl forbids unprivileged user namespaces, if one does."""
    sysctls = (
        ("kernel/unprivileged_userns_clone", "0", "set it to 1"),
        ("user/max_user_namespaces", "0", "set it to a positive number, e.g. 15000"),
        ("kernel/apparmor_restrict_unprivileged_userns", "1", "set it to 0"),
    )
    for rel, bad, fix in sysctls:
        if _read(proc / "sys" / rel) == bad:
            name = rel.replace("/", ".")
            return (
                f"unprivileged user namespaces are disabled on this host (sysctl "
                f"{name}={bad}; {fix}, or run as root)"
            )
    return None


def probe() -> str | None:
    """Why the unprivileged mode cannot work here (None if it can); probed once.

    A child process unshares a user and a mount namespace, writes its maps and mounts an
    overlay with ``userxattr`` on a tmpfs: what every guest will need.
    """
    if "probe" in _CACHE:
        return _CACHE["probe"]
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd="/",
            timeout=30,
            check=False,
        )
    except OSError as exc:
        reason: str | None = _cannot_spawn(sys.executable, exc)
    except subprocess.SubprocessError as exc:
        reason = _explain(f"spawn 0 {exc}")
    else:
        out = proc.stdout.decode("utf-8", "replace").strip()
        if out == "ok":
            reason = None
        elif out:
            reason = _explain(out)
        else:  # the interpreter itself failed before the probe's first line
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            reason = (
                f"{_who()} could not run the Python interpreter {sys.executable} for the "
                f"user-namespace probe (exit {proc.returncode}: {err[-1] if err else 'no output'})"
                "; check that this user can run it and read its standard library"
            )
    _CACHE["probe"] = reason
    return reason


def _who() -> str:
    uid = os.getuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def unsearchable(path: str) -> str | None:
    """The first directory on the way to ``path`` (symlinks followed) this process cannot
    enter, or None. That is why a file another account can run is out of this one's reach
    (a virtualenv under root's 0700 ``/root``, say)."""
    current = Path("/")
    pending = list(Path(os.path.abspath(path)).parts[1:])
    hops = 0
    while pending:
        if not os.access(current, os.X_OK):
            return str(current)
        name = pending.pop(0)
        if name == "..":
            current = current.parent
            continue
        step = current / name
        if hops < 40 and os.path.islink(step):
            hops += 1
            target = Path(os.readlink(step))
            if target.is_absolute():
                current = Path("/")
                pending = list(target.parts[1:]) + pending
            else:
                pending = list(target.parts) + pending
            continue
        current = step
    return None


def _cannot_spawn(python: str, exc: OSError) -> str:
    """The probe's interpreter could not be started: which path component, and what to do."""
    where = unsearchable(python)
    if where is None:
        return (
            f"{_who()} cannot execute the Python interpreter {python} ({exc.strerror or exc}); "
            "run pytest with a Python this user can execute"
        )
    try:
        st = os.stat(where)
        how = f": mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}"
    except OSError:
        how = ""
    return (
        f"{_who()} cannot execute the Python interpreter {python} (permission denied on "
        f"{where}{how}); run pytest with a Python and virtualenv this user can reach (not "
        f"under {where})"
    )


def _explain(out: str) -> str:
    step, _, rest = out.partition(" ")
    errno_text, _, strerror = rest.partition(" ")
    if step in ("unshare", "map", "mount"):
        known = sysctl_reason()
        if known is not None:
            return known
    if step == "unshare" and errno_text == "28":
        return (
            "no user namespace left to create (sysctl user.max_user_namespaces is "
            "exhausted); raise it, or run as root"
        )
    if step == "unshare":
        return (
            f"it runs unprivileged and cannot create a user namespace: unshare(CLONE_NEWUSER) "
            f"failed ({strerror}; a seccomp policy of a container?); run as root"
        )
    if step == "overlay":
        return (
            f"the kernel refuses overlayfs in a user namespace ({strerror}; it needs Linux "
            ">= 5.11 with the userxattr option); run as root"
        )
    return f"its user-namespace probe failed ({out or 'no output'}); run as root"


def check() -> None:
    """Raise BackendUnavailable if the unprivileged mode cannot work on this host."""
    reason = probe()
    if reason is not None:
        raise errors.BackendUnavailable("emulator", reason)


def limit_problems(memory: int | None, cpus: int | None) -> list[str]:
    """The limits an unprivileged guest runs without, as one LimitNotApplied problem."""
    names = [n for n, v in (("memory", memory), ("cpus", cpus)) if v is not None]
    if not names:
        return []
    what = " and ".join(names) + (" limits are" if len(names) > 1 else " limit is")
    return [
        f"the {what} not applied: pytest runs unprivileged (uid {os.geteuid()}) without a "
        "delegated cgroup that has the controller (run pytest in one, e.g. `systemd-run "
        "--user --scope -p Delegate=yes pytest`, or run as root to enforce them)"
    ]


def rmtree(path: Path) -> None:
    """Remove a tree of ours; as non-root, first open up dirs a guest made unwritable.

    Never follows a symlink: dirs are opened ``O_PATH | O_NOFOLLOW`` and chmod-ed through
    ``/proc/self/fd``. Leaves what still cannot be removed (callers ignore it, as
    :func:`shutil.rmtree` with ``ignore_errors`` would).
    """
    shutil.rmtree(path, ignore_errors=True)
    if os.geteuid() == 0 or not os.path.lexists(path):
        return
    _open_up(str(path))
    shutil.rmtree(path, ignore_errors=True)
    mapped = mapped_argv() if os.path.lexists(path) else []
    if mapped:  # files of the guest's other users: removed where their ids are mapped
        subprocess.run(
            [*mapped, "rm", "-rf", "--", str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd="/",
            check=False,
        )


def mapped_argv() -> list[str]:
    """Unprivileged with subordinate ids: the prefix that runs a host-side command in a user
    namespace with the guests' full id map (their files keep their owners, and those of the
    guest's other users can be copied and removed); else nothing."""
    ids = subids.unprivileged()
    return [] if ids is None else ids.unshare_argv()


def _open_up(path: str) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
        names = os.listdir(f"/proc/self/fd/{fd}")
    except OSError:
        return
    finally:
        os.close(fd)
    for name in names:
        _open_up(os.path.join(path, name))
