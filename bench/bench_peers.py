"""Peers benchmark: one fresh isolated machine running ``true`` once, pytest-vmenv's emulator
against the tools a reader would otherwise reach for, all on one busybox rootfs.

    python bench/bench_peers.py [--rounds 5] [--n 50]     # as root; 2-4 minutes on 2 cores

The peers are benchmark-only (``apt-get install -y bubblewrap runc podman crun``); a peer that
is not installed, or fails here, is printed as skipped with the reason, never left out. Files
go to ``<state dir>/bench-peers``.

Contenders, each making a fresh machine and running ``true`` in it once:

* emulator: ``EmulatorBackend`` clone + ``execute(["true"])`` + destroy through the backend API
  (the template is built once, before timing);
* raw: util-linux ``unshare`` (mount, pid, net, uts, ipc) + a tmpfs + an overlay mount over the
  rootfs + ``chroot true``;
* bwrap: ``bwrap --unshare-all --ro-bind ROOTFS / --proc /proc --dev /dev true`` (no overlay);
* runc, crun: ``run`` of one OCI bundle made by ``runc spec``, its root the rootfs itself,
  read-write, no terminal, args ``["true"]`` (no overlay); state under the state dir;
* podman: ``podman run --rm --network none`` of an image ``podman import``-ed from the rootfs
  tarball, its storage under the state dir, on crun if crun works here, else runc. The ulimits
  are the bundle's (1024): podman's defaults are above the hard limits, and raising a hard limit
  needs CAP_SYS_RESOURCE, which a root in a container may lack.

The command-line contenders run in one long-lived bash process, each timed around its command
with ``EPOCHREALTIME`` (the way bench_emulator.py times its raw loop, one fork per machine and
no interpreter start-up in the figure); the emulator is timed with ``perf_counter`` around its
three calls. Contenders are interleaved per iteration, the order rotating by one each time: a
shared machine's noise drifts over seconds, so interleaving finely spreads it evenly over every
contender, and rotating keeps any one from always running after podman's heavy teardown.

Printed: host facts (kernel, cores, cgroup mode, load, peer versions), then per contender the
median per fresh machine of each round as a range over the rounds (min-max of the round
medians, and their median), and the ratio to raw and to bwrap, each taken within a round, as a
range. Targets: the emulator at most 1.0x raw and within 2.0x of bwrap.
Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pytest_vmenv import VmenvError
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

WORK = state_dir() / "bench-peers"
IMAGE = "localhost/vmenv-bench-peers:latest"
TARGETS = {"raw": 1.0, "bwrap": 2.0}

TIMER = r"""
rootfs=$1 work=$2 bundle=$3 image=$4 podman_runtime=$5
shift 5
podman_flags=("$@")
i=0
c_raw() {
  unshare --mount --pid --fork --net --uts --ipc --propagation private sh -c '
    mount -t tmpfs none "$0" && mkdir "$0/u" "$0/w" "$0/r" &&
    mount -t overlay overlay -o lowerdir="$1",upperdir="$0/u",workdir="$0/w" "$0/r" &&
    chroot "$0/r" /bin/true' "$work/raw" "$rootfs"
}
c_bwrap() { bwrap --unshare-all --ro-bind "$rootfs" / --proc /proc --dev /dev true; }
c_runc() { i=$((i + 1)); runc --root "$work/runc" run --bundle "$bundle" "peers-$$-$i"; }
c_crun() { i=$((i + 1)); crun --root "$work/crun" run --bundle "$bundle" "peers-$$-$i"; }
c_podman() {
  podman "${podman_flags[@]}" --runtime "$podman_runtime" run --rm --network none \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$image" true
}
while read -r name; do
  s=$EPOCHREALTIME
  "c_$name" </dev/null >/dev/null 2>"$work/$name.err"
  rc=$?
  e=$EPOCHREALTIME
  echo "$s $e $rc"
