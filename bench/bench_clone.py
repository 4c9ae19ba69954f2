"""Phases of a fresh emulator machine: clone, first execute("true"), destroy (medians, ms).

    python bench/bench_clone.py [N]          # as root; N cycles (default 150)

To compare two trees in one run, interleave them through PYTHONPATH (the machine's noise is
larger than a few percent; compare several pairs):

    for i in 1 2 3 4 5; do
        PYTHONPATH=/path/to/old python bench/bench_clone.py 150
        PYTHONPATH=. python bench/bench_clone.py 150
    done

Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import time

from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    backend = EmulatorBackend()
    backend.check()
    session = Session(id="bench-" + secrets.token_hex(3), state_dir=state_dir())
    spec = MachineSpec(name="bench", image="host")
    snap = backend.build_template(spec, "bench-" + session.id, session)
    clone, first, destroy = [], [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            ref = backend.clone(snap, spec, session)
            t1 = time.perf_counter()
            backend.execute(ref, ["true"])
            t2 = time.perf_counter()
            backend.destroy(ref)
            t3 = time.perf_counter()
            clone.append(t1 - t0)
            first.append(t2 - t1)
            destroy.append(t3 - t2)
    finally:
        backend.remove_template(snap)
        backend.close()
    total = [a + b + c for a, b, c in zip(clone, first, destroy, strict=True)]

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.2f}"

    print(
        f"clone {ms(clone)} first-exec {ms(first)} destroy {ms(destroy)} total {ms(total)} "
        f"(ms, medians of {n})"
    )


if __name__ == "__main__":
    main()
