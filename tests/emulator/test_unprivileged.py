"""The emulator's unprivileged (user-namespace) mode, driven as user ``nobody`` from root.

Each test makes an area ``/var/lib/pytest-vmenv-userns-test/<id>`` owned by nobody (a tiny
busybox rootfs, a state dir, a home), runs a script or a pytest as nobody through
``setpriv``, and then checks as root that nothing is left: no new process of nobody that
descends from what it started, no mount naming the area.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_vmenv.emulator.host import userns

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="drives the unprivileged mode as user nobody: needs Linux and root",
)

NOBODY = 65534
AREA_ROOT = Path("/var/lib/pytest-vmenv-userns-test")
CHECKOUT = str(Path(__file__).resolve().parents[2])
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "cat", "echo", "sleep", "printf", "head", "wc", "test", "kill", "ls", "rm", "mkdir",
    "chmod", "id", "touch", "cut", "true", "false", "env", "stat", "tr", "grep", "sed",
    "unshare", "httpd", "wget",
)  # fmt: skip


@dataclass
class Area:
    root: Path
    rootfs: Path
    state: Path
    home: Path
    python: str = sys.executable
    pylib: Path | None = None


def _static_busybox() -> bool:
    try:
        out = subprocess.run(["file", "-L", str(BUSYBOX)], capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0 and "statically linked" in out.stdout


def _make_rootfs(rootfs: Path) -> None:
    """A busybox rootfs; every path is created under ``rootfs`` (symlinks only as entries)."""
    for d in (
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "var/tmp",
        "root",
        "opt/d",
        "srv/e",
        "run",
    ):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "etc" / "victim").write_text("delete me\n")
    (rootfs / "etc" / "keep2").write_text("keep\n")
    (rootfs / "opt" / "d" / "old").write_text("old\n")
    (rootfs / "srv" / "e" / "old").write_text("old\n")


def _chown_tree(top: Path) -> None:
    """lchown everything under ``top`` to nobody, never following a symlink."""
    os.chown(top, NOBODY, NOBODY, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY, follow_symlinks=False)


_DEPS: tuple[str, ...] = ("pytest", "_pytest", "py", "pluggy", "iniconfig", "packaging")
_DEPS += ("jinja2", "markupsafe", "tenacity", "pytest_vmenv-*.dist-info")


def _python_for_nobody(area: Area) -> None:
    """This interpreter if nobody can use it; else the system's with a copy of our deps.

    (A Python under root's 0700 home is not readable by nobody.) Usable means from inside a
    user namespace too, where the emulator re-executes it: a venv whose ``bin/python`` links
    into root's home may start as nobody and still fail there. The copy goes into the area;
    symlinks are copied as links, never followed.
    """
    reexec = (
        "import ctypes, os, sys, tenacity, pytest, jinja2, pluggy\n"
        "if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER\n"
        "    sys.exit(1)\n"
        "os.execv(sys.executable, [sys.executable, '-c', ''])"
    )
    check = [sys.executable, "-c", reexec]
    ok = subprocess.run(_setpriv(check), capture_output=True, env={"PATH": "/usr/bin:/bin"})
    if ok.returncode == 0:
        return
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.skip("no Python that user nobody can run")
    import pytest as _pytest_mod

    site = Path(_pytest_mod.__file__).resolve().parents[1]
    lib = area.root / "pylib"
    lib.mkdir(mode=0o755)
    for pattern in _DEPS:
        for src in [*site.glob(pattern), *site.glob(pattern + ".py")]:
            if src.is_dir():
                shutil.copytree(src, lib / src.name, symlinks=True)
            else:
                shutil.copyfile(src, lib / src.name, follow_symlinks=False)
        for info in site.glob(f"{pattern.replace('-*', '')}-*.dist-info"):
            if not (lib / info.name).exists():
                shutil.copytree(info, lib / info.name, symlinks=True)
    area.python, area.pylib = system, lib


def _setpriv(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _procs_of_nobody() -> dict[int, tuple[str, int]]:
    """pid -> (start time, ppid) of every process whose real uid is nobody."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        uid_line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
        if uid_line.split()[1:2] == [str(NOBODY)]:
            found[int(name)] = (fields[19], int(fields[1]))
    return found


class Runner:
    """Runs commands as nobody and remembers the pids it started (for the leftover check)."""

    def __init__(self, area: Area) -> None:
        self.area = area
        self.roots: set[int] = set()
        self.cgroup: Path | None = None  # a delegated cgroup the commands start in

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.area.home),
            "VMENV_STATE_DIR": str(self.area.state),
            "PYTHONPATH": os.pathsep.join(
                [CHECKOUT, *([str(self.area.pylib)] if self.area.pylib else [])]
            ),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }

    def run(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = _setpriv([self.area.python if a == "python" else a for a in argv])
        if self.cgroup is not None:  # root moves the shell there, then it becomes nobody
            join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
            cmd = ["sh", "-c", join, str(self.cgroup), *cmd]
        proc = subprocess.Popen(
            cmd,
            cwd=self.area.root,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.roots.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def area() -> Iterator[Area]:
    if not _static_busybox():
        pytest.skip(f"{BUSYBOX} is not a static busybox (needed for the test rootfs)")
    AREA_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.chmod(AREA_ROOT, 0o755)
    root = AREA_ROOT / uuid.uuid4().hex[:12]
    root.mkdir(mode=0o755)
    made = Area(root, root / "rootfs", root / "state", root / "home")
    for d in (made.state, made.home):
        d.mkdir(mode=0o700)
    _make_rootfs(made.rootfs)
    _chown_tree(root)
    _python_for_nobody(made)
    yield made
    _assert_no_mounts(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nobody(area: Area) -> Iterator[Runner]:
    before = _procs_of_nobody()
    runner = Runner(area)
    yield runner
    left = _leftovers(before, runner.roots)
    for pid in left:  # only descendants of what this test started, by pid
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of nobody left behind: {left}"


def _leftovers(before: dict[int, tuple[str, int]], roots: set[int]) -> list[int]:
    """New nobody processes whose parent chain reaches a process this test started."""
    now = _procs_of_nobody()
    new = {p: v for p, v in now.items() if before.get(p, ("", 0))[0] != v[0]}
    found = []
    for pid in new:
        seen, cur = set(), pid
        while cur in now and cur not in seen and cur not in roots:
            seen.add(cur)
            cur = now[cur][1]
        if cur in roots:
            found.append(pid)
    return found


def _assert_no_mounts(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        lines = [ln for ln in f if str(root) in ln]
    assert not lines, f"mounts left in the host's namespace: {lines}"


def _need_userns(runner: Runner) -> None:
    probe = "from pytest_vmenv.emulator.host import userns; print(userns.probe())"
    res = runner.run(["python", "-c", probe], timeout=60)
    if res.stdout.strip() != "None":
        pytest.skip(
            f"the emulator's unprivileged mode is unavailable to user nobody here: "
            f"{res.stdout}{res.stderr}"
        )


def test_lifecycle_as_nobody(area: Area, nobody: Runner) -> None:
    _need_userns(nobody)
    work = area.home
    script = str(Path(__file__).with_name("userns_script.py"))
    res = nobody.run(["python", script, str(area.rootfs), str(work)])
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["ok"] is True
    assert "use a rootfs directory or tarball image instead" in report["host"]
    assert report["host"].endswith("or run as root"), report["host"]
    assert report["sys"], "sysfs was expected to mount in the user namespace here"
    assert list((area.state / "emulator" / "guests").iterdir()) == []
    layers = [p.name for p in (area.state / "emulator" / "layers").iterdir() if p.is_dir()]
    assert layers == [], "templates and snapshot layers (0500 dirs included) must be gone"


def test_conformance_as_nobody(area: Area, nobody: Runner) -> None:
    """The shared BackendConformance suite, run by pytest as nobody on the busybox rootfs."""
    _need_userns(nobody)
    suite = area.home / "test_userns_conformance.py"
    suite.write_text(
        textwrap.dedent(
            f"""
            import functools
            from pathlib import Path

            import pytest
            from pytest_vmenv.emulator import EmulatorBackend
            from pytest_vmenv.spec import MachineSpec
            from pytest_vmenv.testing import BackendConformance

            STATE = Path({str(area.state)!r})

            class TestUnprivileged(BackendConformance):
                @pytest.fixture(scope="class")
                @classmethod
                def backend(cls):
                    backend = EmulatorBackend(state_dir=STATE)
                    backend.check()
                    yield backend
                    backend.close()

                @pytest.fixture(scope="class")
                @classmethod
                def backend_factory(cls):
                    return functools.partial(EmulatorBackend, state_dir=STATE)

                @pytest.fixture(scope="class")
                @classmethod
                def base_spec(cls):
                    return MachineSpec(
                        image={str(area.rootfs)!r}, image_config={{"rootfs": {str(area.rootfs)!r}}}
                    )

                @pytest.fixture(scope="class")
                @classmethod
                def other_user(cls):
                    'None: an unprivileged guest maps only uid 0.'
                    return None
            """
        )
    )
    os.chown(suite, NOBODY, NOBODY)
    argv = ["python", "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs"]
    argv += [f"--basetemp={area.home / 'basetemp'}", "--rootdir", str(area.home), str(suite)]
    res = nobody.run(argv)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    print(res.stdout)
    summary = res.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary, res.stdout


def test_refusal_reasons_name_the_sysctl(area: Area) -> None:
    proc = area.root / "proc"
    (proc / "sys" / "user").mkdir(parents=True)
    (proc / "sys" / "kernel").mkdir(parents=True)
    assert userns.sysctl_reason(proc) is None
    (proc / "sys" / "user" / "max_user_namespaces").write_text("0\n")
    assert "user.max_user_namespaces=0" in (userns.sysctl_reason(proc) or "")
    (proc / "sys" / "kernel" / "unprivileged_userns_clone").write_text("0\n")
    reason = userns.sysctl_reason(proc) or ""
    assert "kernel.unprivileged_userns_clone=0" in reason and "run as root" in reason


def test_probe_failure_messages() -> None:
    text = userns._explain("unshare 1 Operation not permitted")
    assert "unshare(CLONE_NEWUSER)" in text or "sysctl" in text
    assert "Linux >= 5.11" in userns._explain("overlay 22 Invalid argument")


def test_open_up_rmtree_never_follows_symlinks(area: Area, nobody: Runner) -> None:
    """rmtree as nobody removes dirs made unwritable, and no chmod reaches a symlink's target."""
    outside = area.root / "outside"
    outside.mkdir(mode=0o555)
    os.chown(outside, NOBODY, NOBODY)
    tree = area.home / "tree"
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from pytest_vmenv.emulator.host import userns
        t = Path({str(tree)!r})
        (t / "a" / "b").mkdir(parents=True)
        (t / "a" / "b" / "f").write_text("x")
        os.symlink({str(outside)!r}, t / "a" / "link")
        os.chmod(t / "a" / "b", 0o500)
        os.chmod(t / "a", 0)
        userns.rmtree(t)
        print(os.path.lexists(t))
        """
    )
    res = nobody.run(["python", "-c", code], timeout=60)
    assert res.stdout.strip() == "False", res.stderr
    assert stat.S_IMODE(outside.stat().st_mode) == 0o555


def test_check_names_the_sysctl_when_userns_is_off(
    area: Area, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process stand-in for a host with user namespaces off (nothing is spawned)."""
    from pytest_vmenv.emulator import EmulatorBackend
    from pytest_vmenv.errors import BackendUnavailable

    proc = area.root / "proc"
    (proc / "sys" / "user").mkdir(parents=True)
    (proc / "sys" / "user" / "max_user_namespaces").write_text("0\n")
    monkeypatch.setattr(userns, "rootless", lambda: True)
    monkeypatch.setitem(userns._CACHE, "probe", userns.sysctl_reason(proc))
    backend = EmulatorBackend(state_dir=area.state)
    try:
        with pytest.raises(BackendUnavailable, match=r"user\.max_user_namespaces=0"):
            backend.check()
        assert backend.capabilities().limits is False
    finally:
        backend.close()


def _pytest_as_nobody(
    area: Area, nobody: Runner, target: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    argv = ["python", "-m", "pytest", "-p", "no:cacheprovider", *args]
    argv += [f"--basetemp={area.home / 'basetemp'}", str(target)]
    return nobody.run(argv)


def _error_sections(out: str) -> dict[str, list[str]]:
    """Test name -> the lines pytest printed for its error (the ``ERRORS`` section)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    inside = False
    for line in out.splitlines():
        if line.startswith("=") and " ERRORS " in line:
            inside = True
        elif inside and line.startswith("="):
            break
        elif inside and line.startswith("_") and " ERROR at " in line:
            current = sections.setdefault(line.strip("_ ").rpartition(" ")[2], [])
        elif inside and current is not None and line.strip():
            current.append(line)
    return sections


def test_unavailable_reason_is_per_test_as_nobody(area: Area, nobody: Runner) -> None:
    """Tests that share a template get each its own answer: two on a private network pass
    unprivileged (they reach each other over the userspace switch), the plain one passes, and
    only image="host" is refused, with its reason on one line; with ``--vm-unavailable skip``
    it is skipped with the reason and the run passes."""
    _need_userns(nobody)
    suite = area.home / "test_reasons.py"
    suite.write_text(
        textwrap.dedent(
            f"""
            import hashlib, os
            import pytest

            ROOTFS = {str(area.rootfs)!r}
            STEPS = ["echo built > /etc/built"]

            @pytest.mark.vm(image=ROOTFS, provision=STEPS, network="lan", name="a")
            @pytest.mark.vm(image=ROOTFS, provision=STEPS, network="lan", name="b")
            def test_net(vms, tmp_path):
                a, b = vms["a"], vms["b"]
                assert a.ip != b.ip and a.ip.startswith("10.77.0.")
                assert f"{{a.ip}}\\ta" in b.succeed("cat /etc/hosts")
                a.succeed("mkdir -p /www && head -c 20971520 /dev/urandom > /www/blob")
                a.succeed("httpd -p 8080 -h /www")
                b.succeed(f"wget -qO /root/blob http://{{a.ip}}:8080/blob", timeout=120)
                a.get("/www/blob", tmp_path / "sent")
                b.get("/root/blob", tmp_path / "got")
                sent, got = ((tmp_path / n).read_bytes() for n in ("sent", "got"))
                assert len(got) == 20 * 2**20
                assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()

            @pytest.mark.vm(image=ROOTFS, provision=STEPS)
            def test_plain(vm):
                assert vm.succeed("cat /etc/built") == "built\\n"
                assert vm.ip is None

            @pytest.mark.vm(image="host")
            def test_host(vm):
                pass
            """
        )
    )
    os.chown(suite, NOBODY, NOBODY)
    failing = _pytest_as_nobody(area, nobody, suite, "-v", "--rootdir", str(area.home))
    out = failing.stdout
    assert failing.returncode == 1, f"stdout:\n{out}\nstderr:\n{failing.stderr}"
    assert "test_reasons.py::test_plain PASSED" in out, out
    assert "test_reasons.py::test_net PASSED" in out, out
    host_line = next(ln for ln in out.splitlines() if ln.startswith("test_reasons.py::test_host:"))
    assert "machine 'vm' (emulator) cannot be made here: image='host' needs root" in host_line
    assert "--vm-unavailable=skip" in host_line, host_line
    errors = _error_sections(out)
    assert sorted(errors) == ["test_host"], out
    assert all(len(lines) == 1 for lines in errors.values()), errors  # no plugin traceback
    assert out.strip().splitlines()[-1].count("error") == 1 and "2 passed" in out, out

    skipping = _pytest_as_nobody(
        area, nobody, suite, "-v", "-rs", "--vm-unavailable", "skip", "--rootdir", str(area.home)
    )
    out = skipping.stdout
    assert skipping.returncode == 0, f"stdout:\n{out}\nstderr:\n{skipping.stderr}"
    assert "2 passed, 1 skipped" in out, out
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert len(skipped) == 1 and "image='host' needs root" in skipped[0], out


def test_vmenv_backends_as_nobody(area: Area, nobody: Runner) -> None:
    """``vmenv backends`` says what the unprivileged emulator cannot make."""
    _need_userns(nobody)
    res = nobody.run(["python", "-m", "pytest_vmenv", "backends"], timeout=60)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("emulator"))
    assert "usable (unprivileged, uid 65534: rootfs directory and tarball images, " in line
    assert "no Debian images (no subordinate ids), no init='systemd'" in line, line
    assert "image='host' needs root" in line and "network=" not in line, line


def test_examples_tell_nobody_what_to_do(area: Area, nobody: Runner) -> None:
    """The emulator examples as a normal user: what it cannot make is skipped with what to do."""
    _need_userns(nobody)
    examples = area.home / "examples"
    shutil.copytree(
        Path(CHECKOUT) / "examples", examples, ignore=shutil.ignore_patterns("__pycache__")
    )
    _chown_tree(examples)
    res = _pytest_as_nobody(area, nobody, examples)
    out = res.stdout
    assert res.returncode == 0, f"stdout:\n{out}\nstderr:\n{res.stderr}"
    summary = out.strip().splitlines()[-1]
    assert "error" not in summary and "failed" not in summary, out
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert all("cannot be made here" in ln and "run as root" in ln for ln in skipped), out
    if "passed" not in summary:  # none made unprivileged: each test says why
        assert "19 skipped" in summary, out
        assert any("needs subordinate ids for user nobody" in ln for ln in skipped), out


def test_probe_names_the_python_nobody_cannot_execute(area: Area, nobody: Runner) -> None:
    """A Python behind a directory nobody cannot enter: the reason says so, not "run as root"."""
    locked = area.root / "locked"
    locked.mkdir(mode=0o700)  # root's, like /root
    os.symlink(os.path.realpath(area.python), locked / "python")
    code = textwrap.dedent(
        f"""
        import sys
        sys.executable = {str(locked / "python")!r}  # what this process was started as
        from pytest_vmenv.emulator.host import userns
        print(userns.probe())
        """
    )
    res = nobody.run(["python", "-c", code], timeout=60)
    reason = res.stdout.strip()
    assert res.returncode == 0, res.stderr
    assert f"user nobody (uid {NOBODY}) cannot execute the Python interpreter" in reason, reason
    assert f"permission denied on {locked}: mode 0700, owner uid 0" in reason, reason
    assert "run as root" not in reason, reason


_NESTED = """
import json, sys
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
rootfs, state = sys.argv[1], Path(sys.argv[2])
b = EmulatorBackend(state_dir=state)
spec = MachineSpec(name="nest", image=rootfs, image_config={"rootfs": rootfs})
s = Session(id="nest", state_dir=state)
tpl = b.build_template(spec, "nest", s)
ref = b.clone(tpl, spec, s)
try:
    for cmd in ("unshare -U true", "unshare -r -n true", "cat /proc/self/oom_score_adj"):
        r = b.execute(ref, ["/bin/sh", "-c", cmd], timeout=30)
        print(json.dumps([r.exit_code, r.stdout, r.stderr]))
    with open(f"/proc/{ref.data['pid']}/oom_score_adj") as f:  # PID 1, seen from the host
        print(json.dumps(f.read()))
finally:
    b.destroy(ref)
    b.remove_template(tpl)
    b.close()
"""


def test_guest_cannot_nest_user_namespaces_as_nobody(area: Area, nobody: Runner) -> None:
    """The guest is already in a user namespace here; a nested one would give guest root
    full capabilities again over new namespaces. Also: commands score above PID 1 for the
    OOM killer (a score can only be raised without CAP_SYS_RESOURCE)."""
    _need_userns(nobody)
    res = nobody.run(["python", "-c", _NESTED, str(area.rootfs), str(area.state)], timeout=120)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    lines = res.stdout.strip().splitlines()[-4:]
    plain, mapped, command, pid1 = (json.loads(line) for line in lines)
    for code, _out, err in (plain, mapped):
        assert code != 0 and "Operation not permitted" in err, (plain, mapped)
    assert (command[1], pid1) == ("1000\n", "0\n"), (command, pid1)


_MAGIC = """
import json, os, sys
from pathlib import Path
from pytest_vmenv import errors
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
rootfs, state, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
os.environ["VMENV_TEST_CI_TOKEN"] = "CANARY-secret"
b = EmulatorBackend(state_dir=state)
spec = MachineSpec(name="magic", image=rootfs, image_config={"rootfs": rootfs})
s = Session(id="magic", state_dir=state)
tpl = b.build_template(spec, "magic", s)
ref = b.clone(tpl, spec, s)
out = {}
try:
    r = b.execute(ref, ["/bin/sh", "-c", "ln -s /proc/self/fd/1 /etc/log.conf && "
                        "ln -s /proc/self/environ /etc/env.conf"], timeout=30)
    assert r.exit_code == 0, r
    log = b.emu_dir / "guests" / ref.id / "boot.log"
    before = log.read_bytes()
    (work / "src").write_text("overwritten")
    try:
        b.copy_in(ref, work / "src", "/etc/log.conf")
        out["copy_in"] = "done"
    except errors.BackendError as exc:
        out["copy_in"] = str(exc)
    out["log_kept"] = log.read_bytes()[: len(before)] == before
    try:  # refused (PID 1's own /proc files are the host root's here) or harmless
        b.copy_out(ref, "/etc/env.conf", work / "env")
        out["env_secret"] = "CANARY" in (work / "env").read_text(errors="replace")
    except errors.BackendError:
        out["env_secret"] = False
finally:
    b.destroy(ref)
    b.remove_template(tpl)
    b.close()
print(json.dumps(out))
"""


def test_pid1_follows_no_magic_link_as_nobody(area: Area, nobody: Runner) -> None:
    """A guest's link to PID 1's /proc/self/fd/1 (the host's boot log) or environ (pytest's
    environment) reaches nothing of the host in the user-namespace mode either."""
    _need_userns(nobody)
    argv = ["python", "-c", _MAGIC, str(area.rootfs), str(area.state), str(area.home)]
    res = nobody.run(argv, timeout=120)
    assert res.returncode == 0, f"stdout:\\n{res.stdout}\\nstderr:\\n{res.stderr}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "refused" in out["copy_in"] and out["log_kept"], out
    assert out["env_secret"] is False, out


def _has_subids(user: str) -> bool:
    for name in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            return False
        if not any(ln.split(":")[0] in (user, str(NOBODY)) for ln in lines):
            return False
    return True


def test_debian_images_as_nobody_say_what_is_missing(area: Area, nobody: Runner) -> None:
    """Unprivileged, a Debian image machine is refused with its reason (one line, not a
    traceback), and ``vmenv images build`` names the subordinate ids it lacks and the fix."""
    _need_userns(nobody)
    if shutil.which("mmdebstrap") is None or shutil.which("newuidmap") is None:
        pytest.skip("mmdebstrap and uidmap are not installed")
    if _has_subids("nobody"):
        pytest.skip("user nobody has subordinate ids here")
    built = nobody.run(["python", "-m", "pytest_vmenv", "images", "build", "debian-12"], 120)
    assert built.returncode == 1, built.stdout + built.stderr
    assert "needs subordinate ids for user nobody (uid 65534)" in built.stderr, built.stderr
    assert "/etc/subuid and /etc/subgid give none" in built.stderr
    assert "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 nobody" in (
        built.stderr
    )
    assert not (area.state / "images").exists() or not any((area.state / "images").iterdir())
    suite = area.home / "test_debian_nobody.py"
    suite.write_text(
        "import pytest\n\n"
        '@pytest.mark.vm("debian-12", packages=["cron"])\n'
        "def test_deb(vm):\n    pass\n"
    )
    os.chown(suite, NOBODY, NOBODY)
    res = _pytest_as_nobody(area, nobody, suite, "--rootdir", str(area.home))
    line = next(ln for ln in res.stdout.splitlines() if "test_debian_nobody.py::test_deb:" in ln)
    assert "cannot be made here: an unprivileged emulator machine on a Debian image" in line
    assert "needs subordinate ids for user nobody (uid 65534)" in line, res.stdout
    assert list(_error_sections(res.stdout).values()) == [[line]], res.stdout


# -- Debian images unprivileged: a full id map from /etc/subuid, systemd in a delegated cgroup -

DEBIAN_STATE = AREA_ROOT / "debian-state"
"""nobody's state dir for the Debian tests, kept across sessions: its image (debian-12 with
nginx and procps, systemd) is built once, by key, like any state dir's (CI may cache it)."""
SUBID_COUNT = 65536


def _ranges(path: Path) -> list[tuple[int, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((int(parts[1]), int(parts[2])))
    return found


@pytest.fixture(scope="module")
def nobody_subids() -> Iterator[int]:
    """Subordinate ids for nobody: the one line this fixture adds to ``/etc/subuid`` and
    ``/etc/subgid`` (``nobody:START:65536``, START above every existing range and every uid of
    ``/etc/passwd``, so it overlaps nothing; the same START every session on an unchanged
    host), removed exactly at the end. A host that already gives nobody a range is left alone.
    Yields the uid range's start."""
    files = [Path("/etc/subuid"), Path("/etc/subgid")]
    if _has_subids("nobody"):
        yield next(s for s, _ in _ranges(files[0]))
        return
    uids = [int(ln.split(":")[2]) for ln in Path("/etc/passwd").read_text().splitlines()]
    ends = [s + c for f in files for s, c in _ranges(f)] + [u + 1 for u in uids]
    start = max([1_000_000, *ends])
    start += -start % SUBID_COUNT
    line = f"nobody:{start}:{SUBID_COUNT}\n"
    added = []
    try:
        for f in files:
            text = f.read_text() if f.exists() else ""
            f.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
            added.append(f)
        yield start
    finally:
        for f in added:
            lines = f.read_text().splitlines(keepends=True)
            idx = len(lines) - 1 - lines[::-1].index(line)
            f.write_text("".join(lines[:idx] + lines[idx + 1 :]))


def _v2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"] and left.split()[3] == "/":
                return Path(left.split()[4])
    return None


@pytest.fixture
def delegated_cgroup() -> Iterator[Path]:
    """A cgroup v2 group delegated to nobody as systemd's ``Delegate=yes`` does it: made by
    root and chowned (the dir, ``cgroup.procs``, ``cgroup.subtree_control``,
    ``cgroup.threads``). Works the same on a pure v2 host (at ``/sys/fs/cgroup``) and on a
    hybrid one (``/sys/fs/cgroup/unified``). Removed at the end, deepest group first."""
    mount = _v2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted here")
    group = mount / f"vmenv-test-nobody-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    for path in (group, *(group / n for n in ("cgroup.procs", "cgroup.subtree_control"))):
        os.chown(path, NOBODY, NOBODY)
    if (group / "cgroup.threads").exists():
        os.chown(group / "cgroup.threads", NOBODY, NOBODY)
    yield group
    for dirpath, _dirs, _files in sorted(os.walk(group), key=lambda w: -len(w[0])):
        os.rmdir(dirpath)


DEBIAN_SUITE = r"""
import os
import urllib.request

import pytest

pytestmark = pytest.mark.vm("debian-12", packages=["nginx", "procps"])
START = {start}


def test_bookworm(vm):
    assert "VERSION_CODENAME=bookworm" in vm.succeed("cat /etc/os-release")


def test_systemd_and_nginx(vm):
    state = vm.run("systemctl is-system-running --wait", timeout=60).stdout.strip()
    assert state in ("running", "degraded"), vm.run("systemctl --failed --no-pager").stdout
    assert vm.succeed("systemctl is-active nginx").strip() == "active"
    users = vm.succeed("ps -o user= -C nginx").split()
    assert "root" in users and "www-data" in users, users
    vm.wait_for_port(80)
    page = urllib.request.urlopen(vm.url(80), timeout=10).read()
    assert b"Welcome to nginx" in page
    # every file belongs to a user or group of the guest's /etc/passwd and /etc/group
    assert vm.succeed(r"find / -xdev \( -nouser -o -nogroup \) -print -quit") == ""
    assert vm.succeed("stat -c %U:%G /var/log/nginx/access.log /var/lib/dpkg").split() == [
        "www-data:adm", "root:root"]
    # on the host, www-data (33) is the subordinate id START + 32, root is nobody itself
    assert {START + 32, os.getuid()} <= _host_uids("nginx"), _host_uids("nginx")


def _host_uids(name):
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        if f"Name:\t{name}\n" in status:
            found.add(int(status.split("Uid:")[1].split()[1]))
    return found


def test_useradd_user(vm):
    vm.succeed("useradd -m alice")
    assert vm.succeed("id -un", user="alice") == "alice\n"
    assert vm.succeed("stat -c %U /home/alice").strip() == "alice"
"""


def _debian_suite(area: Area, start: int) -> Path:
    DEBIAN_STATE.mkdir(mode=0o700, exist_ok=True)
    os.chown(DEBIAN_STATE, NOBODY, NOBODY)
    area.state = DEBIAN_STATE
    suite = area.home / "test_debian_unprivileged.py"
    suite.write_text(DEBIAN_SUITE.replace("{start}", str(start)))
    os.chown(suite, NOBODY, NOBODY)
    return suite


def _nobody_leftovers(start: int) -> list[str]:
    """Processes of the subordinate range, and files of it outside nobody's state dir."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            uid = os.stat(f"/proc/{pid}").st_uid
            if start <= uid < start + SUBID_COUNT:
                found.append(f"process {pid} (uid {uid})")
    for dirpath, dirs, files in os.walk(AREA_ROOT):
        if Path(dirpath) == DEBIAN_STATE / "images":
            dirs.clear()  # the image: files of the guest's users, kept for the next session
            continue
        for name in dirs + files:
            uid = os.lstat(os.path.join(dirpath, name)).st_uid
            if start <= uid < start + SUBID_COUNT:
                found.append(os.path.join(dirpath, name))
    return found


def test_debian_systemd_as_nobody(
    area: Area, nobody: Runner, nobody_subids: int, delegated_cgroup: Path
) -> None:
    """As nobody with subordinate ids and a delegated cgroup v2 group: debian-12 boots
    systemd, nginx is active with its workers as www-data and serves, every file has a guest
    owner, a ``useradd`` user runs commands; teardown leaves no process, mount, group or
    file of the guest's users (the image itself stays in nobody's state dir)."""
    _need_userns(nobody)
    if shutil.which("mmdebstrap") is None or shutil.which("newuidmap") is None:
        pytest.skip("mmdebstrap and uidmap are not installed")
    suite = _debian_suite(area, nobody_subids)
    nobody.cgroup = delegated_cgroup
    res = _pytest_as_nobody(area, nobody, suite, "-v", "--rootdir", str(area.home))
    out = res.stdout
    assert res.returncode == 0, f"stdout:\n{out}\nstderr:\n{res.stderr}"
    assert "3 passed" in out, out
    assert _nobody_leftovers(nobody_subids) == []
    assert not list((DEBIAN_STATE / "emulator" / "guests").iterdir())
    assert [p.name for p in delegated_cgroup.iterdir() if p.is_dir()] in ([], ["pytest-vmenv"])
    assert not [p for p in (delegated_cgroup / "pytest-vmenv").iterdir() if p.is_dir()]


def test_debian_systemd_without_delegated_cgroup_as_nobody(
    area: Area, nobody: Runner, nobody_subids: int
) -> None:
    """Without a delegated cgroup v2 group, init='systemd' is refused unprivileged with what
    is missing (one line per test, at collection: no build, no boot)."""
    _need_userns(nobody)
    suite = _debian_suite(area, nobody_subids)
    res = _pytest_as_nobody(area, nobody, suite, "-v", "--rootdir", str(area.home))
    line = next(ln for ln in res.stdout.splitlines() if "::test_bookworm:" in ln)
    assert "init='systemd' unprivileged needs a cgroup v2 subtree delegated to uid 65534" in line
    assert "is not delegated to uid 65534" in line and "use init='none'" in line, line


_NPROC_SCRIPT = r"""
import json, sys
from pathlib import Path
from pytest_vmenv.backend import Session
from pytest_vmenv.emulator import EmulatorBackend
from pytest_vmenv.spec import MachineSpec
rootfs, state = sys.argv[1], Path(sys.argv[2])
b = EmulatorBackend(state_dir=state, options={"pids_max": 64})
spec = MachineSpec(name="n", image=rootfs, image_config={"rootfs": rootfs})
s = Session(id="unpriv-nproc", state_dir=state)
tpl = b.build_template(spec, "unpriv-nproc", s)
ref = b.clone(tpl, spec, s)
out = {}
try:
    def run(cmd, user=None):
        r = b.execute(ref, ["/bin/sh", "-c", cmd], user=user, timeout=60)
        return [r.exit_code, r.stdout, r.stderr]
    lines = "".join(f"u{i}:x:{1000 + i}:{1000 + i}::/:/bin/sh\n" for i in range(8))
    run(f"printf '{lines}' >> /etc/passwd")
    out["maps"] = run("cat /proc/self/uid_map")[1]
    forks = "i=0; while [ $i -lt 20 ]; do sleep 30 & i=$((i+1)); done; echo $i"
    out["users"] = [run(forks, f"u{i}") for i in range(8)]
finally:
    b.destroy(ref)
    b.remove_template(tpl)
    b.close()
print(json.dumps(out))
"""


def test_full_map_bounds_all_guest_users_together_as_nobody(
    area: Area, nobody: Runner, nobody_subids: int
) -> None:
    """With a full id map, RLIMIT_NPROC (``pids_max``) still bounds the guest as a whole: eight
    guest users forking 20 processes each get no more than 64 together (the nested user
    namespace charges all of them to the guest's outer root), while each user alone is not
    held to its own count."""
    _need_userns(nobody)
    res = nobody.run(["python", "-c", _NPROC_SCRIPT, str(area.rootfs), str(area.state)])
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["maps"].split() == ["0", "0", "1", "1", "1", "65536"], out["maps"]
    assert out["users"][0][0] == 0 and out["users"][0][1].strip() == "20", out["users"][0]
    held = [i for i, (_code, _out, err) in enumerate(out["users"]) if "can't fork" in err]
    assert held and held[0] >= 3, out["users"]  # 20 each would pass a per-user limit of 64


def test_images_of_another_layout_are_refused_as_nobody(
    area: Area, nobody: Runner, nobody_subids: int
) -> None:
    """An image built by root (no ``ids`` in its ``recipe.json``), or unprivileged with other
    subordinate ranges, cannot show its owners right in nobody's guest: refused with why."""
    trees = {}
    for name, info in (("root", {}), ("other", {"ids": {"uids": [5, 65536], "gids": [5, 65536]}}),
                       ("same", {"ids": {"uids": [nobody_subids, SUBID_COUNT],
                                         "gids": [nobody_subids, SUBID_COUNT]}})):  # fmt: skip
        (area.home / name / "rootfs").mkdir(parents=True)
        (area.home / name / "recipe.json").write_text(json.dumps(info))
        trees[name] = str(area.home / name / "rootfs")
    _chown_tree(area.home)
    os.chown(area.home / "root" / "rootfs", 0, 0)  # as root's build leaves it
    check = (
        "import json, sys; from pathlib import Path; from pytest_vmenv.images import subids; "
        "trees = json.loads(sys.argv[1]); "
        "print(json.dumps({n: subids.id_problem(Path(p)) for n, p in trees.items()}))"
    )
    res = nobody.run(["python", "-c", check, json.dumps(trees)], 60)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert "was built as root" in found["root"] and "VMENV_STATE_DIR" in found["root"], found
    assert "was built with the subordinate ids" in found["other"], found
    assert "vmenv images rm" in found["other"] and found["same"] is None, found


def test_examples_as_nobody(
    area: Area, nobody: Runner, nobody_subids: int, delegated_cgroup: Path
) -> None:
    """The emulator examples as nobody, with subordinate ids and a delegated cgroup v2 group:
    every example on the Debian image passes unprivileged (systemd, nginx, curl, provisioning,
    a module-scoped service, snapshot/revert, ``vm.url``), those on a private network too."""
    _need_userns(nobody)
    if shutil.which("mmdebstrap") is None or shutil.which("newuidmap") is None:
        pytest.skip("mmdebstrap and uidmap are not installed")
    _debian_suite(area, nobody_subids)  # nobody's image cache, kept across sessions
    examples = area.home / "examples"
    shutil.copytree(
        Path(CHECKOUT) / "examples", examples, ignore=shutil.ignore_patterns("__pycache__")
    )
    _chown_tree(examples)
    nobody.cgroup = delegated_cgroup
    res = _pytest_as_nobody(area, nobody, examples, "-rs", "--rootdir", str(examples))
    out = res.stdout
    assert res.returncode == 0, f"stdout:\n{out}\nstderr:\n{res.stderr}"
    summary = out.strip().splitlines()[-1]
    assert "19 passed" in summary and "skipped" not in summary, out
    assert _nobody_leftovers(nobody_subids) == []
