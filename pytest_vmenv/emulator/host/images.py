"""Images: what a guest's bottom layers are, and how a tarball becomes a rootfs safely.

* a recipe (``"debian-12"``, ``[images.NAME] base = ...``): the tree built from the Debian
  archive, shared by every backend (``<state>/images/<key>/rootfs``, see
  :mod:`pytest_vmenv.images`), used as the bottom layer as it is;
* ``"host"``: a read-only view of the host's ``/`` (:data:`rootfs.HOST_BASE`, mounted per
  guest), under a *mask layer* of opaque directories so that the host's ``/tmp``, ``/run``,
  home directories and pytest-vmenv's state dirs look empty (and stay writable in the
  guest), and without the host's credentials (below).
* a rootfs directory: used as the bottom layer as it is (never written: overlay writes go to
  the guest's upper dir).
* a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz`` file: unpacked once into
  ``<state>/emulator/images/<sha256>/rootfs``, by a separate Python process that has
  ``chroot``-ed into that directory first: whatever the archive says (``..`` or absolute
  names, a symlink followed by a write through it, a hard link to ``/etc/passwd``), every
  path resolves inside the rootfs. No path check can be fooled (such checks in ``tarfile``
  had bypasses, e.g. CVE-2025-4517). Symlinks are kept as they are (absolute ones too: they
  are resolved inside the guest); device nodes and FIFOs are skipped; setuid and setgid bits
  are dropped from files. Unprivileged, that process enters a user namespace (where it is
root) before ``chroot``; files of owners other than root become the caller's.

The host mask shows empty: :data:`MASKED`; every pytest-vmenv state dir on the host (this
session's, root's and each account's default one, ``$XDG_STATE_HOME``'s, and every one in the
host's registry, see :mod:`pytest_vmenv.paths`); ``/etc/ssl/private``; and the home directory
of every account in the host's ``/etc/passwd`` with uid >= 1000 or a home under ``/var/lib``,
``/srv`` or ``/opt`` (``/var/lib/postgresql``, say) that exists. It replaces ``/etc/shadow``
and ``/etc/gshadow`` (and their ``-`` backups) with copies in which every password is locked,
and removes the SSH host private keys (``/etc/ssh/ssh_host_*_key``) and
``/etc/security/opasswd``.

A rootfs (a directory, or a tarball once unpacked) is checked before a template is made of it
(:func:`check_image`): string commands run through ``/bin/sh -c``, so an image without a
shell would only fail later, at its first command, with an errno. Paths are resolved inside
the rootfs (:func:`resolve_inside`): a symlink is followed as the guest would follow it,
never out of the image into the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ... import paths
from ...errors import BackendUnavailable, ConfigError
from ..guest.mounts import HOST_BASE
from ..guest.pid1 import DEFAULT_PATH
from . import userns

if TYPE_CHECKING:
    from ...spec import MachineSpec

__all__ = [
    "base_stack",
    "check_image",
    "is_host",
    "mask_layer",
    "refresh_mask",
    "resolve_inside",
    "unpack_tarball",
]

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
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

# Runs as ``python -I -S -c``: open the archive, chroot into the destination, extract.
_EXTRACT = r"""
import os, sys, tarfile
for mod in ("gzip", "bz2", "lzma", "zlib", "copy", "grp", "pwd"):
    try:
        __import__(mod)
    except ImportError:
        pass
def keep(member, _path="/"):
    if member.isdev():  # character and block devices, FIFOs
        return None
    if not member.isdir():
        member.mode &= ~0o6000
    return member
