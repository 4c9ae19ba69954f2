"""`vmenv images`: every cache in the state dir with its size; `rm` removes what nothing uses,
never what a running build or a Machine's transfer may use, and never all without --all.

Each test has a state dir of its own (VMENV_STATE_DIR for the inner pytest runs and the
`vmenv` calls), so what it lists is exactly what it made.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pytest_vmenv.backend import Cache
from pytest_vmenv.caches import human_size
from pytest_vmenv.emulator.host import caches as emu_caches
from pytest_vmenv.emulator.host import images, layers, userns
from pytest_vmenv.errors import BackendError

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulator needs root here")

INNER = """
import os, pathlib, time, pytest

@pytest.mark.vm(image="mini.tar.gz", provision=["echo provisioned > /provisioned"])
def test_uses_the_image(vm):
    assert vm.succeed("cat /provisioned") == "provisioned\\n"
    gate = os.environ.get("GATE")
    if gate:  # hold the session open until the outer test has looked
        pathlib.Path(gate, "running").touch()
        deadline = time.monotonic() + 60
        while not pathlib.Path(gate, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    monkeypatch.setenv("VMENV_STATE_DIR", str(path))
    return path


def vmenv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", *args], capture_output=True, text=True, timeout=60
    )


def mini_image(path: Path) -> Path:
    """A tarball rootfs of a few host binaries and their libraries (a few MiB)."""
    wanted = {"/bin/sh", "/bin/cat", "/bin/echo"}
    libs: set[str] = set()
    for binary in wanted:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        libs.update(p for p in out.split() if p.startswith("/"))
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(wanted | libs):
            tar.add(os.path.realpath(name), arcname=name.lstrip("/"))
    return path


def rows(listing: str, kind: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in listing.splitlines() if line.startswith(kind)]


def test_images_lists_an_unpacked_tarball_with_its_size_and_rm_removes_it(
    pytester: pytest.Pytester, state: Path
) -> None:
    empty = vmenv("images")
    assert empty.returncode == 0 and empty.stdout == f"no cached images in {state}\n", empty

    image = mini_image(pytester.path / "mini.tar.gz")
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    # files of a backend that lists no caches of its own here (vSphere): counted, never removed
    tiny = state / "vsphere" / "leftover"
    tiny.mkdir(parents=True)
    (tiny / "disk.vmdk").write_bytes(os.urandom(1 << 20))

    listing = vmenv("images")
    assert listing.returncode == 0, listing
    (unpacked,) = rows(listing.stdout, "tarball image")
    _kind, backend, size, _age, cache_id, detail = unpacked
    assert backend == "emulator" and detail == f"unpacked from {image}", listing.stdout
    unpacked_dir = state / "emulator" / "images" / cache_id
    du = int(subprocess.run(["du", "-sk", str(unpacked_dir)], capture_output=True, text=True)
             .stdout.split()[0])  # fmt: skip
    assert size == f"{du / 1024:.1f} MiB", (size, du)
    (other,) = rows(listing.stdout, "other files")
    assert other[1] == "vsphere" and other[2] == "1.0 MiB", listing.stdout
    assert re.search(rf"^total \d+\.\d MiB in {re.escape(str(state))}", listing.stdout, re.M)

    removed = vmenv("images", "rm", "--all")
    assert removed.returncode == 0, removed
    assert f"removed emulator tarball image {cache_id} ({size})" in removed.stdout
    assert f"left {state / 'vsphere'} (1.0 MiB): " in removed.stdout  # never ours to remove
    assert not unpacked_dir.exists() and tiny.exists()
    assert "tarball image" not in vmenv("images").stdout


