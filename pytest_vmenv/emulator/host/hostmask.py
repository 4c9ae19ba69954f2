"""The ``"host"`` image's mask layer: what a guest's view of the host's ``/`` must not show.

The host image is a read-only view of the host's ``/`` (:data:`..guest.mounts.HOST_BASE`,
mounted per guest) under this layer of opaque directories, so that the host's ``/tmp``,
``/run``, home directories and pytest-vmenv's state dirs look empty (and stay writable in the
guest), and without the host's credentials.

The host mask shows empty: :data:`MASKED`; every pytest-vmenv state dir on the host (this
session's, root's and each account's default one, ``$XDG_STATE_HOME``'s, and every one in the
host's registry, see :mod:`pytest_vmenv.paths`); ``/etc/ssl/private``; and the home directory
of every account in the host's ``/etc/passwd`` with uid >= 1000 or a home under ``/var/lib``,
``/srv`` or ``/opt`` (``/var/lib/postgresql``, say) that exists. It replaces ``/etc/shadow``
and ``/etc/gshadow`` (and their ``-`` backups) with copies in which every password is locked,
and removes the SSH host private keys (``/etc/ssh/ssh_host_*_key``) and
``/etc/security/opasswd``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from ... import paths
from ..guest.mounts import HOST_BASE

__all__ = ["MASKED", "mask_layer", "refresh_mask"]

MASKED = ("tmp", "run", "home", "root", "var/tmp")
SECRET_DIRS = ("etc/ssl/private",)
SANITIZED = ("etc/shadow", "etc/gshadow", "etc/shadow-", "etc/gshadow-")
REMOVED = ("etc/security/opasswd",)
SSH_HOST_KEYS = "etc/ssh/ssh_host_*_key"
HOST = Path("/")
PASSWD = Path("/etc/passwd")
_SERVICE_HOMES = ("/var/lib/", "/srv/", "/opt/")
_NEVER_UNDER = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/boot", "/dev")
_NEVER = (*_NEVER_UNDER, "/proc", "/sys", "/var", "/var/lib", "/srv", "/opt", "/nonexistent")


def _opaque_dir(path: Path, mode: int) -> None:
    path.mkdir(exist_ok=True)
    os.chmod(path, mode)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def _like_host(made: Path, rel: str) -> None:
    """Give ``made`` the owner and mode of ``/rel`` on the host (if it has one)."""
    with contextlib.suppress(OSError):
        st = os.lstat(HOST / rel)
        os.lchown(made, st.st_uid, st.st_gid)
        os.chmod(made, st.st_mode & 0o7777)


def _parents(fs: Path, rel: str) -> None:
    """Make the parents of ``fs/rel`` (plain dirs, merged with the host's) as on the host."""
    parent = Path(rel).parent
    if str(parent) == "." or (fs / parent).is_dir():
        return
    _parents(fs, str(parent))
    (fs / parent).mkdir()
    _like_host(fs / parent, str(parent))


def _maskable(real: str) -> bool:
    """Not ``/`` nor a system directory (a mask there would break the guest)."""
    never_under = tuple(d + "/" for d in _NEVER_UNDER)
    return real != "/" and real not in _NEVER and not real.startswith(never_under)


def _state_dirs(passwd: Path) -> list[str]:
    """Every pytest-vmenv state dir on the host (relative to /): the default ones of root
    and of each account in ``passwd``, ``$XDG_STATE_HOME``'s and ``$VMENV_STATE_DIR``, and
    every dir in the host's registry (:func:`pytest_vmenv.paths.registered`)."""
    found: list[Path] = [paths.ROOT_STATE, *paths.registered()]
    for var, sub in (("XDG_STATE_HOME", "pytest-vmenv"), ("VMENV_STATE_DIR", "")):
        if os.environ.get(var, "").startswith("/"):
            found.append(Path(os.environ[var]) / sub)
    with contextlib.suppress(OSError):
        for line in passwd.read_text(encoding="utf-8", errors="replace").splitlines():
            home = ([*line.split(":"), "", "", "", "", "", ""])[5]
            if home.startswith("/"):
                found.append(Path(home) / paths.USER_STATE)
    real = {os.path.realpath(p) for p in found if os.path.isdir(p)}
    return sorted(r.lstrip("/") for r in real if _maskable(r))


def _sanitized(data: bytes) -> bytes:
    """A shadow-style file with every password field locked: ``!`` if it was, else ``*``."""
    lines = []
    for line in data.split(b"\n"):
        fields = line.split(b":")
        if len(fields) > 1:
            fields[1] = b"!" if fields[1].startswith(b"!") else b"*"
        lines.append(b":".join(fields))
    return b"\n".join(lines)


def _secrets() -> tuple[dict[str, bytes], list[str]]:
    """Files to replace (rel -> sanitized content) and to remove: SSH host private keys, old
    password hashes, and a shadow file that cannot be read (so cannot be sanitized)."""
    replaced: dict[str, bytes] = {}
    removed = {rel for rel in REMOVED if os.path.lexists(HOST / rel)}
    removed |= {str(p.relative_to(HOST)) for p in HOST.glob(SSH_HOST_KEYS)}
    for rel in SANITIZED:
        if os.path.lexists(HOST / rel):
            try:
                replaced[rel] = _sanitized(_regular(HOST / rel))
            except OSError:
                removed.add(rel)
    return replaced, sorted(removed)


def _regular(path: Path) -> bytes:
    """A regular file's bytes (no symlink followed, no FIFO opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def mask_layer(emu_dir: Path, state: Path) -> Path:
    """The layer that hides the host's private directories and credentials.

    Built once per content (a digest of what it hides names it), so a new registered state
    dir or a changed ``/etc/shadow`` makes a new one; :func:`refresh_mask` puts the current
    one under a clone.
    """
    hidden = list(MASKED)
    owned = [
        *(r for r in SECRET_DIRS if os.path.isdir(HOST / r)),
        os.path.realpath(state).lstrip("/"),
        *_state_dirs(PASSWD),
        *_homes(PASSWD),
    ]
    for rel in sorted(set(owned) - {""}, key=len):  # parents first: a child adds nothing
        if not any(rel == h or rel.startswith(h + "/") for h in hidden):
            hidden.append(rel)
    replaced, removed = _secrets()
    plan = [*hidden, "", *removed, ""]
    plan += [f"{rel}:{hashlib.sha256(data).hexdigest()}" for rel, data in sorted(replaced.items())]
    for rel in [*hidden[len(MASKED) :], *replaced]:
        with contextlib.suppress(OSError):
            st = os.lstat(HOST / rel)
            plan.append(f"{rel}:{st.st_uid}:{st.st_gid}:{st.st_mode:o}")
    digest = hashlib.sha256("\0".join(plan).encode()).hexdigest()[:16]
    final = emu_dir / "layers" / f"mask-{digest}"
    if (final / "complete").exists():
        return final / "fs"
    build = emu_dir / "layers" / f".build-{uuid.uuid4().hex}"
    fs = build / "fs"
    fs.mkdir(parents=True)
    for rel in hidden:
        _parents(fs, rel)
        _opaque_dir(fs / rel, 0o1777 if rel in ("tmp", "var/tmp") else 0o755)
        if rel == "root":
            os.chmod(fs / rel, 0o700)
        if rel not in MASKED:  # empty, but its owner's own, as on the host
            _like_host(fs / rel, rel)
    for rel, data in replaced.items():
        _parents(fs, rel)
        (fs / rel).write_bytes(data)
        _like_host(fs / rel, rel)
    for rel in removed:  # an overlay whiteout: a 0/0 character device
        _parents(fs, rel)
        os.mknod(fs / rel, stat.S_IFCHR, os.makedev(0, 0))
    (build / "complete").write_text("mask\n")
    try:
        build.rename(final)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)  # another thread or process won the race
    return final / "fs"


def _fingerprint() -> tuple[object, ...]:
    """What changes when the mask may have to: the registry, the account and credential
    files, the default state dir (a few ``stat`` calls, cheap enough for every clone)."""
    marks: list[object] = [os.environ.get("XDG_STATE_HOME"), os.environ.get("VMENV_STATE_DIR")]
    for path in (paths.REGISTRY, PASSWD, paths.ROOT_STATE, HOST / "etc/ssh", HOST / "etc/ssl"):
        try:
            st = os.stat(path)
            marks.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            marks.append(None)
    for rel in (*SANITIZED, *SECRET_DIRS, *REMOVED):
        try:
            st = os.lstat(HOST / rel)
            marks.append((st.st_ino, st.st_mtime_ns, st.st_mode))
        except OSError:
            marks.append(None)
    return tuple(marks)


_CURRENT: dict[tuple[Path, Path], tuple[tuple[object, ...], Path]] = {}


def refresh_mask(stack: list[str], emu_dir: Path, state: Path) -> list[str]:
    """``stack`` with its host mask (the layer right above :data:`HOST_BASE`) made current.

    A template keeps the mask of the moment it was built; state dirs registered since (other
    sessions that started later) must be hidden from its clones too. The mask is looked at
    again only when :func:`_fingerprint` changed.
    """
    if HOST_BASE not in stack:
        return stack
    at = stack.index(HOST_BASE) - 1
    old = Path(stack[at]) if at >= 0 else None
    if old is None or old.name != "fs" or not old.parent.name.startswith("mask-"):
        return stack
    if old.parent.parent != emu_dir / "layers":
        return stack
    mark = _fingerprint()
    known = _CURRENT.get((emu_dir, state))
    if known is None or known[0] != mark or not known[1].is_dir():
        known = (mark, mask_layer(emu_dir, state))
        _CURRENT[(emu_dir, state)] = known
    return [*stack[:at], str(known[1]), *stack[at + 1 :]]


def _homes(passwd: Path) -> list[str]:
    """Host home dirs to hide (relative to /): users (uid >= 1000) and services' data dirs."""
    found: list[str] = []
    try:
        lines = passwd.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(":")
        if len(parts) < 7 or not parts[2].isdigit() or not parts[5].startswith("/"):
            continue
        home = os.path.realpath(parts[5])
        if int(parts[2]) < 1000 and not home.startswith(_SERVICE_HOMES):
            continue
        if home == "/" or home in _NEVER or home.startswith(tuple(d + "/" for d in _NEVER_UNDER)):
            continue
        if os.path.isdir(home) and home.lstrip("/") not in found:
            found.append(home.lstrip("/"))
    return sorted(found)