def userns():  # unprivileged: chroot inside a user namespace where we are root
    import ctypes
    uid, gid = os.getuid(), os.getgid()
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1\n" % uid),
                       ("gid_map", "0 %d 1\n" % gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
try:
    tar = tarfile.open(sys.argv[1])
    if len(sys.argv) > 3:
        userns()
        chown = tar.chown
        def lenient(*args, **kwargs):  # only uid/gid 0 exist: other owners become ours
            try:
                chown(*args, **kwargs)
            except tarfile.ExtractError:
                pass
        tar.chown = lenient
    os.chroot(sys.argv[2])
    os.chdir("/")
    with tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall("/", numeric_owner=True, filter=keep)
        else:  # Python < 3.11.4: no filter argument
            tar.extractall("/", members=[m for m in tar if keep(m)], numeric_owner=True)
except Exception as exc:
    print("%s: %s" % (type(exc).__name__, exc), file=sys.stderr)
    sys.exit(1)
"""


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


def _extract(tarball: Path, dest: Path) -> None:
    """Unpack ``tarball`` into ``dest`` in a child process confined to it by ``chroot``."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _EXTRACT, str(tarball), str(dest)]
        + (["userns"] if userns.rootless() else []),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError(detail[-1] if detail else f"the unpacker exited with {proc.returncode}")


def unpack_tarball(tarball: Path, emu_dir: Path) -> Path:
    """Unpack ``tarball`` once (keyed by its content hash) and return the rootfs directory."""
    h = hashlib.sha256()
    with open(tarball, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    images = emu_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / h.hexdigest()[:32]
    if (final / "complete").exists():
        return final / "rootfs"
    with open(images / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "complete").exists():
            return final / "rootfs"
        userns.rmtree(final)
        rootfs = final / "rootfs"
        rootfs.mkdir(parents=True)
        os.chmod(final, 0o700)
        try:
            _extract(tarball, rootfs.resolve())
        except OSError as exc:
            userns.rmtree(final)
            raise ConfigError(f"emulator: cannot unpack image {str(tarball)!r}: {exc}") from exc
        (final / "complete").write_text(str(tarball) + "\n")
    return rootfs


def is_host(spec_image: str, image_config: Mapping[str, Any]) -> bool:
    """Whether an image is the built-in ``"host"`` (not a config entry of that name)."""
    return spec_image == "host" and not image_config


def base_stack(
    spec_image: str, image_config: Mapping[str, Any], emu_dir: Path, state: Path
) -> list[str]:
    """The bottom of a guest's layer stack (top first) for an image (a recipe's is its built
    tree: see :meth:`pytest_vmenv.images.ImageCache.using`)."""
    rootfs = image_config.get("rootfs")
    if is_host(spec_image, image_config):
        if userns.rootless():
            raise BackendUnavailable("emulator", userns.HOST_REASON)
        return [str(mask_layer(emu_dir, state)), HOST_BASE]
    candidate = Path(str(rootfs if rootfs is not None else spec_image)).expanduser()
    if candidate.is_dir():
        return [str(candidate.resolve())]
    if candidate.is_file() and candidate.name.endswith(_TAR_SUFFIXES):
        return [str(unpack_tarball(candidate.resolve(), emu_dir))]
    raise ConfigError(
        f"emulator: image {spec_image!r} (rootfs={rootfs!r}) is neither 'host', a rootfs "
        f"directory nor a tarball ({', '.join(_TAR_SUFFIXES)}). Choose one of: 'host', "
        "'debian-12', a path to a rootfs directory or tarball, or [tool.vmenv.images.NAME] "
        "emulator = { rootfs = PATH }"
    )


SYMLINK_HOPS = 40  # as the kernel's MAXSYMLINKS


def resolve_inside(root: Path, path: str, cwd: str = "/") -> Path | None:
    """Where ``path`` leads inside the guest whose ``/`` is ``root``, as a host path; None if
    it leads nowhere (a missing component, a loop, more than :data:`SYMLINK_HOPS` links).

    Symlinks are resolved lexically against ``root`` (an absolute target restarts at
    ``root``, ``..`` stops at it), so nothing outside ``root`` is ever looked at. An error
    other than "no such file" (a directory this user may not search) is raised.
    """
    pending = (path if path.startswith("/") else f"{cwd}/{path}").split("/")
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        hops += 1
        if hops > SYMLINK_HOPS:
            return None
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        pending = target.split("/") + pending
    return root.joinpath(*done)


def _interpreter(f: BinaryIO) -> str | None:
    """The program the kernel runs for this file: its ``#!`` line's, or an ELF file's
    dynamic loader (``PT_INTERP``); None if it needs none, "" for an empty ``#!``."""
    head = f.read(64)
    if head.startswith(b"#!"):
        words = (head + f.read(192))[2:].split(b"\n", 1)[0].split()
        return words[0].decode(errors="replace") if words else ""
    if not head.startswith(b"\x7fELF") or len(head) < 64 or head[4] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit: e_phoff at 32, e_phentsize and e_phnum at 54
        (phoff,) = struct.unpack_from(order + "Q", head, 32)
        entsize, count = struct.unpack_from(order + "HH", head, 54)
        layout = order + "I4xQ16xQ"  # p_type, p_offset, p_filesz
    else:
        (phoff,) = struct.unpack_from(order + "I", head, 28)
        entsize, count = struct.unpack_from(order + "HH", head, 42)
        layout = order + "II8xI"
    for i in range(min(count, 64)):
        f.seek(phoff + i * entsize)
        entry = f.read(struct.calcsize(layout))
        if len(entry) < struct.calcsize(layout):
            return None
        p_type, offset, size = struct.unpack(layout, entry)
        if p_type == 3:  # PT_INTERP
            f.seek(offset)
            return f.read(min(size, 4096)).rstrip(b"\0").decode(errors="replace") or None
    return None


def _unrunnable(root: Path, name: str) -> str | None:
    """Why the guest could not run ``name`` (searched in the guest's PATH), or None."""
    candidates = [name] if "/" in name else [f"{d}/{name}" for d in DEFAULT_PATH.split(":")]
    for candidate in candidates:
        found = resolve_inside(root, candidate)
        if found is None or not found.is_file():
            continue
        if not os.stat(found).st_mode & 0o111:
            return f"{candidate} is not executable"
        with open(found, "rb") as f:
            interpreter = _interpreter(f)
        if interpreter == "":
            return f"{candidate} names no interpreter on its #! line"
        if interpreter is not None:
            why = _unrunnable(root, interpreter)
            if why is not None:
                return f"{candidate} needs {interpreter}, but {why}"
        return None
    return f"{name} does not exist" + ("" if "/" in name else f" (looked in {DEFAULT_PATH})")


def check_image(stack: list[str], spec: MachineSpec) -> None:
    """Refuse a rootfs that cannot run what ``spec`` will run in it (a ConfigError).

    Every rootfs needs ``/bin/sh``: string commands (provision steps, ``ready=``,
    ``vm.run("...")``) run through ``/bin/sh -c``, and a test runs them whatever its
    template's steps were. Argv provision steps need their programs too, and the
    interpreters of their ``#!`` lines. The host image is the host's own ``/`` and is not
    checked; nor is a path this user may not search.
    """
    if not stack or HOST_BASE in stack:
        return
    root = Path(stack[-1])
    source = str(spec.image_config.get("rootfs") or spec.image)
    image = f"image {spec.image!r}" + (f" ({source})" if source != spec.image else "")
    if Path(source).is_file():
        image += f", unpacked in {root}"
    needs: dict[str, str] = {}  # program -> the first thing in the spec that runs it
    for step in spec.provision:
        program = "/bin/sh" if isinstance(step, str) else step[0]
        shown = step if isinstance(step, str) else shlex.join(step)
        needs.setdefault(program, f"provision step {shown!r}")
    if spec.ready is not None and not spec.ready.startswith("port:"):
        needs.setdefault("/bin/sh", f"ready={spec.ready!r}")
    try:
        if not any(os.scandir(root)):
            raise ConfigError(
                f"emulator: {image} is an empty directory; a rootfs needs at least /bin/sh "
                "(make one with mmdebstrap or debootstrap, or a busybox with its applet links)"
            )
        for program, user in needs.items():
            why = _unrunnable(root, program)
            if why is not None:
                advice = (
                    "a string runs through /bin/sh -c: add a shell to the image (e.g. busybox "
                    "and its sh link)"
                    if program == "/bin/sh"
                    else "add it to the image, or fix the step's program path"
                )
                raise ConfigError(f"emulator: {image} cannot run {user}: {why}; {advice}")
        why = None if "/bin/sh" in needs else _unrunnable(root, "/bin/sh")
        if why is not None:
            raise ConfigError(
                f"emulator: {image} has no shell: {why}. Every string command "
                '(vm.run("..."), provision steps, ready=) runs through /bin/sh -c; add a '
                "shell to the image (e.g. busybox and its sh link)"
            )
    except PermissionError:
        return  # the guest may see it another way (user namespace); its commands will tell
