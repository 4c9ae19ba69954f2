"""Build one image tree with ``mmdebstrap``, publishing its progress as it goes.

``mmdebstrap --variant=minbase --include=...`` into a fresh directory: ``--mode=root`` as
root, ``--mode=unshare`` otherwise (a user namespace with the subordinate ids of
``/etc/subuid``/``/etc/subgid``, through ``newuidmap``). The host-specific files mmdebstrap
copies in (``/etc/hostname``, ``/etc/resolv.conf``) are emptied by customize hooks, so a tree
depends on its recipe and archive only. The builder's output is kept in the build's log;
its ``I:`` lines are the steps shown while it runs.

A build never outlives the thread that started it, nor leaves mounts behind: the builder runs
under ``setpriv --pdeathsig KILL``, and as root inside ``unshare --mount --propagation private
--pid --fork --kill-child`` (``--mode=root`` mounts ``/proc``, ``/sys`` and ``/dev/pts`` in the
tree while it installs; in a private mount namespace they vanish with it, and the PID
namespace takes apt and dpkg down with mmdebstrap).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, ProvisionError
from . import subids
from .progress import BuildEvent, publish
from .recipe import Recipe

__all__ = ["BUILD_TIMEOUT", "build_tree", "builder_problem", "mmdebstrap_argv"]

BUILD_TIMEOUT = 1800.0
"""Seconds a build may take before it is killed."""

_HOOKS = ('rm -f "$1/etc/hostname"', ': > "$1/etc/resolv.conf"')
_STEP = re.compile(r"^I: (.+?)(?:\.\.\.)?$")
_MISSING = re.compile(
    r"^E: (?:Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate)"
)


def builder_problem(etc: Path = Path("/etc")) -> str | None:
    """Why images cannot be built here (and what to do), or None if they can."""
    if shutil.which("mmdebstrap") is None:
        return (
            "Debian images are built with mmdebstrap, which is not installed: "
            "apt-get install --no-install-recommends mmdebstrap"
        )
    if os.geteuid() == 0:
        return None
    return subids.problem("building a Debian image unprivileged (mmdebstrap --mode=unshare)", etc)


def mmdebstrap_argv(recipe: Recipe, mirrors: Sequence[str], target: Path) -> list[str]:
    """The builder's command line for ``recipe`` into the (not yet existing) ``target``."""
    argv = [
        "mmdebstrap",
        f"--mode={'root' if os.geteuid() == 0 else 'unshare'}",
        "--variant=minbase",
        "--format=directory",
    ]
    includes = recipe.includes()
    if includes:
        argv.append(f"--include={','.join(includes)}")
    argv += [f"--customize-hook={hook}" for hook in _HOOKS]
    return [*_confined(), *argv, "--", recipe.suite, str(target), *mirrors]


def _confined() -> list[str]:
    """The wrapper that ties a build's life and mounts to its caller (module docstring)."""
    prefix = []
    ids = subids.unprivileged()
    if ids is not None:  # before setpriv: entering a user namespace clears the pdeathsig
        prefix += ids.unshare_argv()
    if shutil.which("setpriv"):
        prefix += ["setpriv", "--pdeathsig", "KILL", "--"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        prefix += ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                   "--kill-child", "--"]  # fmt: skip
    return prefix


def _step(text: str) -> str:
    """A step as shown: ``running --customize-hook in shell: sh -c '...'`` is ``running
    --customize-hook``; at most 80 characters."""
    return re.sub(r"^(running --[a-z-]+).*", r"\1", text)[:80]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _Output:
    """What mmdebstrap's output says, line by line: its current step, and the packages the
    archive does not have."""

    def __init__(self, image: str, key: str) -> None:
        self.image = image
        self.key = key
        self.step = "starting mmdebstrap"
        self.missing: list[str] = []
        self._pending = b""

    def tick(self, elapsed: float) -> None:
        """Still at the same step after ``elapsed`` seconds."""
        publish(BuildEvent(self.image, self.key, "building", self.step, elapsed, tick=True))

    def feed(self, chunk: bytes, elapsed: float) -> None:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for raw in lines:
            text = raw.decode("utf-8", "replace").strip()
            found = _MISSING.match(text)
            if found:
                self.missing.append(found.group(1) or found.group(2))
            match = _STEP.match(text)
            if match and _step(match.group(1)) != self.step:
                self.step = _step(match.group(1))
                publish(BuildEvent(self.image, self.key, "building", self.step, elapsed))


def _follow(proc: subprocess.Popen[bytes], log: BinaryIO, output: _Output, started: float) -> int:
    """Copy ``proc``'s output to ``log`` and ``output`` until it ends; its exit status.

    A tick is published every second without output; past ``BUILD_TIMEOUT`` it raises."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            elapsed = time.monotonic() - started
            if elapsed > BUILD_TIMEOUT:
                raise ProvisionError(
                    f"building image {output.image} took longer than {BUILD_TIMEOUT:g}s; killed"
                )
            if not sel.select(timeout=1.0):
                publish(
                    BuildEvent(
                        output.image, output.key, "building", output.step, elapsed, tick=True
                    )
                )
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return proc.wait()
            log.write(chunk)
            log.flush()
            output.feed(chunk, elapsed)


def build_tree(
    recipe: Recipe, key: str, mirrors: Sequence[str], target: Path, log_path: Path
) -> None:
    """Run mmdebstrap for ``recipe`` into ``target``, its output into ``log_path``.

    Publishes progress (see :mod:`.progress`); raises ConfigError for a package the archive
    does not have, ProvisionError (with the log's tail) for any other failure. ``target``'s
    parent is the build's scratch dir (its ``tmp`` is the builder's TMPDIR).
    """
    started = time.monotonic()
    image = recipe.describe()
    tmp = target.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp)}
    output = _Output(image, key)
    publish(BuildEvent(image, key, "building", output.step, 0.0))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            mmdebstrap_argv(recipe, mirrors, target),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            code = _follow(proc, log, output, started)
        except BaseException:
            _kill(proc)
            publish(BuildEvent(image, key, "failed", "interrupted", time.monotonic() - started))
            raise
        finally:
            proc.stdout.close()
    missing = output.missing
    elapsed = time.monotonic() - started
    if code == 0:
        return
    publish(BuildEvent(image, key, "failed", f"mmdebstrap exited with {code}", elapsed))
    if missing:
        names = ", ".join(repr(m) for m in dict.fromkeys(missing))
        raise ConfigError(
            f"image {image}: the archive has no package {names} for {recipe.suite} "
            f"(mirrors: {'; '.join(mirrors)}); check the name in packages="
        )
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
    raise ProvisionError(
        f"building image {image} with mmdebstrap failed (exit {code}):\n"
        + "\n".join("    " + line for line in tail)
    )
