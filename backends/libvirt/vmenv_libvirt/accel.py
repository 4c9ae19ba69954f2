"""KVM or TCG: decide once per host boot, with a probe guest, and remember why.

``/dev/kvm`` existing is no proof that KVM works: under a PVM hypervisor it opens, but a
stock guest kernel hangs at entry with one vCPU at 100%. So ``accel="auto"`` boots the tiny
image's kernel + initramfs with ``vmenv.probe=1`` as a KVM domain; the initramfs prints
:data:`~.tiny.PROBE_MARKER` and powers off at once. Marker within :data:`PROBE_SECONDS`:
KVM; else TCG (``<domain type='qemu'>``). The verdict and its reason are cached in
``<state>/libvirt/accel.json`` keyed by the host's boot id, so one boot probes once.
:class:`Accelerator` holds one backend's verdict, decided on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv.backend import boot_id
from pytest_vmenv.ledger import write_json
from pytest_vmenv.poll import poll_until

from .config import Paths
from .connection import Hypervisor
from .domains import render_domain
from .tiny import PROBE_MARKER, TinyImage, ensure_tiny

__all__ = ["PROBE_SECONDS", "Accelerator", "Verdict", "decide"]

PROBE_SECONDS = 8.0


@dataclass(frozen=True)
class Verdict:
    accel: str  # "kvm" or "tcg"
    reason: str
    cached: bool = False


def _kvm_usable() -> str | None:
    """Why /dev/kvm cannot be used (None if it can be opened)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened ({exc.strerror})"
    os.close(fd)
    return None


def _probe(hv: Hypervisor, tiny: TinyImage, run_dir: Path) -> Verdict:
    console = run_dir / f"kvm-probe-{os.getpid()}.log"
    console.unlink(missing_ok=True)
    name = f"vmenv-kvm-probe-{uuid.uuid4().hex[:8]}"
    xml = render_domain(
        None,
        name=name,
        uuid=str(uuid.uuid4()),
        accel="kvm",
        memory=128 * 1024**2,
        cpus=1,
        kernel=str(tiny.kernel),
        initrd=str(tiny.initrd),
        cmdline=tiny.cmdline + " vmenv.probe=1",
        disk=None,
        console=str(console),
        metadata="",
        on_reboot="destroy",
    )
    start = time.monotonic()
    try:
        hv.call(lambda c: c.createXML(xml, 0))
    except libvirt.libvirtError as exc:
        return Verdict("tcg", f"KVM domain failed to start: {exc}")

    def booted(last_try: bool) -> Verdict | None:
        with contextlib.suppress(FileNotFoundError):
            if PROBE_MARKER in console.read_text(errors="replace"):
                took = time.monotonic() - start
                return Verdict("kvm", f"a KVM probe guest booted in {took:.1f}s")
        if not last_try:
            return None
        return Verdict(
            "tcg",
            f"/dev/kvm opens but a KVM probe guest did not reach its initramfs within "
            f"{PROBE_SECONDS:g}s (nested or PVM virtualisation that hangs guest kernels)",
        )

    try:
        left = PROBE_SECONDS - (time.monotonic() - start)
        return poll_until(
            booted, timeout=left, what="the KVM probe", interval=0.05, max_interval=0.05
        )
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            hv.call(lambda c: c.lookupByName(name).destroy())
        console.unlink(missing_ok=True)


def decide(setting: str, hv: Hypervisor, tiny: TinyImage | None, run_dir: Path) -> Verdict:
    """The accelerator for ``setting`` ("auto", "kvm" or "tcg"), probing once per boot."""
    if setting == "tcg":
        return Verdict("tcg", 'accel = "tcg" was configured')
    if setting == "kvm":
        return Verdict("kvm", 'accel = "kvm" was configured')
    cache = run_dir / "accel.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("boot_id") == boot_id() and data.get("accel") in ("kvm", "tcg"):
            return Verdict(data["accel"], str(data.get("reason", "")), cached=True)
    except (OSError, ValueError):
        pass
    why_not = _kvm_usable()
    if why_not is not None:
        verdict = Verdict("tcg", why_not)
    elif tiny is None:
        verdict = Verdict("tcg", "no probe kernel available")
    else:
        verdict = _probe(hv, tiny, run_dir)
    write_json(
        cache,
        {"boot_id": boot_id(), "accel": verdict.accel, "reason": verdict.reason,
         "probed": time.time()},
    )  # fmt: skip
    return verdict


class Accelerator:
    """One backend's accelerator: ``setting`` ("auto", "kvm" or "tcg"), decided on first use
    (``auto`` builds the tiny image for its probe kernel); thread-safe."""

    def __init__(self, setting: str, hv: Hypervisor, paths: Paths) -> None:
        self.setting = setting
        self.hv = hv
        self.paths = paths
        self._lock = threading.Lock()
        self._verdict: Verdict | None = None

    def verdict(self) -> Verdict:
        """KVM or TCG, and why (probed once per host boot)."""
        with self._lock:
            if self._verdict is None:
                tiny = ensure_tiny(self.paths.images) if self.setting == "auto" else None
                self._verdict = decide(self.setting, self.hv, tiny, self.paths.root)
            return self._verdict

    def summary(self) -> list[str]:
        """Lines for a terminal summary: which accelerator and why (none before a decision)."""
        if self._verdict is None:
            return []
        v = self._verdict
        return [f"libvirt: {v.accel.upper()} ({v.reason}{'; cached' if v.cached else ''})"]
