"""The ``ssh`` variant of the tiny image: dropbear instead of qemu-ga (no guest agent at all).

Contract: :func:`dropbear_files` returns what :func:`.tiny._rootfs` adds to the root tree of
``tiny-ssh``: dropbear (``dropbear-bin`` from ``apt-get download``) and the libraries it links
(the extracted ``libtomcrypt1``/``libtommath1``, the rest from the host), a host key made at
build time with the package's own ``dropbearkey``, an ``inittab`` that respawns dropbear, and
an ``rcS`` that writes ``/root/.ssh/authorized_keys`` from the kernel command line
(``vmenv.ssh_key=TYPE,BASE64``: the public key with its space as a comma), so one built image
serves any key (the key travels in the template's boot record, see :mod:`.remote`).

busybox's ``setsid`` has no ``-w`` (and busybox ``sh`` runs its applets directly, so no shim
on ``PATH`` can stand in): :mod:`.remote` drops the flag from the core's wrapper instead.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HOST_KEYS", "PACKAGES", "dropbear_files"]

PACKAGES = ("dropbear-bin", "libtomcrypt1", "libtommath1")
# dropbear 2022.83 offers rsa-sha2-* even with no RSA key loaded and then fails an assertion
# when a client picks it, so it gets both kinds
HOST_KEYS = {
    "ed25519": "etc/dropbear/dropbear_ed25519_host_key",
    "rsa": "etc/dropbear/dropbear_rsa_host_key",
}
_DROPBEAR = "/usr/sbin/dropbear -F -E -s -j -k -p 22 " + " ".join(
    f"-r /{k}" for k in HOST_KEYS.values()
)
_KEYS = """for a in $(cat /proc/cmdline); do
  case $a in vmenv.ssh_key=*)
    mkdir -p /root/.ssh; chmod 700 /root/.ssh
    echo "${a#*=}" | tr , ' ' >/root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys;;
  esac
done
"""


def dropbear_files(
    roots: list[Path], work: Path, rcs: str, inittab: str, ready_marker: str
) -> tuple[dict[str, tuple[bytes, int]], str, str]:
    """(files to add as ``rel -> (data, mode)``, the inittab, the rcS) for the ssh variant.

    ``roots`` are the extracted :data:`PACKAGES`; ``work`` is a scratch dir on the host.
    """
    from .tiny import TinyBuildError, _libraries, _run

    def find(rel: str) -> Path:
        for root in roots:
            if (root / rel).is_file():
                return root / rel
        raise TinyBuildError(f"{rel} is in none of the packages {PACKAGES}")

    libdirs = tuple(d for r in roots for d in r.glob("usr/lib/*-linux-gnu"))
    env = {"LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs), "PATH": "/usr/bin:/bin"}
    dropbear, dropbearkey = find("usr/sbin/dropbear"), find("usr/bin/dropbearkey")
    files: dict[str, tuple[bytes, int]] = {}
    for kind, rel in HOST_KEYS.items():
        key = work / f"host_key_{kind}"
        key.unlink(missing_ok=True)
        _run([str(dropbearkey), "-t", kind, "-f", str(key)], env=env)
        files[rel] = (key.read_bytes(), 0o600)
    files |= {
        "usr/sbin/dropbear": (dropbear.read_bytes(), 0o755),
        "etc/shells": (b"/bin/sh\n", 0o644),
    }
    for lib in _libraries(dropbear, libdirs):
        path = Path(lib)
        rel = lib.lstrip("/")
        for root in roots:
            if path.is_relative_to(root):
                rel = str(path.relative_to(root))
        files[rel] = (path.resolve().read_bytes(), 0o755)
    qga = next(line for line in inittab.splitlines() if "qemu-ga" in line)
    inittab = inittab.replace(qga, f"::respawn:{_DROPBEAR}")
    marker = f'echo "{ready_marker}"'
    return files, inittab, rcs.replace(marker, _KEYS + marker)
