"""The tiny image's root filesystem: busybox, init scripts, and the command channel's daemon.

Contract: :func:`write_rootfs` fills a :class:`.tree.SafeTree` for one :class:`Variant`.
Both variants share busybox (every applet a link to it), ``rcS`` (mounts, hostname and DHCP
on every interface, then :data:`READY_MARKER` on the console) and a busybox ``inittab``
that respawns the variant's one daemon:

* :data:`AGENT`: ``qemu-ga`` from ``qemu-guest-agent`` and the libraries it links (copied
  from the host, which has them as the dependencies of qemu).
* :data:`SSH`: dropbear (``dropbear-bin``) and the libraries it links (the extracted
  ``libtomcrypt1``/``libtommath1``, the rest from the host), host keys made at build time with
  the package's own ``dropbearkey``, and no agent at all. Its ``rcS`` writes
  ``/root/.ssh/authorized_keys`` from the kernel command line (``vmenv.ssh_key=TYPE,BASE64``:
  the public key with its space as a comma), so one built image serves any key (the key
  travels in the template's boot record, see :mod:`.remote`).

busybox's ``setsid`` has no ``-w`` (and busybox ``sh`` runs its applets directly, so no shim
on ``PATH`` can stand in): :mod:`.remote` drops the flag from the core's wrapper instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .debs import TinyBuildError, libraries, run
from .forwards import GUEST_ADDRESS, MAC
from .tree import SafeTree

__all__ = ["AGENT", "HOST_KEYS", "READY_MARKER", "SSH", "Variant", "write_rootfs"]

READY_MARKER = "vmenv: tiny ready"
Files = dict[str, tuple[bytes, int]]
"""Files to add to the tree: relative path -> (content, mode)."""

_RCS = (
    """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/qemu-ga /run/vmenv
for a in $(cat /proc/cmdline); do
  case $a in vmenv.hostname=*) hostname "${a#*=}";; esac
done
ip link set lo up
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
for i in /sys/class/net/*; do
  n=${i##*/}; [ "$n" = lo ] && continue
"""
    + f"""  if [ "$(cat "$i/address")" = {MAC} ]; then
    ip addr add {GUEST_ADDRESS}/24 dev "$n"; ip link set "$n" up; continue
  fi
"""
    + """  udhcpc -b -S -i "$n" -x "hostname:$(hostname)" -s /usr/share/udhcpc/default.script \\
    >/dev/null 2>&1
done
"""
)
_LOGIN_KEYS = """for a in $(cat /proc/cmdline); do
  case $a in vmenv.ssh_key=*)
    mkdir -p /root/.ssh; chmod 700 /root/.ssh
    echo "${a#*=}" | tr , ' ' >/root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys;;
  esac
done
"""
_UDHCPC = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done;;
esac
exit 0
"""
_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/nsswitch.conf": "hosts: files dns\n",
    "etc/resolv.conf": "",
}
_DIRS = (
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "root",
    "var/tmp",
    "var/lib",
    "mnt",
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "usr/share/udhcpc",
    "etc/init.d",
)
# dropbear 2022.83 offers rsa-sha2-* even with no RSA key loaded and then fails an assertion
# when a client picks it, so it gets both kinds
HOST_KEYS = {
    "ed25519": "etc/dropbear/dropbear_ed25519_host_key",
    "rsa": "etc/dropbear/dropbear_rsa_host_key",
}


def _agent_files(roots: list[Path], work: Path) -> Files:
    """qemu-ga (``roots[0]`` is the extracted ``qemu-guest-agent``) and the host's libraries."""
    qemu_ga = roots[0] / "usr" / "sbin" / "qemu-ga"
    files: Files = {"usr/sbin/qemu-ga": (qemu_ga.read_bytes(), 0o755)}
    for lib in libraries(qemu_ga):
        files.setdefault(lib.lstrip("/"), (Path(lib).resolve().read_bytes(), 0o755))
    return files


