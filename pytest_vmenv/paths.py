"""Where pytest-vmenv keeps its state: one stable directory, never /tmp.

``$VMENV_STATE_DIR``, else ``$XDG_STATE_HOME/pytest-vmenv``, else ``/var/lib/pytest-vmenv``
for root and ``~/.local/state/pytest-vmenv`` for everyone else. /tmp is avoided on purpose:
it may be a tmpfs that other tools clean or remount under a running session.

Every state dir in use is also noted in the host's registry, :data:`REGISTRY` (a root-owned
sticky directory, like /tmp: anyone may add an entry, only its owner or root may remove it),
so that the emulator can hide all of them from a guest's view of the host, not only its own
session's (:func:`registered`). An entry is one small file, ``<uid>-<hash>``, holding the
path; it counts only if its file and the directory it names belong to that uid (or to root),
so a user can hide nothing but their own directories. The registry is made by the first
root session; unprivileged sessions register only once it exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid
from pathlib import Path

__all__ = ["REGISTRY", "ROOT_STATE", "USER_STATE", "register", "registered", "state_dir"]

ROOT_STATE = Path("/var/lib/pytest-vmenv")
"""root's default state dir."""
USER_STATE = Path(".local/state/pytest-vmenv")
"""Everyone else's default, under their home."""
REGISTRY = Path("/var/lib/pytest-vmenv-state-dirs")
_MAX_ENTRIES = 4096
_DONE: set[tuple[str, str]] = set()


def state_dir() -> Path:
    """Return the state directory (created, mode 0700, registered)."""
    if env := os.environ.get("VMENV_STATE_DIR"):
        path = Path(env)
    elif xdg := os.environ.get("XDG_STATE_HOME"):
        path = Path(xdg) / "pytest-vmenv"
    elif os.geteuid() == 0:
        path = ROOT_STATE
    else:
        path = Path.home() / USER_STATE
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    register(path)
    return path


def _open_registry(create: bool) -> int:
    """A descriptor of :data:`REGISTRY` if it is a root-owned sticky dir (else OSError)."""
    if create and os.geteuid() == 0:
        with contextlib.suppress(FileExistsError):
            os.mkdir(REGISTRY, 0o700)
            os.chmod(REGISTRY, 0o1777)
    fd = os.open(REGISTRY, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != 0 or not st.st_mode & stat.S_ISVTX:
        os.close(fd)
        raise PermissionError(f"{REGISTRY} is not a root-owned sticky directory; ignored")
    return fd


def _read(dfd: int, name: str, uid: int) -> str | None:
    """The path an entry holds, if it is a small regular file of ``uid``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size > 4096:
            return None
        return os.fsdecode(f.read(4097)).removesuffix("\n")


def register(path: Path) -> None:
    """Note ``path`` (a state dir) in :data:`REGISTRY`; quietly nothing if that cannot be."""
    real = os.path.realpath(path)
    uid = os.geteuid()
    if (str(REGISTRY), real) in _DONE:
        return
    try:
        dfd = _open_registry(create=True)
    except OSError:
        return
    try:
        name = f"{uid}-{hashlib.sha256(os.fsencode(real)).hexdigest()[:24]}"
        for candidate in (name, f"{name}-{uuid.uuid4().hex[:8]}"):
            if _read(dfd, candidate, uid) == real:
                break
            if _exists(dfd, candidate):  # another user's file took our name: use another
                continue
            tmp = f".{candidate}.{uuid.uuid4().hex}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(tmp, flags, 0o644, dir_fd=dfd), "wb") as f:
                f.write(os.fsencode(real) + b"\n")
            os.rename(tmp, candidate, src_dir_fd=dfd, dst_dir_fd=dfd)
            break
        _DONE.add((str(REGISTRY), real))
    except OSError:
        pass
    finally:
        os.close(dfd)


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def registered() -> list[Path]:
    """Every state dir in :data:`REGISTRY` that exists and belongs to whoever registered it.

    Run as root, entries whose directory is gone are removed.
    """
    found: list[Path] = []
    try:
        dfd = _open_registry(create=False)
    except OSError:
        return found
    try:
        for name in sorted(os.listdir(dfd))[:_MAX_ENTRIES]:
            owner = name.split("-", 1)[0]
            if name.startswith(".") or not owner.isdigit():
                continue
            text = _read(dfd, name, int(owner))
            if text is None or not text.startswith("/"):
                continue
            try:
                st = os.stat(text)
            except FileNotFoundError:
                if os.geteuid() == 0:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dfd)
                continue
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and int(owner) in (0, st.st_uid):
                found.append(Path(os.path.realpath(text)))
    finally:
        os.close(dfd)
    return found
