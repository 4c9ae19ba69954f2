"""Command channels: which one a machine's commands take, and waiting for it to answer.

Contract: a machine's channel is decided when its template is built (:meth:`Channels.await_`:
the guest agent, SSH, or ``auto``: the agent if it answers within ``agent_wait`` seconds,
else SSH) and recorded with it; clones inherit it. :meth:`Channels.runner` gives either one
the same :class:`.remote.Runner` interface, so provisioning, commands and files take one
code path. :meth:`Channels.execute`/``copy_in``/``copy_out`` serve the protocol methods of a
:class:`MachineRef`; a command past its timeout is a ``CommandTimeout``.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import libvirt_qemu  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, MachineRef, Result
from pytest_vmenv.poll import poll_until

from .agent import Agent, AgentError, CommandTimedOut
from .config import Paths
from .connection import NAME, Hypervisor
from .remote import Remote, Runner

__all__ = ["Channels"]

_STOPPED = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


class Channels:
    """The agent and SSH channels of this backend's machines; thread-safe."""

    def __init__(self, hv: Hypervisor, paths: Paths) -> None:
        self.hv = hv
        self.paths = paths
        self._lock = threading.Lock()
        self._remote: Remote | None = None

    @property
    def remote(self) -> Remote:
        """Lease addresses and SSH channels (machines whose image has no agent)."""
        with self._lock:
            if self._remote is None:
                self._remote = Remote(self.hv, self.paths.console_tail)
            return self._remote

    def agent(self, dom: str, uri: str | None = None) -> Agent:
        """The guest agent of ``dom`` (each command looks the domain up anew)."""

        def send(text: str, timeout: int) -> str:
            return str(
                self.hv.call(
                    lambda c: libvirt_qemu.qemuAgentCommand(c.lookupByName(dom), text, timeout, 0),
                    uri,
                )
            )

        return Agent(send)

    def runner(
        self,
        dom: str,
        uri: str | None = None,
        ssh: Mapping[str, Any] | None = None,
        ip: str | None = None,
        name: str = "",
    ) -> Runner:
        """``dom``'s command channel: SSH to ``ip`` when ``ssh`` is set, else the agent."""
        if not ssh:
            return self.agent(dom, uri)
        if not ip:
            raise errors.BackendError(f"{NAME}: machine {name or dom!r} talks SSH but has no IP")
        return self.remote.runner(dom, ip, ssh, name)

    def of(self, ref: MachineRef) -> Runner:
        """The agent, or SSH to ``ref.ip`` for a machine whose image has no agent."""
        return self.runner(ref.id, ref.data.get("uri"), ref.data.get("ssh"), ref.ip, ref.name)

    # -- the protocol's commands and files ---------------------------------------------------
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
        try:
            return self.of(ref).execute(
                argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
            )
        except CommandTimedOut:
            raise errors.CommandTimeout(ref.name, list(argv), timeout or 0.0) from None

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None:
        src = Path(src)
        if src.is_dir():
            raise errors.BackendError(
                f"{NAME}: copy_in {src}: is a directory; only files can be copied "
                "(pack it with tar first)"
            )
        self.of(ref).write_file(dst, src.read_bytes(), src.stat().st_mode)

    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        self.of(ref).copy_out(src, Path(dst), max_size, ref.name)

    # -- waiting for a channel ---------------------------------------------------------------
    def wait_agent(self, dom: str, name: str, timeout: float, uri: str | None = None) -> None:
        """Wait until the guest agent answers (``guest-ping``); BootTimeout with the console."""
        agent = self.agent(dom, uri)
        last = ""

        def ping(last_try: bool) -> bool | None:
            nonlocal last
            try:
                agent.call("guest-ping", timeout=2)
                return True
            except (libvirt.libvirtError, AgentError) as exc:
                last = str(exc)
                if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in _STOPPED:
                    raise errors.BootTimeout(
                        f"{NAME}: machine {name!r} ({dom}) stopped while booting: {exc}",
                        self.paths.console_tail(dom),
                    ) from None
            if not last_try:
                return None
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}): the guest agent did not answer within "
                f"{timeout:g}s (last: {last}); the image needs qemu-guest-agent",
                self.paths.console_tail(dom),
            )

        poll_until(ping, timeout=timeout, what=f"the agent of {dom}", interval=0.03,
                   max_interval=0.1)  # fmt: skip

    def wait_systemd(self, dom: str, name: str, timeout: float, uri: str | None = None) -> None:
        """Wait until ``systemctl is-system-running --wait`` says ``running`` or ``degraded``
        (boot finished; a failed unit is the test's to see, not a boot failure)."""
        script = "systemctl is-system-running --wait 2>&1"
        try:
            result = self.agent(dom, uri).execute(["/bin/sh", "-c", script], timeout=timeout)
        except CommandTimedOut:
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}): systemd did not finish booting within "
                f"{timeout:g}s",
                self.paths.console_tail(dom),
            ) from None
        state = result.stdout.strip()
        if state not in ("running", "degraded"):
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}): systemd says {state!r} after booting "
                "(expected running or degraded)",
                self.paths.console_tail(dom),
            )

    def wait_cloud_init(self, dom: str, name: str, timeout: float) -> None:
        """Wait until cloud-init (if the image has it) is done with the seed, so the template
        is synced and stopped with its results (user, key, hostname) and clones, which keep
        the template's instance id, never run it half-way. cloud-init's own verdict is left
        to the test (``cloud-init status``)."""
        script = "command -v cloud-init >/dev/null 2>&1 || exit 0; cloud-init status --wait"
        try:
            self.agent(dom).execute(["/bin/sh", "-c", script], timeout=timeout)
        except CommandTimedOut:
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}): cloud-init was not done within {timeout:g}s",
                self.paths.console_tail(dom),
            ) from None

    def await_(
        self, dom: str, name: str, timeout: float, mode: str, ssh: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """Wait for the channel of a booting template: (SSH settings or None, SSH IP).

        ``mode`` ``auto``: the agent if it answers within ``agent_wait`` seconds, else SSH.
        """
        started = time.monotonic()
        if mode in ("agent", "auto"):
            wait = timeout if mode == "agent" else min(timeout, float(ssh["agent_wait"]))
            try:
                self.wait_agent(dom, name, wait)
                self.set_hostname(dom, name)
                return None, None
            except errors.BootTimeout:
                if mode == "agent":
                    raise
        left = max(1.0, timeout - (time.monotonic() - started))
        ip = self.remote.ready(dom, name, left, ssh)
        self.set_hostname_ssh(dom, name, ip, ssh)
        return ssh, ip

    def set_hostname(self, dom: str, name: str, uri: str | None = None) -> None:
        """Write the kernel's hostname with ``guest-file-write``: no process to spawn (a
        first exec right after a restore is slow under TCG, its code not yet translated)."""
        agent = self.agent(dom, uri)
        try:
            agent.write_file("/proc/sys/kernel/hostname", name.encode())
        except AgentError:
            code, _out = agent.run_simple(f"hostname {name}")
            if code != 0:
                raise errors.BackendError(f"{NAME}: cannot set the hostname of {name!r}") from None

    def set_hostname_ssh(self, dom: str, name: str, ip: str, ssh: Mapping[str, Any]) -> None:
        script = f"hostname {shlex.quote(name)} 2>/dev/null || true"
        self.remote.runner(dom, ip, ssh, name).execute(["/bin/sh", "-c", script], timeout=30)

    def forget(self, dom: str) -> None:
        """Drop ``dom``'s SSH channel (destroyed, or reverted: its TCP state is gone)."""
        if self._remote is not None:
            self._remote.forget(dom)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