def _dropbear_files(roots: list[Path], work: Path) -> Files:
    """dropbear, its host keys (made in ``work``) and the libraries it links."""

    def find(rel: str) -> Path:
        for root in roots:
            if (root / rel).is_file():
                return root / rel
        raise TinyBuildError(f"{rel} is in none of the packages {SSH.packages}")

    libdirs = tuple(d for r in roots for d in r.glob("usr/lib/*-linux-gnu"))
    env = {"LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs), "PATH": "/usr/bin:/bin"}
    dropbear, dropbearkey = find("usr/sbin/dropbear"), find("usr/bin/dropbearkey")
    files: Files = {}
    for kind, rel in HOST_KEYS.items():
        key = work / f"host_key_{kind}"
        key.unlink(missing_ok=True)
        run([str(dropbearkey), "-t", kind, "-f", str(key)], env=env)
        files[rel] = (key.read_bytes(), 0o600)
    files["usr/sbin/dropbear"] = (dropbear.read_bytes(), 0o755)
    files["etc/shells"] = (b"/bin/sh\n", 0o644)
    for lib in libraries(dropbear, libdirs):
        path = Path(lib)
        rel = lib.lstrip("/")
        for root in roots:
            if path.is_relative_to(root):
                rel = str(path.relative_to(root))
        files[rel] = (path.resolve().read_bytes(), 0o755)
    return files


@dataclass(frozen=True)
class Variant:
    """One flavour of the tiny image: which daemon is the guest's command channel.

    ``stem`` and ``recipe`` name its directory (``tiny-2``): a new recipe is a new build.
    ``packages`` are downloaded and extracted for it (in this order, as ``files`` gets them);
    ``respawn`` is the daemon's command line in ``inittab``; ``login_keys``: ``rcS`` writes
    ``authorized_keys`` from the kernel command line.
    """

    stem: str
    recipe: str
    packages: tuple[str, ...]
    respawn: str
    files: Callable[[list[Path], Path], Files]
    login_keys: bool = False

    @property
    def dirname(self) -> str:
        return f"{self.stem}-{self.recipe}"

    def inittab(self) -> str:
        return (
            f"::sysinit:/etc/init.d/rcS\n::respawn:{self.respawn}\n"
            "::ctrlaltdel:/sbin/reboot\n::shutdown:/bin/umount -a -r\n"
        )

    def rcs(self) -> str:
        keys = _LOGIN_KEYS if self.login_keys else ""
        return f'{_RCS}{keys}echo "{READY_MARKER}" >/dev/console\n'


AGENT = Variant(
    stem="tiny",
    recipe="2",
    packages=("qemu-guest-agent",),
    respawn="/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0"
    " -t /run/qemu-ga",
    files=_agent_files,
)
SSH = Variant(
    stem="tiny-ssh",
    recipe="3",
    packages=("dropbear-bin", "libtomcrypt1", "libtommath1"),
    respawn="/usr/sbin/dropbear -F -E -s -j -k -p 22 "
    + " ".join(f"-r /{k}" for k in HOST_KEYS.values()),
    files=_dropbear_files,
    login_keys=True,
)


def write_rootfs(tree: SafeTree, busybox: Path, variant: Variant, roots: list[Path]) -> None:
    """The root tree of ``variant``; ``roots`` are its extracted :attr:`Variant.packages`."""
    written: dict[str, bytes] = {}

    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        if rel not in written:
            tree.write(rel, data, mode)
            written[rel] = data

    for d in _DIRS:
        tree.mkdir(d)
    tree.mkdir("tmp", 0o1777)
    tree.mkdir("var/tmp", 0o1777)
    put("bin/busybox", busybox.read_bytes(), 0o755)
    for rel, (data, mode) in variant.files(roots, tree.root.parent).items():
        put(rel, data, mode)
    for applet in run([str(busybox), "--list-full"]).split():
        if applet.strip("/") != "bin/busybox":
            tree.symlink("/bin/busybox", applet)
    for rel, text in {**_ETC, "etc/inittab": variant.inittab()}.items():
        put(rel, text.encode())
    put("etc/init.d/rcS", variant.rcs().encode(), 0o755)
    put("usr/share/udhcpc/default.script", _UDHCPC.encode(), 0o755)
    tree.symlink("/run", "var/run")
    tree.verify(written)
