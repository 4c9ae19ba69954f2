"""Subordinate ids (``/etc/subuid``, ``/etc/subgid``): the one check, and the id layout.

Unprivileged, a Debian tree holds files of root and of system users (``www-data`` is 33), so
both its build (``mmdebstrap --mode=unshare``) and a guest booted from it need a user
namespace that maps a full range of ids, which only the setuid helpers ``newuidmap`` and
``newgidmap`` may write from the ranges those files give the user. :func:`lookup` reads the
user's range as they do (the first line naming the user, by name or uid); :func:`problem`
says what is missing and how to add it (the builder and the emulator give the same message).

The layout is rootless podman's: id 0 is the user's own id, ids ``1..count`` are the
subordinate range (:meth:`SubIds.newuidmap`). Guest root is then the user (pytest can read,
write and remove what guest root makes, in the guest's own dirs), and a guest's other users
are subordinate ids that own nothing on the host outside the guest's trees.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIN_COUNT", "SubIds", "id_problem", "lookup", "problem", "unprivileged"]

MIN_COUNT = 65536
"""Ids a range must hold: every id a Debian package may use (``nobody`` is 65534)."""


@dataclass(frozen=True)
class SubIds:
    """The user's ids and subordinate ranges (start, count), and the helpers' paths."""

    uid: int
    gid: int
    uids: tuple[int, int]
    gids: tuple[int, int]
    newuidmap: str
    newgidmap: str

    def uid_map(self) -> list[str]:
        """``newuidmap PID`` arguments: 0 -> the user, 1..count -> the range."""
        return ["0", str(self.uid), "1", "1", str(self.uids[0]), str(self.uids[1])]

    def gid_map(self) -> list[str]:
        return ["0", str(self.gid), "1", "1", str(self.gids[0]), str(self.gids[1])]

    def unshare_argv(self) -> list[str]:
        """util-linux ``unshare`` in a user namespace of this layout (a host-side command on
        trees holding subordinate ids: remove, copy, shift)."""
        return [
            "unshare",
            "--map-root-user",
            f"--map-users={self.uids[0]},1,{self.uids[1]}",
            f"--map-groups={self.gids[0]},1,{self.gids[1]}",
            "--",
        ]

    def to_json(self) -> dict[str, list[int]]:
        return {"uids": list(self.uids), "gids": list(self.gids)}


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _range(path: Path, user: str, uid: int) -> tuple[int, int] | None:
    """The first range ``path`` gives ``user`` (by name or uid), if it holds MIN_COUNT ids."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            if not (parts[1].isdigit() and parts[2].isdigit()):
                return None
            start, count = int(parts[1]), int(parts[2])
            return (start, count) if count >= MIN_COUNT else None
    return None


def lookup(etc: Path = Path("/etc")) -> SubIds | None:
    """This user's subordinate ids and helpers, or None (see :func:`problem` for why)."""
    uid, gid = os.geteuid(), os.getegid()
    user = _user(uid)
    uids, gids = _range(etc / "subuid", user, uid), _range(etc / "subgid", user, uid)
    newuidmap, newgidmap = shutil.which("newuidmap"), shutil.which("newgidmap")
    if uids is None or gids is None or newuidmap is None or newgidmap is None:
        return None
    return SubIds(uid, gid, uids, gids, newuidmap, newgidmap)


def unprivileged() -> SubIds | None:
    """:func:`lookup` when this process is not root (only then are ids shifted: root's trees
    and guests keep the host's ids), else None."""
    return None if os.geteuid() == 0 else lookup()


def problem(purpose: str, etc: Path = Path("/etc")) -> str | None:
    """Why ``purpose`` (e.g. "building a Debian image unprivileged") cannot map a full id
    range here, and what to do; None if it can."""
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return (
            f"{purpose} needs newuidmap and newgidmap: apt-get install "
            "--no-install-recommends uidmap, or run as root"
        )
    uid = os.geteuid()
    user = _user(uid)
    missing = [f for f in ("subuid", "subgid") if _range(etc / f, user, uid) is None]
    if not missing:
        return None
    files = " and ".join(f"{etc}/{f}" for f in missing)
    return (
        f"{purpose} needs subordinate ids for user {user} (uid {uid}), and {files} give none "
        f"(at least {MIN_COUNT} are needed): as root, run `usermod --add-subuids "
        f"100000-165535 --add-subgids 100000-165535 {user}`, or run as root"
    )


def id_problem(rootfs: Path) -> str | None:
    """Why this process cannot boot the built tree ``rootfs`` with its owners right, or None.

    A tree built as root holds files of the host's root and system users; one built
    unprivileged holds the user's own and subordinate ids (``ids`` in its ``recipe.json``).
    Neither can be seen right by the other kind of guest, and an unprivileged guest needs the
    ranges the tree was built with (a changed ``/etc/subuid`` moves every owner).
    """
    try:
        info = json.loads((rootfs.parent / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    built = info.get("ids") if isinstance(info, dict) else None
    what = f"the image in {rootfs.parent}"
    if os.geteuid() == 0:
        if built is None:
            return None
        return (
            f"{what} was built unprivileged (its files belong to a user's subordinate ids): "
            "build it as root in root's own state dir (VMENV_STATE_DIR), or run unprivileged"
        )
    if built is None and _owner(rootfs) not in (0, None):
        return (
            f"{what} was built unprivileged by an earlier version, in mmdebstrap's own id "
            "layout: remove it (`vmenv images rm`) so it is rebuilt in the guests' layout"
        )
    if built is None:
        return (
            f"{what} was built as root (its files belong to the host's root and system users, "
            "which an unprivileged guest cannot map): use a state dir of your own "
            "(VMENV_STATE_DIR), where it is built as this user"
        )
    ids = lookup()
    if ids is None or ids.to_json() != built:
        now = ids.to_json() if ids is not None else "none"
        return (
            f"{what} was built with the subordinate ids {built}, and this user has {now} "
            f"now: remove it (`vmenv images rm`) so it is rebuilt with the current ones"
        )
    return None


def _owner(path: Path) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None
