"""The check that a rootfs can run what a spec will run in it, before a template is made.

A rootfs (a directory, or a tarball once unpacked) is checked before a template is made of it
(:func:`check_image`): string commands run through ``/bin/sh -c``, so an image without a
shell would only fail later, at its first command, with an errno. Paths are resolved inside
the rootfs (:func:`resolve_inside`): a symlink is followed as the guest would follow it,
never out of the image into the host.
"""

from __future__ import annotations

import os
import shlex
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ...errors import ConfigError
from ..guest.commands import DEFAULT_PATH
from ..guest.mounts import HOST_BASE

if TYPE_CHECKING:
    from ...spec import MachineSpec

__all__ = ["SYMLINK_HOPS", "check_image", "resolve_inside"]


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
