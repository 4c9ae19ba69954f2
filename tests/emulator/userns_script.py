"""Run by test_unprivileged.py as an unprivileged user: the emulator in its userns mode.

``python userns_script.py ROOTFS WORKDIR``; ``VMENV_STATE_DIR`` is set. Prints one JSON line
``{"ok": true, "zygotes": [...]}`` at the end; any failed check raises (exit code != 0).
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

from pytest_vmenv import errors
from pytest_vmenv.backend import MachineRef, Network, Session
from pytest_vmenv.emulator import EmulatorBackend, LimitNotApplied
from pytest_vmenv.spec import MachineSpec


def run(b: EmulatorBackend, ref: MachineRef, cmd: str, stdin: bytes | None = None) -> str:
    res = b.execute(ref, ["/bin/sh", "-c", cmd], input=stdin, timeout=30)
    assert res.exit_code == 0, (cmd, res)
    return res.stdout


def expect_unavailable(b: EmulatorBackend, spec: MachineSpec, s: Session, text: str) -> str:
    try:
        b.build_template(spec, f"refused-{spec.name}", s)
    except errors.BackendUnavailable as exc:
        assert text in exc.reason, exc.reason
        return exc.reason
    raise AssertionError(f"{spec} was not refused")


def main() -> None:
    rootfs, work = Path(sys.argv[1]), Path(sys.argv[2])
    assert os.geteuid() != 0
    state = Path(os.environ["VMENV_STATE_DIR"])
    b = EmulatorBackend(state_dir=state)
    b.check()
    s = Session(id="userns-test", state_dir=state)
    out: dict[str, object] = {}
    host = MachineSpec(name="h")
    out["host"] = expect_unavailable(b, host, s, "image='host' needs root")
    assert out["host"] == b.unavailable_for(host)
    base = MachineSpec(name="base", image=str(rootfs), image_config={"rootfs": str(rootfs)})
    netspec = replace(base, name="n", network="lan")
    assert b.unavailable_for(base) is None
    assert b.unavailable_for(netspec) is None
    assert "image='host' needs root" in str(b.restrictions())
    assert "network=" not in str(b.restrictions())
    spec = replace(
        base,
        name="tpl",
        provision=(
            "echo built > /etc/built",
            "rm /etc/victim && rm -rf /opt/d && mkdir /opt/d && echo new > /opt/d/n",
        ),
    )
    zygotes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpl = b.build_template(spec, "userns-tpl", s)
        zygotes.append(b.zygote_pid)
        m1 = b.clone(tpl, replace(spec, name="m1"), s)
        m2 = b.clone(tpl, replace(spec, name="m2"), s)
    limits = [w for w in caught if issubclass(w.category, LimitNotApplied)]
    assert len(limits) == 1, [str(w.message) for w in caught]
    message = str(limits[0].message)
    assert "memory" in message and "unprivileged" in message, message
    out["limit_warning"] = message

    # commands: exit codes, stdout, stderr, stdin; root in the guest is us on the host
    assert run(b, m1, "id -u") == "0\n"
    res = b.execute(m1, ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (res.exit_code, res.stdout, res.stderr) == (7, "out\n", "err\n"), res
    assert run(b, m1, "cat", stdin=b"piped\x00bytes") == "piped\x00bytes"
    assert b.execute(m1, ["no-such-command"], timeout=30).exit_code == 127
    assert run(b, m1, "cat /proc/sys/kernel/hostname") == "m1\n"
    # the template's provision, whiteouts and opaque dirs included
    assert run(b, m1, "cat /etc/built") == "built\n"
    assert run(b, m1, "test -e /etc/victim || echo gone") == "gone\n"
    assert run(b, m1, "ls /opt/d") == "n\n"
    # /dev, /proc/sys and /sys
    assert run(b, m1, "echo x > /dev/null; head -c 5 /dev/urandom | wc -c").strip() == "5"
    assert run(b, m1, "echo 1 > /proc/sys/kernel/hostname 2>/dev/null || echo ro") == "ro\n"
    assert run(b, m1, "mkdir /sys/x 2>/dev/null || echo ro") == "ro\n"
    out["sys"] = run(b, m1, "ls /sys | head -3").split()
    res = b.execute(m1, ["id"], user="nobody", timeout=30)
    assert res.exit_code != 0 and "maps only root" in res.stderr, res
    out["other_user"] = res.stderr.strip()

    # files in and out
    src, dst = work / "in.bin", work / "out.bin"
    src.write_bytes(bytes(range(256)) * 100)
    b.copy_in(m1, src, "/root/in.bin")
    assert run(b, m1, "wc -c < /root/in.bin").strip() == "25600"
    b.copy_out(m1, "/root/in.bin", dst)
    assert dst.read_bytes() == src.read_bytes()

    # snapshot and revert (SIGSTOP freezer; user.overlay.* xattrs copied with the layer)
    run(b, m1, "echo 1 > /root/x; rm /etc/keep2; rm -rf /srv/e; mkdir /srv/e; touch /srv/e/z")
    run(b, m1, "mkdir /root/locked; touch /root/locked/f; chmod 500 /root/locked")
    snap = b.snapshot(m1, "s1")
    run(b, m1, "echo 2 > /root/y; echo changed > /root/x; echo back > /etc/keep2")
    b.revert(m1, snap)
    assert run(b, m1, "cat /root/x") == "1\n"
    assert run(b, m1, "test -e /root/y || echo none") == "none\n"
    assert run(b, m1, "test -e /etc/keep2 || echo gone") == "gone\n"
    assert run(b, m1, "ls /srv/e") == "z\n"
    # clones are independent
    assert run(b, m2, "test -e /root/x || echo none; cat /etc/keep2") == "none\nkeep\n"

    # destroy: idempotent, owned() forgets them
    for ref in (m1, m2):
        b.destroy(ref)
        b.destroy(ref)
    assert list(b.owned(s.id)) == []

    # network= works unprivileged: a clone on a LAN (the userspace switch) gets an address
    ntpl = b.build_template(netspec, "userns-net", s)
    nref = b.clone(ntpl, netspec, s, Network("lan", "1"))
    try:
        out["network"] = nref.ip
        assert str(nref.ip).startswith("10.77.0."), nref
    finally:
        b.destroy(nref)
    b.remove_template(ntpl)

    # a tarball image, unpacked in a user namespace
    tarball = work / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(rootfs, arcname=".")
    tspec = MachineSpec(name="tar", image=str(tarball), image_config={"rootfs": str(tarball)})
    ttpl = b.build_template(replace(tspec, provision=("echo t > /t",)), "userns-tar", s)
    m3 = b.clone(ttpl, tspec, s)
    assert run(b, m3, "cat /t; ls -l /bin/busybox | cut -c1-4") == "t\n-rwx\n"
    b.destroy(m3)
    # disk= cannot be enforced in a user namespace: warned, like memory; the guest still runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m4 = b.clone(tpl, replace(spec, name="m4", disk=64 << 20), s)
    disk_warnings = [str(w.message) for w in caught if "disk limit" in str(w.message)]
    assert disk_warnings and "not applied" in disk_warnings[0], [str(w.message) for w in caught]
    assert run(b, m4, "echo ok") == "ok\n"
    b.destroy(m4)
    for snapshot in (tpl, ttpl):
        b.remove_template(snapshot)
    zygotes.append(b.zygote_pid)
    b.close()
    out["ok"] = True
    out["zygotes"] = zygotes
    print(json.dumps(out))


if __name__ == "__main__":
    main()
