"""SSH as the command channel for images without a guest agent (the core's ``ssh`` extra).

Contract:

* :func:`channel_config` reads an image entry: ``agent = true`` (default: qemu-guest-agent
  only), ``false`` (SSH only) or ``"auto"`` (the agent if it answers
  ``guest-ping`` within ``agent_wait`` seconds, default 20, else SSH), with ``ssh_user``
  (default ``root`` for the tiny image, else ``user``/``vmenv``), ``ssh_key`` (the *private*
  key; its public half is ``ssh_key.pub`` or derived from it) and ``ssh_port`` (22). The
  channel is decided once, when the template is built, and kept in its record: clones
  inherit it.
* :class:`Remote` finds a guest's IPv4 in the libvirt network's DHCP leases
  (``interfaceAddresses(..._SRC_LEASE)``: there is no agent to ask) and keeps one
  :class:`pytest_vmenv.channel.SSHChannel` per domain (one connection, reused).
* :class:`SSHRunner` gives an SSH channel the :class:`.agent.Agent` interface the backend
  uses (``execute``/``write_file``/``read_file``), so templates, provisioning, commands and
  files take the same code path whichever channel a machine has.

SSH needs an address, so an SSH machine must join a network (``network="lan"``); its template
is built on a private network of its own that is removed with the build.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import libvirt  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import GET_LIMIT, OUTPUT_LIMIT, Result
from pytest_vmenv.poll import poll_until

from .agent import CommandTimedOut
from .connection import NAME, Hypervisor

if TYPE_CHECKING:
    from pytest_vmenv.channel import SSHChannel

__all__ = ["Remote", "Runner", "SSHRunner", "channel_config", "public_key", "ssh_of"]

_LEASE = libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE


class Runner(Protocol):
    """What the backend needs of a command channel (:class:`.agent.Agent` has it too)."""

    def execute(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result: ...

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None: ...

    def copy_out(
        self, path: str, dst: Path, max_size: int | None = GET_LIMIT, machine: str = "guest"
    ) -> None: ...


def public_key(private: Path) -> str:
    """``TYPE BASE64`` of ``private``'s public half (``private.pub``, else derived)."""
    pub = private.with_name(private.name + ".pub")
    if pub.is_file():
        text = pub.read_text()
    else:
        import asyncssh

        try:
            key = asyncssh.read_private_key(str(private))
        except asyncssh.KeyImportError as exc:
            raise errors.ConfigError(
                f"{NAME}: {private} is no private key asyncssh can read ({exc}); give the "
                "private half of an OpenSSH key pair (or put its public half in "
                f"{pub.name})"
            ) from None
        text = key.export_public_key("openssh").decode()
    fields = text.split()
    if len(fields) < 2:
        raise errors.ConfigError(f"{NAME}: {pub} is not an OpenSSH public key")
    return f"{fields[0]} {fields[1]}"


def channel_config(cfg: Mapping[str, Any], image: str, tiny: bool) -> tuple[str, dict[str, Any]]:
    """(``agent``/``ssh``/``auto``, the SSH settings or {}) of image entry ``cfg``."""
    agent = cfg.get("agent", True)
    mode = "agent" if agent is True else "ssh" if agent is False else str(agent)
    where = f"images.{image}.libvirt"
    if mode not in ("agent", "ssh", "auto"):
        raise errors.ConfigError(f'{NAME}: {where}.agent = {agent!r}: use true, false or "auto"')
    if mode == "agent":
        return mode, {}
    key = cfg.get("ssh_key")
    if not key:
        raise errors.ConfigError(
            f'{NAME}: {where}.agent = {agent!r} needs ssh_key = "path/to/private_key" (SSH is '
            "the command channel without an agent)"
        )
    private = Path(str(key)).expanduser().absolute()
    if private.suffix == ".pub":
        private = private.with_suffix("")
    if not private.is_file():
        raise errors.ConfigError(f"{NAME}: {where}.ssh_key = {str(key)!r}: no private key there")
    default_user = "root" if tiny else str(cfg.get("user", "vmenv"))
    return mode, {
        "user": str(cfg.get("ssh_user", default_user)),
        "key": str(private),
        "port": _number(cfg, "ssh_port", 22, where),
        "public": public_key(private),
        "agent_wait": float(_number(cfg, "agent_wait", 20.0, where)),
    }


def _number(cfg: Mapping[str, Any], key: str, default: float, where: str) -> Any:
    """``cfg[key]`` as a number of ``default``'s type; ConfigError naming it if it is none."""
    value = cfg.get(key, default)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise errors.ConfigError(
            f"{NAME}: {where}.{key} = {value!r}: give a number (default {default!r})"
        ) from None


def ssh_of(labels: Mapping[str, str]) -> dict[str, Any] | None:
    """The SSH settings recorded in a domain's labels (None: an agent machine)."""
    if labels.get("channel") != "ssh":
        return None
    return {
        "user": labels.get("ssh_user", "root"),
        "key": labels.get("ssh_key", ""),
        "port": int(labels.get("ssh_port") or 22),
    }


