"""How commands and files reach a VM's guest, and what "ready" means.

:class:`Channels` picks one channel per VM and keeps it: SSH (the core's
:class:`~pytest_vmenv.ssh.SSHChannel`) to the guest's address when ``ssh_key`` or
``ssh_password`` is configured, else VMware Tools guest operations (:mod:`.guestops`, with
``guest_user``/``guest_password``). The guest's address comes from the ``endpoint`` it is given
(the backend's ``guest_endpoint``, the one seam for a lab whose guests share an address).
A VM is ready once VMware Tools reports its IP and, when SSH is the channel, SSH answers there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_vmenv import errors
from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, MachineRef, Result
from pytest_vmenv.poll import poll_until

from . import vms
from .connection import Link
from .faults import NAME
from .guestops import GuestOpsChannel

if TYPE_CHECKING:
    from pytest_vmenv.ssh import SSHChannel

__all__ = ["Channels", "tools_ip"]

Endpoint = Callable[[MachineRef], tuple[str, int]]


def tools_ip(link: Link, vm: Any) -> str | None:
    """The guest IP VMware Tools reports for ``vm`` (None while it reports none)."""
    got = link.call(lambda: vms.props(link.conn, vm, ["guest.ipAddress"]).get("guest.ipAddress"))
    return str(got) if got else None


class Channels:
    """The open command channel of each VM (thread-safe); see the module docstring."""

    def __init__(self, link: Link, endpoint: Endpoint) -> None:
        self._link = link
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._open: dict[str, SSHChannel | GuestOpsChannel] = {}
        self._gone: set[str] = set()

    def __getitem__(self, moref: str) -> SSHChannel | GuestOpsChannel:
        """The channel open to VM ``moref`` (KeyError if none is)."""
        with self._lock:
            return self._open[moref]

    def get(self, ref: MachineRef) -> SSHChannel | GuestOpsChannel:
        """The channel to ``ref``'s guest, opened on first use."""
        if ref.id in self._gone:
            raise errors.MachineGone(f"{NAME}: machine {ref.name!r} ({ref.id}) was destroyed")
        with self._lock:
            channel = self._open.get(ref.id)
        if channel is not None:
            return channel
        channel = self._ssh(ref) if self._link.config.uses_ssh else self._guest(ref)
        with self._lock:
            return self._open.setdefault(ref.id, channel)

    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        """Run ``argv`` over the channel; a VM that is gone is :class:`MachineGone`."""
        from pytest_vmenv.ssh import SSHUnreachable

        try:
            return self.get(ref).execute(
                argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
            )
        except SSHUnreachable:
            conn = self._link.conn
            if not self._link.call(lambda: vms.exists(conn, vms.vm_by_id(conn, ref.id))):
                raise errors.MachineGone(
                    f"{NAME}: machine {ref.name!r} ({ref.id}) is gone"
                ) from None
            raise

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        self.get(ref).copy_in(Path(src), dst)

    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self.get(ref).copy_out(src, Path(dst), max_size=max_size)

    def ready(self, ref: MachineRef, vm: Any, timeout: float) -> MachineRef:
        """``ref`` with its IP once the guest is ready (see the module docstring)."""
        deadline = time.monotonic() + timeout
        ref = replace(ref, ip=self._wait_ip(vm, ref.name, timeout))
        if self._link.config.uses_ssh:
            from pytest_vmenv.ssh import SSHChannel, SSHUnreachable

            channel = self.get(ref)
            assert isinstance(channel, SSHChannel)
            try:
                channel.wait_ready(max(deadline - time.monotonic(), 1.0))
            except SSHUnreachable as exc:
                events = vms.events(self._link.conn, vm)
                raise errors.BootTimeout(f"{NAME}: {ref.name}: {exc}", events) from None
        return ref

    def _wait_ip(self, vm: Any, name: str, timeout: float) -> str:
        def ip(last_try: bool) -> str | None:
            got = tools_ip(self._link, vm)
            if got is None and last_try:
                raise errors.BootTimeout(
                    f"{NAME}: {name}: VMware Tools reported no IP within {timeout:g}s (is "
                    "open-vm-tools installed and running in the template, with a NIC on a "
                    "network that hands out addresses?)",
                    vms.events(self._link.conn, vm),
                )
            return got

        return poll_until(ip, timeout=timeout, what=f"{name}'s IP", interval=0.02, max_interval=2.0)

    def drop(self, moref: str) -> None:
        """Close the channel to VM ``moref`` (the VM was reverted, powered off or removed)."""
        with self._lock:
            channel = self._open.pop(moref, None)
        if channel is not None:
            channel.close()

    def forget(self, moref: str) -> None:
        """VM ``moref`` was destroyed: close its channel and refuse to open another."""
        self._gone.add(moref)
        self.drop(moref)

    def close(self) -> None:
        """Close every open channel."""
        with self._lock:
            morefs = list(self._open)
        for moref in morefs:
            self.drop(moref)

    def _ssh(self, ref: MachineRef) -> SSHChannel:
        from pytest_vmenv.ssh import SSHChannel

        cfg = self._link.config
        host, port = self._endpoint(ref)
        return SSHChannel(
            host, port, cfg.ssh_user, key=cfg.ssh_key,
            password=cfg.ssh_password.reveal() or None,
            known_hosts=cfg.known_hosts, machine=ref.name,
        )  # fmt: skip

    def _guest(self, ref: MachineRef) -> GuestOpsChannel:
        cfg = self._link.config
        if not (cfg.guest_user and cfg.guest_password):
            raise errors.BackendError(
                f"{NAME}: commands need SSH or VMware Tools guest operations: set ssh_key or "
                "ssh_password (SSH), or guest_user and guest_password (guest operations), in "
                "[tool.vmenv.backends.vsphere]"
            )
        conn = self._link.conn
        vm = vms.vm_by_id(conn, ref.id)
        status = self._link.call(
            lambda: vms.props(conn, vm, ["guest.toolsRunningStatus"]).get(
                "guest.toolsRunningStatus"
            )
        )
        if status != "guestToolsRunning":
            raise errors.BackendError(
                f"{NAME}: {ref.name}: VMware Tools is not running in the guest "
                f"(guest.toolsRunningStatus = {status}); guest operations need it: install and "
                "start open-vm-tools in the template, or set ssh_key or ssh_password"
            )
        return GuestOpsChannel(
            conn, vm, cfg.guest_user, cfg.guest_password, machine=ref.name,
            max_wait=cfg.task_timeout,
        )  # fmt: skip
