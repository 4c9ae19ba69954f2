"""Benchmark of the libvirt backend: the ratios of its Speed section, printed in one run.

    python bench/bench_libvirt.py [--rounds N] [--debian N | --only-debian N]

Needs a running libvirtd (``.ci/libvirt.sh start``) and pytest-vmenv-libvirt installed.
Every number is a median over rounds, measured against a baseline in the same run:

1. overlay creation on a 4 GiB base / on a 100 MiB base             (target <= 1.2)
2. cold boot to ready / RAM-state clone to ready, under TCG          (target >= 3)
3. the plugin's clone+ready+destroy / the same steps in raw libvirt  (target <= 1.2)
4. teardown of one machine, seconds                                  (target <= 0.5)
5. 8 clones in parallel: errors                                      (target 0)
6. with ``--debian N`` (or only that, ``--only-debian N``): on ``debian-12`` (systemd, the
   cloud kernel), cold boot to ready (``is-system-running``) / RAM-state clone to ready,
   interleaved over N rounds, with each side's range                 (target >= 3)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import libvirt
import libvirt_qemu
from vmenv_libvirt import LibvirtBackend
from vmenv_libvirt.domains import READY_SNAPSHOT, labels_xml, render_domain

from pytest_vmenv.backend import Session
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

SPEC = MachineSpec(image="tiny", backend="libvirt", memory=256 * 1024**2, timeout=120)
DEBIAN = MachineSpec(
    image="debian-12",
    backend="libvirt",
    memory=512 * 1024**2,
    timeout=900,
    image_config={"base": "debian-12", "packages": []},
)


def bench_debian(backend: LibvirtBackend, session: Session, rounds: int) -> tuple[str, float, bool]:
    """RAM-state clone vs cold boot of one debian-12 template, to ready; a result row."""
    cold_backend = LibvirtBackend({"ram_state": False})
    start = time.perf_counter()
    template = backend.build_template(DEBIAN, "bench-deb-" + session.id, session)
    print(f"template (debian-12, incl. image and RAM state): {time.perf_counter() - start:.1f} s")
    ready: dict[str, list[float]] = {"fast": [], "cold": []}
    try:
        for _ in range(rounds):
            for kind, b in (("fast", backend), ("cold", cold_backend)):
                t0 = time.perf_counter()
                ref = b.clone(template, DEBIAN, session)
                ready[kind].append(time.perf_counter() - t0)
                state = b.execute(ref, ["systemctl", "is-system-running"]).stdout.strip()
                b.destroy(ref)
                assert ref.data["fast"] is (kind == "fast") and state in ("running", "degraded")
    finally:
        backend.remove_template(template)
        cold_backend.close()
    fast, cold = statistics.median(ready["fast"]), statistics.median(ready["cold"])
    for kind, values in ready.items():
        print(f"debian-12 {kind:4s} to ready: median {statistics.median(values):.2f} s, "
              f"range {min(values):.2f}-{max(values):.2f} s over {rounds}")  # fmt: skip
    ratios = sorted(c / f for c, f in zip(ready["cold"], ready["fast"], strict=True))
    print(f"debian-12 cold/fast per round: {ratios[0]:.1f}-{ratios[-1]:.1f}")
    return "debian-12 cold boot / RAM-state clone", cold / fast, cold / fast >= 3


def median(fn: Callable[[], float], rounds: int) -> float:
    return statistics.median(fn() for _ in range(rounds))


def make_base(path: Path, virtual: int, data: int) -> None:
    """A qcow2 of ``virtual`` bytes with ``data`` bytes really written (spread in 4 chunks)."""
    if path.exists():
        return
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(virtual)
        for i in range(4):
            f.seek(i * (virtual // 4))
            f.write(os.urandom(data // 4))
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def bench_overlays(backend: LibvirtBackend, rounds: int) -> float:
    bases = backend.parts.paths.root / "bench"
    bases.mkdir(exist_ok=True)
    small, big = bases / "base-100M.qcow2", bases / "base-4G.qcow2"
    make_base(small, 100 * 1024**2, 64 * 1024**2)
    make_base(big, 4 * 1024**3, 256 * 1024**2)

    def one(base: Path) -> float:
        name = f"bench-{uuid.uuid4().hex[:8]}.qcow2"
        start = time.perf_counter()
        path = backend.parts.pool.create_overlay(name, base)
        took = time.perf_counter() - start
        backend.parts.pool.delete(path)
        return took

    one(small), one(big)  # warm the pool
    t_small, t_big = median(lambda: one(small), rounds * 4), median(lambda: one(big), rounds * 4)
    print(f"overlay on 100 MiB base: {t_small * 1000:.1f} ms; on 4 GiB base: {t_big * 1000:.1f} ms")
    return t_big / t_small


def raw_clone_cycle(backend: LibvirtBackend, record: dict[str, object]) -> float:
    """Clone + ready + destroy by hand with libvirt-python: the baseline of ratio 3."""
    conn = libvirt.open(backend.uris[0])
    start = time.perf_counter()
    dom_name = f"raw-{uuid.uuid4().hex[:8]}"
    pool = conn.storagePoolLookupByName(backend.parts.pool.name)
    vol = pool.createXML(
        f"<volume><name>{dom_name}.qcow2</name><capacity>{256 * 1024**2}</capacity>"
        "<target><format type='qcow2'/></target><backingStore>"
        f"<path>{record['disk']}</path><format type='qcow2'/></backingStore></volume>",
        0,
    )
    shutil.copyfile(str(record["ram"]), vol.path())
    boot = dict(record["boot"])  # type: ignore[call-overload]
    xml = render_domain(
        None,
        name=dom_name,
        uuid=str(uuid.uuid4()),
        accel=backend.parts.accel.verdict().accel,
        memory=SPEC.memory,
        cpus=1,
        kernel=boot["kernel"],
        initrd=boot["initrd"],
        cmdline=boot["cmdline"] + " vmenv.hostname=raw",
        disk=vol.path(),
        console=str(backend.parts.paths.console(dom_name)),
        metadata=labels_xml({"role": "bench"}),
    )
    dom = conn.defineXML(xml)
    snap = dom.snapshotCreateXML(
        f"<domainsnapshot><name>{READY_SNAPSHOT}</name><state>running</state>"
        f"<creationTime>{int(time.time())}</creationTime><memory snapshot='internal'/>"
        f"<disks><disk name='vda' snapshot='internal'/></disks>{xml}</domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
    )
    dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
    while True:
        try:
            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
            break
        except libvirt.libvirtError:
            time.sleep(0.03)

    def agent(command: str, **arguments: object) -> object:
        text = json.dumps({"execute": command, "arguments": arguments})
        return json.loads(libvirt_qemu.qemuAgentCommand(dom, text, 5, 0))["return"]

    # the same readiness steps: hostname, then the clock (not waited for)
    handle = agent("guest-file-open", path="/proc/sys/kernel/hostname", mode="w")
    agent("guest-file-write", handle=handle, **{"buf-b64": "cmF3"})
    agent("guest-file-close", handle=handle)
    agent("guest-exec", path="/bin/sh", arg=["-c", f"date -s @{int(time.time())}"])
    dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    vol.delete(0)
    backend.parts.paths.console(dom_name).unlink(missing_ok=True)
    took = time.perf_counter() - start
    conn.close()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--debian",
        type=int,
        default=0,
        metavar="N",
        help="also debian-12: RAM-state clone vs cold boot, N rounds",
    )
    parser.add_argument("--only-debian", type=int, default=0, metavar="N",
                        help="only the debian-12 comparison, N rounds")  # fmt: skip
    args = parser.parse_args()
    rounds = args.rounds
    backend = LibvirtBackend({})
    backend.check()
    if args.only_debian:
        session = Session(id="bench-" + uuid.uuid4().hex[:6], state_dir=state_dir())
        label, value, ok = bench_debian(backend, session, args.only_debian)
        print(f"\n{label:40s} {value:8.2f}   target >= 3    {'ok' if ok else 'MISSED'}")
        return 0 if ok else 1
    cold_backend = LibvirtBackend({"ram_state": False})
    session = Session(id="bench-" + uuid.uuid4().hex[:6], state_dir=state_dir())
    print(f"libvirt bench: {backend.uris[0]}, rounds={rounds}")
    overlay_ratio = bench_overlays(backend, rounds)
    start = time.perf_counter()
    template = backend.build_template(SPEC, "bench-" + session.id, session)
    print(
        f"template (tiny, incl. RAM state): {time.perf_counter() - start:.2f} s; "
        f"accel: {backend.summary()[0]}"
    )
    record = dict(template.data)
    if not record.get("ram"):
        print("no RAM state: the fast path is unavailable here")
        return 1
    try:
        ready: dict[str, list[float]] = {"fast": [], "cold": []}
        teardown: list[float] = []
        cycle: list[float] = []
        for _ in range(rounds):
            for kind, b in (("fast", backend), ("cold", cold_backend)):
                t0 = time.perf_counter()
                ref = b.clone(template, SPEC, session)
                t1 = time.perf_counter()
                b.destroy(ref)
                t2 = time.perf_counter()
                ready[kind].append(t1 - t0)
                teardown.append(t2 - t1)
                if kind == "fast":
                    cycle.append(t2 - t0)
        raw = [raw_clone_cycle(backend, record) for _ in range(rounds)]
        fast, cold = statistics.median(ready["fast"]), statistics.median(ready["cold"])
        plugin_cycle, raw_cycle = statistics.median(cycle), statistics.median(raw)

        def parallel(i: int) -> None:
            ref = backend.clone(template, replace(SPEC, name=f"par{i}"), session)
            try:
                assert backend.execute(ref, ["echo", "ok"]).stdout == "ok\n"
            finally:
                backend.destroy(ref)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            outcomes = [f.exception() for f in [pool.submit(parallel, i) for i in range(8)]]
        par_time = time.perf_counter() - t0
        failures = [e for e in outcomes if e is not None]
    finally:
        backend.remove_template(template)
    td = statistics.median(teardown)
    print(f"ready: RAM-state clone {fast:.2f} s, cold boot {cold:.2f} s")
    print(f"clone+ready+destroy: plugin {plugin_cycle:.2f} s, raw libvirt-python {raw_cycle:.2f} s")
    print(f"8 parallel clones (clone, exec, destroy): {par_time:.1f} s, {len(failures)} errors")
    for exc in failures:
        print(f"  error: {exc!r}")
    rows = [
        ("overlay 4 GiB base / 100 MiB base", overlay_ratio, "<= 1.2", overlay_ratio <= 1.2),
        ("cold boot / RAM-state clone (ready)", cold / fast, ">= 3", cold / fast >= 3),
        (
            "plugin / raw clone-ready-destroy",
            plugin_cycle / raw_cycle,
            "<= 1.2",
            plugin_cycle / raw_cycle <= 1.2,
        ),
        ("teardown of one machine (s)", td, "<= 0.5", td <= 0.5),
        ("8 parallel clones: errors", float(len(failures)), "== 0", not failures),
    ]
    if args.debian:
        label, value, ok = bench_debian(backend, session, args.debian)
        rows.append((label, value, ">= 3", ok))
    print()
    for label, value, target, ok in rows:
        print(f"{label:40s} {value:8.2f}   target {target:7s} {'ok' if ok else 'MISSED'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