class SSHRunner:
    """An :class:`SSHChannel` with the agent's interface (commands run as root by default)."""

    def __init__(self, channel: SSHChannel, ssh_user: str) -> None:
        self.channel = channel
        self.ssh_user = ssh_user

    def execute(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        from pytest_vmenv.errors import CommandTimeout

        user = user or "root"
        if user != self.ssh_user and self.ssh_user == "root":
            # busybox has no runuser: switch as the agent path does, with su
            argv = ["su", "-s", "/bin/sh", "-c", shlex.join(argv), user]
            user = "root"
        try:
            return self.channel.execute(
                argv, input=input, env=env, user=user, timeout=timeout, max_output=max_output
            )
        except CommandTimeout:
            raise CommandTimedOut(shlex.join(argv)) from None

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        script = 'cat >"$1"' + (f' && chmod {mode & 0o7777:o} "$1"' if mode is not None else "")
        result = self.execute(["/bin/sh", "-c", script, "sh", path], input=data)
        if result.exit_code != 0:
            raise errors.BackendError(
                f"{NAME}: writing {path} over SSH failed ({result.exit_code}): {result.stderr}"
            )

    def copy_out(
        self, path: str, dst: Path, max_size: int | None = GET_LIMIT, machine: str = "guest"
    ) -> None:
        """Stream ``path`` to ``dst`` over the channel (which names ``machine`` already)."""
        self.channel.copy_out(path, dst, max_size=max_size)


def _channel_class() -> type[SSHChannel]:
    """The core's :class:`SSHChannel` (imported on first use: it needs the ssh extra)."""
    try:
        from pytest_vmenv.channel import SSHChannel
    except ImportError as exc:
        raise errors.BackendError(
            f"{NAME}: this image's command channel is SSH, which needs the ssh extra: "
            f"pip install 'pytest-vmenv[ssh]' ({exc})"
        ) from None
    return SSHChannel


class Remote:
    """Lease addresses and the SSH channels of this process's machines (thread-safe)."""

    def __init__(self, hv: Hypervisor, console_tail: Callable[[str], str]) -> None:
        self.hv = hv
        self.console_tail = console_tail
        self._channels: dict[str, SSHChannel] = {}
        self._lock = threading.Lock()

    def lease_ip(self, dom: str, name: str, timeout: float, uri: str | None = None) -> str:
        """``dom``'s IPv4 from the DHCP leases of its libvirt network; BootTimeout if none."""

        def look(conn: libvirt.virConnect) -> str | None:
            ifaces = conn.lookupByName(dom).interfaceAddresses(_LEASE, 0) or {}
            for iface in ifaces.values():
                for addr in iface.get("addrs") or []:
                    if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                        return str(addr["addr"])
            return None

        def leased(last_try: bool) -> str | None:
            ip = self.hv.call(look, uri)
            if ip or not last_try:
                return ip or None
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}) has no DHCP lease after {timeout:g}s "
                "(SSH needs its address: does the image run a DHCP client?)",
                self.console_tail(dom),
            )

        return poll_until(leased, timeout=timeout, what=f"a DHCP lease of {dom}", interval=0.1,
                          max_interval=0.2)  # fmt: skip

    def channel(self, dom: str, ip: str, ssh: Mapping[str, Any], name: str = "") -> SSHChannel:
        """The (cached) channel to ``dom`` at ``ip``; a new one if the address changed."""
        with self._lock:
            chan = self._channels.get(dom)
            if chan is not None and chan.host == ip:
                return chan
            if chan is not None:
                chan.close()
            chan = _channel_class()(
                ip,
                int(ssh.get("port", 22)),
                str(ssh["user"]),
                key=str(ssh["key"]),
                machine=name or dom,
            )
            self._channels[dom] = chan
            return chan

    def runner(self, dom: str, ip: str, ssh: Mapping[str, Any], name: str = "") -> SSHRunner:
        return SSHRunner(self.channel(dom, ip, ssh, name), str(ssh["user"]))

    def ready(
        self, dom: str, name: str, timeout: float, ssh: Mapping[str, Any], uri: str | None = None
    ) -> str:
        """Wait for a lease and an SSH login on ``dom``; its IP. BootTimeout with the console."""
        from pytest_vmenv.channel import SSHUnreachable

        deadline = time.monotonic() + timeout
        ip = self.lease_ip(dom, name, timeout, uri)
        chan = self.channel(dom, ip, ssh, name)
        try:
            chan.wait_ready(max(1.0, deadline - time.monotonic()))
        except SSHUnreachable as exc:
            raise errors.BootTimeout(
                f"{NAME}: machine {name!r} ({dom}) at {ip}: no SSH login within {timeout:g}s: "
                f"{exc}",
                self.console_tail(dom),
            ) from None
        return ip

    def forget(self, dom: str) -> None:
        """Close and drop ``dom``'s channel (destroyed, or reverted: the TCP state is gone)."""
        with self._lock:
            chan = self._channels.pop(dom, None)
        if chan is not None:
            chan.close()

    def close(self) -> None:
        for dom in list(self._channels):
            self.forget(dom)
