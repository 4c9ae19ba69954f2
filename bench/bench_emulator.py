"""Emulator benchmark: prints each figure next to its raw baseline, measured in one run.

    python bench/bench_emulator.py            # as root; about a minute

Figures and their targets:
1. clone + first run("true") + destroy, median, against util-linux `unshare` + an overlay mount
   + `chroot true` looped in one shell process (target: <= 3x);
2. run("true") round trip, median (target: <= 3 ms);
3. 200 tests with a fresh clone each against the same 200 tests without machines
   (target: <= 1.5x + 5 s), and the median per-test cost over a plain test (target: <= 25 ms);
4. 5,000 plain tests with the plugin installed against `-p no:vmenv` (target: <= 3% more).
Benchmarks are not tests: nothing here asserts; the ratios are for people to read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

N_CLONES = 200
N_RUNS = 1000
WORK = state_dir() / "bench"

RAW_LOOP = r"""
set -e
work=$1; n=$2
for i in $(seq "$n"); do
  s=$EPOCHREALTIME
  unshare --mount --pid --fork --net --uts --ipc --propagation private sh -c '
    mount -t tmpfs none "$0" && mkdir "$0/u" "$0/w" "$0/r" &&
    mount -t overlay overlay -o lowerdir=/,upperdir="$0/u",workdir="$0/w" "$0/r" &&
    chroot "$0/r" /bin/true' "$work"
  e=$EPOCHREALTIME
  echo "$s $e"
done
"""


def raw_baseline(n: int) -> list[float]:
    work = WORK / "raw"
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["bash", "-c", RAW_LOOP, "raw", str(work), str(n)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [float(e) - float(s) for s, e in (line.split() for line in out.splitlines())]


def plugin_clones(backend: EmulatorBackend, n: int) -> tuple[list[float], list[float]]:
    session = Session(id="bench-" + secrets.token_hex(3), state_dir=state_dir())
    spec = MachineSpec(name="bench", image="host")
    snap = backend.build_template(spec, "bench-" + session.id, session)
    cycle, runs = [], []
    try:
        for _ in range(n):
            start = time.perf_counter()
            ref = backend.clone(snap, spec, session)
            backend.execute(ref, ["true"])
            backend.destroy(ref)
            cycle.append(time.perf_counter() - start)
        ref = backend.clone(snap, spec, session)
        for _ in range(N_RUNS):
            start = time.perf_counter()
            backend.execute(ref, ["true"])
            runs.append(time.perf_counter() - start)
        backend.destroy(ref)
    finally:
        backend.remove_template(snap)
    return cycle, runs


def write_suite(path: Path, count: int, with_vm: bool) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    mark = '@pytest.mark.vm(image="host")\n' if with_vm else ""
    arg = "vm" if with_vm else ""
    body = "vm.run('true')" if with_vm else "pass"
    per_file = 100
    for f in range(max(1, count // per_file)):
        tests = "\n".join(
            f"{mark}def test_{i}({arg}):\n    {body}\n" for i in range(min(per_file, count))
        )
        (path / f"test_{f}.py").write_text("import pytest\n\n" + tests)


def run_suite(path: Path, *extra: str) -> tuple[float, list[float]]:
    junit = path / "junit.xml"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(path), f"--junitxml={junit}", *extra],
        check=True, capture_output=True, cwd=path,
    )  # fmt: skip
    wall = time.perf_counter() - start
    times = [float(tc.get("time", 0)) for tc in ET.parse(junit).iter("testcase")]
    return wall, times


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    if os.geteuid() != 0:
        sys.exit(
            "run as root: the emulator needs namespaces and overlayfs as root for image='host'"
        )
    WORK.mkdir(parents=True, exist_ok=True)
    backend = EmulatorBackend()
    backend.check()
    try:
        raw = raw_baseline(N_CLONES)
        cycle, runs = plugin_clones(backend, N_CLONES)
    finally:
        backend.close()
    print(f"{'figure':<48}{'plugin':>12}{'baseline':>12}{'ratio':>8}  target")
    print(
        f"{'clone + run(true) + destroy, median':<48}{ms(cycle):>10.2f}ms{ms(raw):>10.2f}ms"
        f"{ms(cycle) / ms(raw):>8.2f}  <= 3x unshare+overlay"
    )
    print(f"{'run(true) round trip, median':<48}{ms(runs):>10.3f}ms{'':>12}{'':>8}  <= 3 ms")

    vm_suite, plain_suite = WORK / "suite-vm", WORK / "suite-plain"
    write_suite(vm_suite, 200, with_vm=True)
    write_suite(plain_suite, 200, with_vm=False)
    plain_wall, plain_times = run_suite(plain_suite)
    vm_wall, vm_times = run_suite(vm_suite)
    print(
        f"{'200 tests, fresh clone each (wall)':<48}{vm_wall:>11.2f}s{plain_wall:>11.2f}s"
        f"{vm_wall / plain_wall:>8.2f}  <= 1.5x + 5 s ({1.5 * plain_wall + 5:.1f} s)"
    )
    extra = ms(vm_times) - ms(plain_times)
    print(
        f"{'per-test cost over a plain test, median':<48}{extra:>10.2f}ms{'':>12}{'':>8}  <= 25 ms"
    )

    big = WORK / "suite-5000"
    write_suite(big, 5000, with_vm=False)
    offs, ons = [], []
    for _ in range(5):  # interleaved, best of 5: the machine's noise is larger than the effect
        offs.append(run_suite(big, "-p", "no:vmenv")[0])
        ons.append(run_suite(big)[0])
    off, on = min(offs), min(ons)
    print(
        f"{'5,000 plain tests, plugin installed (best of 5)':<48}{on:>11.2f}s{off:>11.2f}s"
        f"{on / off:>8.3f}  <= 1.03x (-p no:vmenv)"
    )


if __name__ == "__main__":
    main()
