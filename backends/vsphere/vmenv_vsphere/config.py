"""The vSphere backend's settings: ``[tool.vmenv.backends.vsphere]`` over ``GOVC_*`` variables.

Keys of the table (all optional but ``host``): ``host`` (name, ``host:port`` or an
``https://host/sdk`` URL), ``user``, ``password``, ``insecure`` (skip certificate checks:
explicit, warned about once), ``ca_file`` (a PEM bundle to verify the server with),
``datacenter``, ``cluster`` or ``resource_pool``, ``datastore``, ``folder`` (where the
session folders and templates go), ``network`` (default port group), ``ssh_user``,
``ssh_key``, ``ssh_password``, ``ssh_port``, ``known_hosts``, ``guest_user``,
``guest_password`` (VMware Tools guest operations), ``task_timeout`` (seconds a task may
take), ``ip_timeout`` (seconds to wait for the guest's IP).

The conventional govc variables fill what the table leaves out: ``GOVC_URL`` (may carry
``user:password@``), ``GOVC_USERNAME``, ``GOVC_PASSWORD``, ``GOVC_INSECURE``,
``GOVC_DATACENTER``. Passwords are held in :class:`Secret`, whose repr and str are
``'***'``: a settings object can be logged, shown or put in an exception safely.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from pytest_vmenv.errors import ConfigError

__all__ = ["Secret", "VsphereConfig"]

_KEYS = frozenset(
    [
        "host",
        "user",
        "password",
        "insecure",
        "ca_file",
        "datacenter",
        "cluster",
        "resource_pool",
        "datastore",
        "folder",
        "network",
        "ssh_user",
        "ssh_key",
        "ssh_password",
        "ssh_port",
        "known_hosts",
        "guest_user",
        "guest_password",
        "task_timeout",
        "ip_timeout",
    ]
)


class Secret:
    """A string that never shows itself: ``repr``/``str``/format give ``'***'``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value, for the one call that needs it (a login)."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled into a worker's message or a cache
        raise TypeError("a Secret cannot be pickled")


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class VsphereConfig:
    """Validated settings (see the module docstring)."""

    host: str = ""
    port: int = 443
    user: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    insecure: bool = False
    ca_file: str | None = None
    datacenter: str | None = None
    cluster: str | None = None
    resource_pool: str | None = None
    datastore: str | None = None
    folder: str | None = None
    network: str | None = None
    ssh_user: str = "root"
    ssh_key: str | None = None
    ssh_password: Secret = field(default_factory=lambda: Secret(""))
    ssh_port: int = 22
    known_hosts: str | None = None
    guest_user: str | None = None
    guest_password: Secret = field(default_factory=lambda: Secret(""))
    task_timeout: float = 600.0
    ip_timeout: float = 300.0

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/sdk"

    @property
    def uses_ssh(self) -> bool:
        """Commands go over SSH when a key or password for it is configured."""
        return bool(self.ssh_key or self.ssh_password)

    @classmethod
    def load(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> VsphereConfig:
        """Merge ``options`` (the config table) over the ``GOVC_*`` variables."""
        env = os.environ if environ is None else environ
        unknown = sorted(set(options) - _KEYS)
        if unknown:
            raise ConfigError(
                f"[tool.vmenv.backends.vsphere]: unknown key {unknown[0]!r}. "
                f"Choose one of: {', '.join(sorted(_KEYS))}"
            )
        raw = str(options.get("host") or env.get("GOVC_URL", "")).strip()
        host, port, url_user, url_password = _split_host(raw)
        user = str(options.get("user") or env.get("GOVC_USERNAME") or url_user)
        password = str(options.get("password") or env.get("GOVC_PASSWORD") or url_password)
        insecure = _flag(options.get("insecure", env.get("GOVC_INSECURE", False)))

        def opt(key: str) -> str | None:
            value = options.get(key)
            return None if value in (None, "") else str(value)

        def number(key: str, default: float) -> float:
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"[tool.vmenv.backends.vsphere]: {key}={value!r} must be a positive number"
                )
            return float(value)

        return cls(
            host=host, port=port, user=user, password=Secret(password), insecure=insecure,
            ca_file=opt("ca_file"), datacenter=opt("datacenter") or env.get("GOVC_DATACENTER"),
            cluster=opt("cluster"), resource_pool=opt("resource_pool"),
            datastore=opt("datastore"), folder=opt("folder"), network=opt("network"),
            ssh_user=opt("ssh_user") or "root", ssh_key=opt("ssh_key"),
            ssh_password=Secret(opt("ssh_password") or ""),
            ssh_port=int(number("ssh_port", 22)), known_hosts=opt("known_hosts"),
            guest_user=opt("guest_user"), guest_password=Secret(opt("guest_password") or ""),
            task_timeout=number("task_timeout", 600), ip_timeout=number("ip_timeout", 300),
        )  # fmt: skip


def _split_host(raw: str) -> tuple[str, int, str, str]:
    """``[https://][user[:pass]@]host[:port][/sdk]`` -> host, port, user, password."""
    if not raw:
        return "", 443, "", ""
    parts = urlsplit(raw if "://" in raw else "https://" + raw)
    if parts.scheme not in ("https", "http"):
        raise ConfigError(f"vsphere host: scheme {parts.scheme!r} is not https")
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigError("vsphere host: the port is not a number") from None
    return (
        parts.hostname or "",
        port,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
    )
