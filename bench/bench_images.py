"""Debian image benchmark: build (cold), reuse (warm), and emulator clone-to-ready on them.

    python bench/bench_images.py            # as root, with mmdebstrap; about two minutes

Figures and their targets:
1. cold build of ``debian-12 + cron`` (systemd) with mmdebstrap, in a state dir of the bench's
   own (``<state>/bench-images``, emptied first);
2. warm reuse of that image: ``ImageCache.ensure`` in-process, and a whole
   ``vmenv images build debian-12 --packages cron`` process (target: under 1 s);
3. emulator clone-to-ready on ``debian-12`` with systemd as PID 1 (``clone`` returns once
   ``systemctl is-system-running --wait`` says running), median of N, against the same image
   with ``init="none"`` (the plugin's PID 1) and the ``host`` image (target: under 0.5 s).
Benchmarks are not tests: nothing here asserts; the figures are for people to read.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid

from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.images import ImageCache, Recipe, subscribe
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

N_CLONES = 20
STATE = state_dir() / "bench-images"
SYSTEMD = Recipe("debian-12", ("cron",), "systemd")
PLAIN = Recipe("debian-12", ("cron",), "none")


def spec_of(recipe: Recipe) -> MachineSpec:
    return MachineSpec(
        name="bench", image=recipe.base, image_config={"base": recipe.base, "packages": []},
        packages=recipe.packages, init=recipe.init,
    )  # fmt: skip


def clone_to_ready(backend: EmulatorBackend, spec: MachineSpec, session: Session) -> list[float]:
    snap = backend.build_template(spec, f"bench-{spec.init}-{session.id}", session)
    times = []
    try:
        backend.destroy(backend.clone(snap, spec, session))  # the zygote starts once
        for _ in range(N_CLONES):
            start = time.perf_counter()
            ref = backend.clone(snap, spec, session)
            times.append(time.perf_counter() - start)
            backend.destroy(ref)
    finally:
        backend.remove_template(snap)
    return times


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root")
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    cache = ImageCache(STATE)
    steps: list[str] = []
    unsubscribe = subscribe(lambda e: None if e.tick else steps.append(e.step))

    start = time.perf_counter()
    cache.ensure(SYSTEMD)
    cold = time.perf_counter() - start
    unsubscribe()
    print(f"cold build of {SYSTEMD.describe()}: {cold:.1f} s ({len(steps)} progress events)")

    warm = []
    for _ in range(20):
        start = time.perf_counter()
        cache.ensure(SYSTEMD)
        warm.append(time.perf_counter() - start)
    print(f"warm reuse, ImageCache.ensure, median of 20: {statistics.median(warm) * 1000:.2f} ms")
    argv = [sys.executable, "-m", "pytest_vmenv", "images", "build", "debian-12",
            "--packages", "cron"]  # fmt: skip
    env = {**os.environ, "VMENV_STATE_DIR": str(STATE)}
    cli = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        cli.append(time.perf_counter() - start)
    print(f"warm reuse, a `vmenv images build` process, median of 5: {statistics.median(cli):.2f} s"
          " (target < 1 s)")  # fmt: skip

    start = time.perf_counter()
    cache.ensure(PLAIN)
    print(f"cold build of {PLAIN.describe()}: {time.perf_counter() - start:.1f} s")

    backend = EmulatorBackend(state_dir=STATE)
    backend.check()
    session = Session(id=f"bench-{uuid.uuid4().hex[:6]}", state_dir=STATE)
    try:
        figures = {
            "debian-12, systemd as PID 1": clone_to_ready(backend, spec_of(SYSTEMD), session),
            "debian-12, init='none'": clone_to_ready(backend, spec_of(PLAIN), session),
            "host image": clone_to_ready(backend, MachineSpec(name="bench"), session),
        }
    finally:
        backend.close()
    for name, times in figures.items():
        times.sort()
        print(
            f"clone-to-ready, {name}: median {statistics.median(times) * 1000:.0f} ms, "
            f"min {times[0] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms (n={len(times)})"
        )
    print("(systemd target: under 500 ms to is-system-running)")
    shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
