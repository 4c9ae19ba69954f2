"""The libvirt backend's plumbing: options, paths, booting a domain, waiting for its agent.

Split from :mod:`.backend` (the protocol methods) to keep both readable. Everything here
takes domain *names* and looks the domain up on the connection it is handed, so a dropped
connection can be re-opened under any call (see :class:`.connection.Hypervisor`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import libvirt_qemu  # type: ignore[import-untyped]

from pytest_vmenv import errors
from pytest_vmenv.backend import Session, Snapshot

from .accel import Verdict, decide
from .agent import Agent, AgentError
from .connection import NAME, Hypervisor, is_gone
from .domains import Pool, labels_xml, read_labels, render_domain, set_labels
from .network import Networks
from .remote import Remote, Runner, ssh_of
from .tiny import ensure_tiny

__all__ = ["LibvirtBase", "READY_SNAPSHOT"]

READY_SNAPSHOT = "vmenv-ready"
_ACCELS = ("auto", "kvm", "tcg")
_RUNNING = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING


class LibvirtBase:
    """State and helpers shared by the protocol methods; thread-safe.

    Options (``[tool.vmenv.backends.libvirt]``): ``uri`` (a string or a list: the scale-out
    path), ``accel`` (``auto``/``kvm``/``tcg``), ``ram_state`` (the RAM-state fast path,
    default true), ``domain_xml`` (your own Jinja2 domain template), ``state_dir``.
    """

    def __init__(
        self, options: Mapping[str, Any] | None = None, state_dir: Path | None = None
    ) -> None:
        self.options = dict(options or {})
        default = "qemu:///system" if os.geteuid() == 0 else "qemu:///session"
        uri = self.options.get("uri") or default
        self.uris = [uri] if isinstance(uri, str) else [str(u) for u in uri]
        self.accel_setting = str(self.options.get("accel", "auto"))
        if self.accel_setting not in _ACCELS:
            raise errors.ConfigError(
                f"{NAME}: accel={self.accel_setting!r}. Choose one of: {', '.join(_ACCELS)}"
            )
        self.ram_state = bool(self.options.get("ram_state", True))
        custom = self.options.get("domain_xml")
        self.domain_xml = Path(str(custom)) if custom else None
        if state_dir is None and self.options.get("state_dir"):
            state_dir = Path(str(self.options["state_dir"]))
        self._state_arg = state_dir
        self.hv = Hypervisor(self.uris)
        self._lock = threading.Lock()
        self._verdict: Verdict | None = None
        self._pool: Pool | None = None
        self._net: Networks | None = None
        self._remote: Remote | None = None

    # -- paths ----------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        if self._state_arg is None:
            from pytest_vmenv.paths import state_dir

            self._state_arg = state_dir()
        return self._state_arg

    @property
    def lv_dir(self) -> Path:
        path = self.state_dir / "libvirt"
        for sub in ("consoles", "templates", "pool"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    def console_path(self, dom: str) -> Path:
        return self.lv_dir / "consoles" / f"{dom}.log"

    @property
    def pool(self) -> Pool:
        with self._lock:
            if self._pool is None:
                self._pool = Pool(self.hv, self.lv_dir / "pool")
            return self._pool

    @property
    def networks(self) -> Networks:
        with self._lock:
            if self._net is None:
                self._net = Networks(self.hv, self.lv_dir)
            return self._net

    @property
    def remote(self) -> Remote:
        """Lease addresses and SSH channels (machines whose image has no agent)."""
        with self._lock:
            if self._remote is None:
                self._remote = Remote(self.hv, self.console_tail)
            return self._remote

    def verdict(self) -> Verdict:
        """KVM or TCG (probed once per host boot, see :mod:`.accel`)."""
        with self._lock:
            if self._verdict is None:
                tiny = ensure_tiny(self.lv_dir / "images") if self.accel_setting == "auto" else None
                self._verdict = decide(self.accel_setting, self.hv, tiny, self.lv_dir)
            return self._verdict

    def summary(self) -> list[str]:
        """Lines for a terminal summary: which accelerator and why."""
        if self._verdict is None:
            return []
        v = self._verdict
        return [f"libvirt: {v.accel.upper()} ({v.reason}{'; cached' if v.cached else ''})"]

    # -- domains ----------------------------------------------------------------------------
    @staticmethod
    def labels(session: Session, name: str, role: str, **extra: object) -> dict[str, object]:
        return {
            "session": session.id,
            "owner": session.owner,
            "created": f"{time.time():.3f}",
            "kept": "0",
            "name": name,
            "role": role,
            **extra,
        }

    def start(
        self,
        dom: str,
        labels: Mapping[str, object],
        boot: Mapping[str, Any],
        disk: Path,
        memory: int,
        cpus: int,
        network: str | None = None,
        uri: str | None = None,
        restore: bool = False,
        seed: str | None = None,
    ) -> None:
        """Define and start ``dom``; with ``restore``, from its disk's RAM-state snapshot."""
        console = self.console_path(dom)
        console.unlink(missing_ok=True)
        cmdline = str(boot.get("cmdline") or "")
        if boot.get("tiny"):
            cmdline += f" vmenv.hostname={labels['name']}"
        xml = render_domain(
            self.domain_xml,
            name=dom,
            uuid=str(uuid.uuid4()),
            accel=self.verdict().accel,
            memory=memory,
            cpus=cpus,
            kernel=boot.get("kernel"),
            initrd=boot.get("initrd"),
            cmdline=cmdline,
            disk=str(disk),
            seed=seed,
            network=network,
            mac="52:54:00:" + secrets.token_bytes(3).hex(":"),
            console=str(console),
            metadata=labels_xml(labels),
        )

        def go(conn: libvirt.virConnect) -> None:
            domain = conn.defineXML(xml)
            if not restore:
                domain.create()
                return
            snap_xml = (
                f"<domainsnapshot><name>{READY_SNAPSHOT}</name><state>running</state>"
                f"<creationTime>{int(time.time())}</creationTime>"
                "<memory snapshot='internal'/><disks><disk name='vda' snapshot='internal'/>"
                f"</disks>{xml}</domainsnapshot>"
            )
            snap = domain.snapshotCreateXML(
                snap_xml,
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
            )
            domain.revertToSnapshot(snap, _RUNNING)

        self.hv.call(go, uri)

    def stop(self, dom: str, uri: str | None = None) -> dict[str, str] | None:
        """Destroy and undefine ``dom`` (any process's); its labels, or None if it was gone."""

        def kill(conn: libvirt.virConnect) -> dict[str, str] | None:
            try:
                domain = conn.lookupByName(dom)
            except libvirt.libvirtError as exc:
                if is_gone(exc):
                    return None
                raise
            labels = read_labels(domain) or {}
            for step in (
                domain.destroy,
                lambda: domain.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                ),
            ):
                try:
                    step()
                except libvirt.libvirtError as exc:
                    if not is_gone(exc):
                        raise
            return labels

        return self.hv.call(kill, uri)

    def agent(self, dom: str, uri: str | None = None) -> Agent:
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

    def await_channel(
        self, dom: str, name: str, timeout: float, mode: str, ssh: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """Wait for the channel of a booting template: (SSH settings or None, SSH IP).

        ``auto``: the agent if it answers within ``agent_wait`` seconds, else SSH.
        """
        started = time.monotonic()
        if mode in ("agent", "auto"):
            wait = timeout if mode == "agent" else min(timeout, float(ssh["agent_wait"]))
            try:
                self.wait_ready(dom, name, wait)
                self.set_hostname(dom, name)
                return None, None
            except errors.BootTimeout:
                if mode == "agent":
                    raise
        left = max(1.0, timeout - (time.monotonic() - started))
        ip = self.remote.ready(dom, name, left, ssh)
        self.set_hostname_ssh(dom, name, ip, ssh)
        return ssh, ip

    def set_hostname_ssh(self, dom: str, name: str, ip: str, ssh: Mapping[str, Any]) -> None:
        script = f"hostname {shlex.quote(name)} 2>/dev/null || true"
        self.remote.runner(dom, ip, ssh, name).execute(["/bin/sh", "-c", script], timeout=30)

    def console_tail(self, dom: str, size: int = 8192) -> str:
        try:
            with open(self.console_path(dom), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, dom: str, name: str, timeout: float, uri: str | None = None) -> None:
        """Wait until the guest agent answers (``guest-ping``); BootTimeout with the console."""
        agent = self.agent(dom, uri)
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                agent.call("guest-ping", timeout=2)
                return
            except (libvirt.libvirtError, AgentError) as exc:
                last = str(exc)
                if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise errors.BootTimeout(
                        f"{NAME}: machine {name!r} ({dom}) stopped while booting: {exc}",
                        self.console_tail(dom),
                    ) from None
            if time.monotonic() >= deadline:
                raise errors.BootTimeout(
                    f"{NAME}: machine {name!r} ({dom}): the guest agent did not answer within "
                    f"{timeout:g}s (last: {last}); the image needs qemu-guest-agent",
                    self.console_tail(dom),
                )
            time.sleep(0.03)

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

    def wait_ip(self, dom: str, name: str, timeout: float, uri: str | None = None) -> str:
        agent = self.agent(dom, uri)
        deadline = time.monotonic() + timeout
        while True:
            for iface in agent.call("guest-network-get-interfaces") or []:
                if iface.get("name") == "lo":
                    continue
                for addr in iface.get("ip-addresses", []):
                    if addr.get("ip-address-type") == "ipv4":
                        return str(addr["ip-address"])
            if time.monotonic() >= deadline:
                raise errors.BootTimeout(
                    f"{NAME}: machine {name!r} got no IPv4 address within {timeout:g}s",
                    self.console_tail(dom),
                )
            time.sleep(0.1)

    def _ready(
        self,
        dom: str,
        name: str,
        timeout: float,
        uri: str | None,
        net: str | None,
        restored: bool,
        ssh: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Agent up, hostname set, clock fixed (after a restore), IP and /etc/hosts (lan).

        With ``ssh``: a DHCP lease and an SSH login instead of the agent (never restored).
        """
        if ssh:
            ip = self.remote.ready(dom, name, timeout, ssh, uri)
            self.set_hostname_ssh(dom, name, ip, ssh)
            if net:
                self._publish_hosts(net, dom, ip, uri)
            return ip
        self.wait_ready(dom, name, timeout, uri)
        self.set_hostname(dom, name, uri)
        if restored:
            # The restored clock is the snapshot's: set it, without waiting (guest-set-time
            # would run hwclock); a guest without `date -s` runs on with its clock behind.
            with contextlib.suppress(errors.VmenvError, AgentError, libvirt.libvirtError):
                self.agent(dom, uri).spawn(
                    ["/bin/sh", "-c", f"date -s @{int(time.time())} >/dev/null 2>&1"],
                    capture=False,
                )
        if net is None:
            return None
        ip = self.wait_ip(dom, name, min(timeout, 60.0), uri)
        self._publish_hosts(net, dom, ip, uri)
        return ip

    def _publish_hosts(self, net: str, dom: str, ip: str, uri: str | None) -> None:
        """Record ``ip`` in ``dom``'s labels; write every member's /etc/hosts (names work)."""

        def members(conn: libvirt.virConnect) -> list[tuple[str, dict[str, str]]]:
            found = []
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                labels = read_labels(domain)
                if labels is None or labels.get("network") != net:
                    continue
                if domain.name() == dom:
                    labels["ip"] = ip
                    set_labels(domain, labels)
                found.append((domain.name(), labels))
            return found

        group = self.hv.call(members, uri)
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{labels['ip']} {labels.get('name', '')}\n" for _d, labels in group if labels.get("ip")
        )
        for member, labels in group:
            ssh = ssh_of(labels)
            if ssh is not None and not labels.get("ip"):
                continue  # not up yet: it writes everyone's file itself when it is
            runner = self.runner(member, uri, ssh, labels.get("ip"), labels.get("name", ""))
            runner.write_file("/etc/hosts", hosts.encode())

    # -- template records ---------------------------------------------------------------
    def _snapshot_of(self, record: Mapping[str, Any]) -> Snapshot:
        return Snapshot(
            backend=NAME,
            name=str(record["name"]),
            handle=str(record["disk"]),
            key=str(record["key"]),
            data=dict(record),
        )

    def templates(self) -> list[Snapshot]:
        """Every template record, with ``session``/``owner``/``created``/``reuse`` in data."""
        found = []
        for path in sorted((self.lv_dir / "templates").glob("*.json")):
            record = self.load_record(path.stem)
            if record is not None and "disk" in record:
                found.append(self._snapshot_of(record))
        return found

    def _record(self, snapshot: Snapshot) -> Mapping[str, Any]:
        record = self.load_record(snapshot.key) or dict(snapshot.data)
        if not record.get("disk") or not Path(str(record["disk"])).exists():
            raise errors.BackendError(
                f"{NAME}: template {snapshot.key!r} is gone (its disk {snapshot.handle} does "
                "not exist); it was removed or never completed"
            )
        return record

    def record_path(self, key: str) -> Path:
        return self.lv_dir / "templates" / f"{key}.json"

    def load_record(self, key: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.record_path(key).read_text())
        except (OSError, ValueError):
            return None
        return data

    def save_record(self, key: str, record: Mapping[str, Any]) -> None:
        path = self.record_path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(record), indent=1))
        os.replace(tmp, path)