def test_images_rm_leaves_what_a_running_session_or_a_kept_machine_uses(
    pytester: pytest.Pytester, state: Path
) -> None:
    mini_image(pytester.path / "mini.tar.gz")
    pytester.makepyfile(INNER)
    gate = pytester.path / "gate"
    gate.mkdir()
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--vm-keep=always"],
        cwd=pytester.path,
        env={**os.environ, "GATE": str(gate)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (gate / "running").exists():
            assert inner.poll() is None and time.monotonic() < deadline, inner.communicate()[0]
            time.sleep(0.05)
        listing = vmenv("images").stdout
        (template,) = rows(listing, "template")
        assert re.search(r"in use: (machine vm \(\w+\) stacks on it|session \S+ is running)",
                         template[5]), listing  # fmt: skip
        (unpacked,) = rows(listing, "tarball image")
        assert "in use: " in unpacked[5], listing
        (scratch,) = rows(listing, "scratch")
        assert "in use: session " in scratch[5], listing

        named = vmenv("images", "rm", template[4])
        assert named.returncode == 1, named
        assert f"left template {template[4]}: in use: " in named.stdout
        everything = vmenv("images", "rm", "--all")
        assert everything.returncode == 0, everything
        assert "removed" not in everything.stdout, everything.stdout
        assert (state / "emulator" / "layers" / template[4]).exists()
    finally:
        (gate / "go").touch()
        out = inner.communicate(timeout=60)[0]
    assert inner.returncode == 0, out

    # the session is over; its kept machine still runs on the unpacked image
    after = vmenv("images", "rm", "--all")
    assert after.returncode == 0, after
    assert f"left tarball image {unpacked[4]}: in use: machine vm (" in after.stdout, after.stdout
    assert (state / "emulator" / "images" / unpacked[4]).exists()
    vmenv("gc", "--all")
    final = vmenv("images", "rm", "--all")
    assert f"removed emulator tarball image {unpacked[4]}" in final.stdout, final.stdout
    assert vmenv("images").stdout == f"no cached images in {state}\n"


def emulator_cache(emu: Path, kind: str) -> Cache:
    (cache,) = [c for c in emu_caches.listing(emu, set()) if c.kind == kind]
    return cache


def lock_waiters(emu: Path) -> int:
    """How many flock requests wait now for a lock file of the emulator's (the ``->`` lines
    of /proc/locks)."""
    inodes = {str(p.stat().st_ino) for d in (emu, emu / "layers") for p in d.glob("*.lock")}
    inodes |= {str(p.stat().st_ino) for p in (emu / "layers").glob(".*.lock")}
    waiting = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and any(f.rsplit(":", 1)[-1] in inodes for f in fields if ":" in f):
            waiting += 1
    return waiting


def test_a_build_that_starts_while_rm_removes_its_image_waits_and_unpacks_it_anew(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = mini_image(tmp_path / "mini.tar.gz")
    emu = state / "emulator"
    images.unpack_tarball(tarball, emu)  # what an earlier session left
    cache = emulator_cache(emu, "tarball image")
    removing, go = threading.Event(), threading.Event()
    real_rmtree = userns.rmtree

    def paused_rmtree(path: Path) -> None:  # rm holds its lock, half-way through the tree
        if Path(path) == Path(cache.path) and not removing.is_set():
            removing.set()
            assert go.wait(30)
        real_rmtree(path)

    monkeypatch.setattr(userns, "rmtree", paused_rmtree)
    outcome: dict[str, object] = {}
    built = threading.Event()

    def rm() -> None:
        try:
            emu_caches.remove(emu, cache, set())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["rm"] = exc

    def build() -> None:  # a new session's key: a lock file rm never saw
        try:
            with layers.build_lock(emu, "a-new-sessions-key"):
                outcome["rootfs"] = images.unpack_tarball(tarball, emu)
        except Exception as exc:  # noqa: BLE001
            outcome["build"] = exc
        finally:
            built.set()

    remover = threading.Thread(target=rm)
    remover.start()
    builder = None
    try:
        assert removing.wait(30)
        builder = threading.Thread(target=build)
        builder.start()
        deadline = time.monotonic() + 30
        while not built.is_set() and not lock_waiters(emu):
            assert time.monotonic() < deadline, "the build neither ran nor waited"
            time.sleep(0.01)
    finally:
        go.set()
        remover.join(30)
        if builder is not None:
            builder.join(60)
    assert "rm" not in outcome and "build" not in outcome, outcome
    rootfs = outcome["rootfs"]
    assert isinstance(rootfs, Path)
    assert (rootfs / "bin" / "sh").is_file(), "the build got an image that rm then deleted"


def test_rm_leaves_what_a_running_build_may_use_and_says_to_try_again(
    tmp_path: Path, state: Path
) -> None:
    emu = state / "emulator"
    images.unpack_tarball(mini_image(tmp_path / "mini.tar.gz"), emu)
    cache = emulator_cache(emu, "tarball image")
    build = subprocess.Popen(  # another process, building a template
        [
            sys.executable, "-c",
            "import sys; from pathlib import Path; from pytest_vmenv.emulator.host import layers\n"
            "with layers.build_lock(Path(sys.argv[1]), 'key-of-a-build'):\n"
            "    print('building', flush=True); sys.stdin.read()",
            str(emu),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert build.stdout is not None and build.stdout.readline() == "building\n"
        everything = vmenv("images", "rm", "--all")
        assert everything.returncode == 0, everything
        assert (
            f"left tarball image {cache.id}: in use: a session is building templates; try "
            "again when it is done\n" in everything.stdout
        ), everything.stdout
        named = vmenv("images", "rm", cache.id)
        assert named.returncode == 1 and "a session is building templates" in named.stdout
        with pytest.raises(BackendError, match="a session is building templates; try again"):
            emu_caches.remove(emu, cache, set())  # listed before the build began
        assert Path(cache.path, "rootfs", "bin", "sh").is_file()
    finally:
        assert build.stdin is not None
        build.stdin.close()
        build.wait(30)
    done = vmenv("images", "rm", "--all")
    assert f"removed emulator tarball image {cache.id}" in done.stdout, done
    assert not list((emu / "layers").glob(".*.lock")), "the build's lock file is left"


def test_rm_with_more_lock_files_than_it_may_open(tmp_path: Path, state: Path) -> None:
    emu = state / "emulator"
    for i in range(1100):  # what 1,100 sessions' template builds leave
        with layers.build_lock(emu, f"tpl-key-{i}"):
            pass
    images.unpack_tarball(mini_image(tmp_path / "mini.tar.gz"), emu)
    cache = emulator_cache(emu, "tarball image")

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    out = subprocess.run(
        [sys.executable, "-m", "pytest_vmenv", "images", "rm", "--all"],
        capture_output=True, text=True, timeout=120, preexec_fn=few_files,
    )  # fmt: skip
    assert out.returncode == 0, out
    assert f"removed emulator tarball image {cache.id}" in out.stdout, out.stdout
    assert not list((emu / "layers").glob(".tpl-*.lock"))


def test_bare_rm_removes_nothing_and_says_how(state: Path) -> None:
    stale = state / "scratch" / "0badc0de-gw0"  # a dead session's scratch dir
    stale.mkdir(parents=True)
    (stale / "file").write_bytes(b"x" * 4096)
    bare = vmenv("images", "rm")
    assert bare.returncode == 2, bare
    assert "nothing was removed" in bare.stderr and "--all" in bare.stderr, bare.stderr
    assert bare.stdout == "" and stale.exists()
    everything = vmenv("images", "rm", "--all")
    assert everything.returncode == 0, everything
    assert "removed scratch/0badc0de-gw0 (" in everything.stdout, everything.stdout
    assert not stale.exists()


def test_rm_all_leaves_reuse_templates_until_they_are_named(
    pytester: pytest.Pytester, state: Path
) -> None:
    mini_image(pytester.path / "mini.tar.gz")
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--vm-reuse").assert_outcomes(passed=1)
    listing = vmenv("images").stdout
    (template,) = rows(listing, "template")
    (unpacked,) = rows(listing, "tarball image")
    assert template[5].startswith("reusable (--vm-reuse)"), listing

    everything = vmenv("images", "rm", "--all")
    assert everything.returncode == 0, everything
    assert (
        f"left template {template[4]}: reusable (--vm-reuse); name it to remove it\n"
        in everything.stdout
    ), everything.stdout
    assert f"left tarball image {unpacked[4]}: in use: {template[4]} stacks on it" in (
        everything.stdout
    )
    assert "removed" not in everything.stdout
    assert (state / "emulator" / "layers" / template[4] / "complete").exists()

    named = vmenv("images", "rm", "--all", template[4])
    assert named.returncode == 0, named
    assert f"removed emulator template {template[4]}" in named.stdout, named.stdout
    assert f"removed emulator tarball image {unpacked[4]}" in named.stdout, named.stdout


FAKE_BACKEND = '''
import os
from pytest_vmenv.backend import Snapshot
from pytest_vmenv.errors import BackendError, TemplateInUse
from pytest_vmenv.paths import state_dir


def count(what):
    with open(state_dir() / "fakevm" / what, "a") as f:
        f.write("1\\n")


class FakeBackend:
    """Templates are the files <state>/fakevm/*.tpl; every check() is counted."""

    name = "fakevm"

    def __init__(self, options):
        count("made")

    def check(self):
        count("checks")

    def owned(self, session_id=None):
        return []

    def templates(self):
        """a.tpl: a local template (its file); far.remote: one on another host (a moref)."""
        root = state_dir() / "fakevm"
        return [
            Snapshot("fakevm", p.stem, p.read_text() if p.suffix == ".remote" else str(p),
                     p.stem, session="gone", owner="0:1:1", created=1.0)
            for p in sorted([*root.glob("*.tpl"), *root.glob("*.remote")])
        ]

    def remove_template(self, snap):
        if snap.key == "stuck":
            raise BackendError("fakevm: the hypervisor refused")
        if snap.key == "inuse":
            raise TemplateInUse("fakevm: in use", "machine m is built on it")
        local = os.path.isabs(snap.handle)
        os.unlink(snap.handle if local else state_dir() / "fakevm" / f"{snap.key}.remote")
'''


@pytest.fixture
def fakevm(tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A backend distribution on PYTHONPATH (entry point ``fakevm``); its dir in the state."""
    site = tmp_path / "site"
    info = site / "fakevm-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakevm\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[pytest_vmenv.backends]\nfakevm = fakevm_backend:FakeBackend\n"
    )
    (site / "fakevm_backend.py").write_text(FAKE_BACKEND)
    monkeypatch.setenv("PYTHONPATH", str(site))
    root = state / "fakevm"
    root.mkdir()
    return root


def test_rm_makes_and_checks_each_backend_once(fakevm: Path) -> None:
    (fakevm / "a.tpl").write_bytes(os.urandom(64 * 1024))
    (fakevm / "stuck.tpl").write_bytes(os.urandom(64 * 1024))
    size = human_size((fakevm / "a.tpl").stat().st_blocks * 512)
    out = vmenv("images", "rm", "--all")
    assert out.returncode == 1, out  # the stuck one
    assert (fakevm / "checks").read_text() == "1\n", out
    assert (fakevm / "made").read_text() == "1\n", out
    assert f"removed fakevm template a ({size})" in out.stdout, out.stdout
    assert "error: template stuck: fakevm: the hypervisor refused" in out.stderr, out.stderr
    assert f"freed {size}\n" in out.stdout

    again = vmenv("images", "rm", "--all")
    assert again.returncode == 1 and "the hypervisor refused" in again.stderr, again
    assert "freed" not in again.stdout, again.stdout  # nothing was removed


def test_rm_all_leaves_templates_on_other_hosts_until_they_are_named(fakevm: Path) -> None:
    (fakevm / "far.remote").write_text("vm-1042/snapshot-1")  # not on this host's disk
    everything = vmenv("images", "rm", "--all")
    assert everything.returncode == 0, everything
    assert (
        "left template far: not on this host (sessions elsewhere may use it); name it to "
        "remove it\n" in everything.stdout
    ), everything.stdout
    assert (fakevm / "far.remote").exists()
    named = vmenv("images", "rm", "far")
    assert named.returncode == 0 and "removed fakevm template far (-)" in named.stdout, named
    assert not (fakevm / "far.remote").exists()


def test_gc_that_only_leaves_says_so_and_not_nothing_to_remove(fakevm: Path) -> None:
    (fakevm / "inuse.tpl").write_bytes(b"x")
    out = vmenv("gc")
    assert out.returncode == 0, out
    assert out.stdout == "left fakevm template inuse: in use: machine m is built on it\n", out


def test_rm_leaves_machines_put_and_get_files_and_removes_files_with_unlink(
    state: Path,
) -> None:
    scratch = state / "scratch"
    scratch.mkdir()
    # as Machine.write_bytes/read_bytes make them when it has no session's scratch dir
    put = Path(tempfile.mkstemp(dir=scratch, prefix="put-")[1])
    put.write_bytes(b"data being put")
    got = Path(tempfile.mkdtemp(dir=scratch, prefix="get-"))
    (got / "data").write_bytes(b"data being got")
    dead = scratch / "0badc0de-gw1"  # a dead session's dir, and a stray file
    dead.mkdir()
    stray = scratch / "stray"
    stray.write_bytes(b"?")

    everything = vmenv("images", "rm", "--all")
    assert everything.returncode == 0 and everything.stderr == "", everything
    assert put.read_bytes() == b"data being put" and (got / "data").exists()
    for name in (put.name, got.name):
        assert f"left scratch/{name}: in use: a machine's transfer file" in everything.stdout
    assert "removed scratch/0badc0de-gw1 (" in everything.stdout, everything.stdout
    assert "removed scratch/stray (" in everything.stdout, everything.stdout
    assert not dead.exists() and not stray.exists()
    swept = vmenv("gc")
    assert swept.returncode == 0 and put.exists() and got.exists(), swept