done
"""


PEERS = {  # key: (label, program)
    "raw": ("raw: unshare + tmpfs + overlay + chroot", "unshare"),
    "bwrap": ("bwrap --unshare-all, ro root, no overlay", "bwrap"),
    "runc": ("runc run, bundle on the rootfs", "runc"),
    "crun": ("crun run, the same bundle", "crun"),
    "podman": ("podman run --rm --network none", "podman"),
}
EMULATOR = "emulator: clone + execute + destroy"
HOST_LEFTOVERS = (
    "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
    "/var/lib/containers/cache",
    "/var/lib/containers",
    "/run/containers/networks",
    "/run/containers",
    "/run/runc",
    "/run/crun",
)


class Failed(Exception):
    """A contender's machine did not run ``true`` successfully."""


@dataclass
class Contender:
    key: str
    label: str
    once: Callable[[], float] | None = None
    skipped: str = ""
    rounds: list[list[float]] = field(default_factory=list)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def sweep(before: set[str]) -> None:
    """Remove the host-wide bits podman and the OCI runtimes make however they are pointed
    (the blob-info cache, the network run dir, the runtimes' default roots), only those this
    run created and only when empty: someone else's stay."""
    for path in HOST_LEFTOVERS:
        if path not in before:
            with contextlib.suppress(OSError):
                Path(path).rmdir() if Path(path).is_dir() else Path(path).unlink()


def podman_runroot() -> Path:
    """podman refuses a runroot longer than 50 characters: under the state dir when it is short
    enough, else under /run (podman's own default place), removed at the end."""
    short = WORK / "pr"
    return short if len(str(short)) <= 50 else Path("/run/vmenv-bench-peers")


def podman_flags() -> list[str]:
    """podman's store, run root and temporary files, all its own (none of the host's)."""
    store = WORK / "podman"
    return [
        f"--root={store / 'root'}", f"--runroot={podman_runroot()}", f"--tmpdir={store / 'tmp'}",
        "--events-backend=file",
    ]  # fmt: skip


def run_reason(argv: list[str]) -> str:
    """'' if ``argv`` succeeds, else why not (its last line of stderr)."""
    done = run(argv)
    return "" if done.returncode == 0 else f"exit {done.returncode}: {last_line(done.stderr)}"


class Timer:
    """The long-lived bash process that runs and times the command-line contenders."""

    def __init__(self, rootfs: Path, bundle: Path | None, podman_runtime: str) -> None:
        args = [str(rootfs), str(WORK), str(bundle or ""), IMAGE, podman_runtime, *podman_flags()]
        self.proc = subprocess.Popen(
            ["bash", "-c", TIMER, "bench-peers", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if self.proc.stdin is None or self.proc.stdout is None:
            raise Failed("the timing shell has no pipes")
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout

    def timed(self, key: str) -> Callable[[], float]:
        def once() -> float:
            self.stdin.write(key + "\n")
            self.stdin.flush()
            fields = self.stdout.readline().split()
            if len(fields) != 3:
                raise Failed(f"the timing shell exited ({self.proc.poll()})")
            start, end, rc = fields
            if rc != "0":
                err = (WORK / f"{key}.err").read_text(errors="replace")
                raise Failed(f"exit {rc}: {last_line(err)}")
            return float(end) - float(start)

        return once

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait()


class Emulator:
    """pytest-vmenv's emulator on the rootfs: one template, a fresh clone per machine."""

    def __init__(self, rootfs: Path) -> None:
        self.backend = EmulatorBackend()
        self.backend.check()
        self.session = Session(id="peers-" + secrets.token_hex(3), state_dir=state_dir())
        self.spec = MachineSpec(name="peers", image="busybox", image_config={"rootfs": str(rootfs)})
        self.snap = self.backend.build_template(self.spec, self.session.id, self.session)

    def once(self) -> float:
        start = time.perf_counter()
        ref = self.backend.clone(self.snap, self.spec, self.session)
        try:
            result = self.backend.execute(ref, ["true"])
        finally:
            self.backend.destroy(ref)
        elapsed = time.perf_counter() - start
        if result.exit_code != 0:
            raise Failed(f"true exited {result.exit_code}: {last_line(result.stderr)}")
        return elapsed

    def close(self) -> None:
        try:
            self.backend.remove_template(self.snap)
        finally:
            self.backend.close()


def build_rootfs() -> Path:
    """A busybox rootfs and its tarball, made afresh in the state dir (``busybox --install -s``
    runs chrooted into it, so every link is ``/bin/busybox`` inside the rootfs)."""
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    for sub in ("bin", "dev", "etc", "proc", "sys", "tmp"):
        (rootfs / sub).mkdir(parents=True)
    shutil.copy2("/usr/bin/busybox", rootfs / "bin" / "busybox")
    subprocess.run(["chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(WORK / "rootfs.tar"), "."], check=True)
    return rootfs


def build_bundle(rootfs: Path, tool: str) -> Path:
    """An OCI bundle whose root is ``rootfs`` (read-write), running ``true`` without a tty."""
    bundle = WORK / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir()
    subprocess.run([tool, "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["true"]
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def prepare(rootfs: Path) -> tuple[Path | None, str, dict[str, str]]:
    """The OCI bundle, podman's runtime, and the contenders to skip (key: reason) up front."""
    skips = {
        key: f"{program} not installed"
        for key, (_, program) in PEERS.items()
        if shutil.which(program) is None
    }
    oci = [key for key in ("runc", "crun") if key not in skips]
    bundle = build_bundle(rootfs, oci[0]) if oci else None
    if "crun" not in skips and bundle is not None:
        probe = ["crun", f"--root={WORK / 'crun'}", "run", f"--bundle={bundle}"]
        if reason := run_reason([*probe, f"peers-probe-{os.getpid()}"]):
            skips["crun"] = f"fails here: {reason}"
    runtime = "crun" if "crun" not in skips else "runc"
    if "podman" not in skips and runtime in skips:
        skips["podman"] = "no OCI runtime works here (crun and runc are skipped)"
    if "podman" not in skips:
        tarball = str(WORK / "rootfs.tar")
        if reason := run_reason(["podman", *podman_flags(), "import", tarball, IMAGE]):
            skips["podman"] = f"podman import fails here: {reason}"
    return bundle, runtime, skips


def contenders(
    timer: Timer, emulator: Emulator | None, runtime: str, skips: dict[str, str]
) -> list[Contender]:
    """Every contender, each run once untimed (a warm-up, and a failure becomes its skip)."""
    rows = [Contender("emulator", EMULATOR, emulator.once if emulator else None)]
    for key, (label, _) in PEERS.items():
        suffix = f" ({runtime})" if key == "podman" else ""
        rows.append(Contender(key, label + suffix, timer.timed(key)))
    for row in rows:
        row.skipped = skips.get(row.key, "")
        if not row.skipped and row.once is not None:
            try:
                row.once()
            except (Failed, VmenvError, OSError) as exc:
                row.skipped = f"fails here: {exc}"
    return rows


def measure(rows: list[Contender], rounds: int, n: int) -> None:
    """``rounds`` rounds of ``n`` machines per contender, interleaved per iteration, the order
    rotating by one each iteration; a contender that fails is skipped from then on."""
    for r in range(rounds):
        live = [row for row in rows if not row.skipped and row.once is not None]
        samples: dict[str, list[float]] = {row.key: [] for row in live}
        start = time.monotonic()
        for i in range(n):
            k = i % max(1, len(live))
            for row in live[k:] + live[:k]:
                if row.skipped or row.once is None:
                    continue
                try:
                    samples[row.key].append(row.once())
                except (Failed, VmenvError, OSError) as exc:
                    row.skipped = f"failed in round {r + 1}, machine {i + 1}: {exc}"
        for row in live:
            if not row.skipped:
                row.rounds.append(samples[row.key])
        elapsed = time.monotonic() - start
        print(f"round {r + 1}/{rounds}: {elapsed:.1f} s", file=sys.stderr, flush=True)


def cgroup_mode() -> str:
    """v2 (unified), hybrid (v1 controllers and a v2 tree) or v1, from /proc/self/mounts."""
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    v2 = [where for where, kind in mounts if kind == "cgroup2"]
    v1 = [where for where, kind in mounts if kind == "cgroup"]
    if "/sys/fs/cgroup" in v2:
        return "v2 (unified)"
    if v1 and v2:
        return f"hybrid ({len(v1)} v1 hierarchies, v2 at {v2[0]})"
    return "v1 (legacy)" if v1 else "none mounted"


def host_facts() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    versions = [
        run([program, "--version"]).stdout.strip().split("\n")[0]
        for program in ("unshare", "bwrap", "runc", "crun", "podman")
        if shutil.which(program)
    ]
    return [
        f"kernel {platform.release()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} "
        f"usable), {model}",
        f"cgroup {cgroup_mode()}; python {platform.python_version()}",
        f"peers: {'; '.join(versions) or 'none installed'}",
    ]


def spread(values: list[float], unit: str, digits: int) -> str:
    mid = statistics.median(values)
    return f"{mid:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(rows: list[Contender], rounds: int, n: int) -> None:
    medians = {
        row.key: [statistics.median(one) * 1000 for one in row.rounds]
        for row in rows
        if not row.skipped and row.rounds
    }
    ratios: dict[tuple[str, str], list[float]] = {}
    for key, mine in medians.items():
        for base in TARGETS:
            if base in medians:
                pairs = zip(mine, medians[base], strict=True)
                ratios[key, base] = [a / b for a, b in pairs]
    print(f"\n{rounds} rounds x {n} fresh machines per contender, interleaved per iteration")
    print("figures: median of the round medians (min-max over rounds); ratios within each round")
    print(f"{'contender':<42} {'per fresh machine':>23} {'x raw':>21} {'x bwrap':>21}")
    for row in rows:
        if row.key not in medians:
            continue
        cells = [
            spread(ratios[row.key, base], "x", 2) if (row.key, base) in ratios else "n/a"
            for base in TARGETS
        ]
        ms = spread(medians[row.key], " ms", 1)
        print(f"{row.label:<42} {ms:>23} {cells[0]:>21} {cells[1]:>21}")
    for row in rows:
        if row.key not in medians:
            print(f"skipped: {row.label}: {row.skipped or 'no data'}")
    for base, target in TARGETS.items():
        got = ratios.get(("emulator", base))
        verdict = "n/a" if got is None else f"{min(got):.2f}-{max(got):.2f}x"
        met = "" if got is None else (" (met)" if max(got) <= target else " (not met)")
        print(f"target: emulator <= {target:.1f}x {base}: {verdict}{met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--n", type=int, default=50, help="machines per contender per round")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the raw loop, runc and the emulator's rootfs guests need root")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "raw").mkdir(exist_ok=True)
    before = {path for path in HOST_LEFTOVERS if os.path.lexists(path)}
    facts = host_facts()
    rootfs = build_rootfs()
    bundle, runtime, skips = prepare(rootfs)
    emulator: Emulator | None = None
    try:
        emulator = Emulator(rootfs)
    except (VmenvError, OSError) as exc:
        skips["emulator"] = f"fails here: {exc}"
    timer = Timer(rootfs, bundle, runtime)
    load = os.getloadavg()[0]
    try:
        rows = contenders(timer, emulator, runtime, skips)
        measure(rows, args.rounds, args.n)
    finally:
        timer.close()
        if emulator is not None:
            emulator.close()
        if "podman" not in skips:
            run_reason(["podman", *podman_flags(), "rmi", "--force", IMAGE])
        if not podman_runroot().is_relative_to(WORK):
            shutil.rmtree(podman_runroot(), ignore_errors=True)
        sweep(before)
    print("\n".join(facts))
    print(f"load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    report(rows, args.rounds, args.n)


if __name__ == "__main__":
    main()
