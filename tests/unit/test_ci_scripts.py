"""The CI scripts in ``.ci/``: the preflight, what ``vsphere.sh`` trusts, who stops libvirtd.

These run the real scripts against real processes standing in for the services (``sleep``
under the name ``vcsim`` or ``libvirtd``, running as the user the real one runs as), so no
package is installed and no daemon started: the checks under test are on pids, users, working
directories, files and URLs, which the stand-ins have exactly as the real ones do.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / ".ci"
NOBODY = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs a stand-in vcsim as user nobody: needs root"
)


def checkout_key() -> str:
    """The run-directory name the scripts give this checkout (``checkout_key`` in lib.sh)."""
    repo = str(ROOT.resolve())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(repo))
    return f"{name}-{hashlib.sha256(repo.encode()).hexdigest()[:12]}"


def ci(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CI / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def started_at(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def gone(proc: subprocess.Popen[bytes], seconds: float = 15) -> bool:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


class StandIns:
    """``sleep`` processes named like the daemons they stand in for; all killed at the end."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, comm: str, cwd: Path | None = None, user: int | None = None
    ) -> subprocess.Popen[bytes]:
        link = (cwd or self.where) / comm
        if not link.exists():
            link.symlink_to(shutil.which("sleep") or "/bin/sleep")
        # a relative path: nobody needs no right on the parents of cwd, which root entered
        proc = subprocess.Popen(
            [f"./{comm}", "300"], cwd=cwd or self.where, user=user, group=user,
            extra_groups=[] if user is not None else None,
        )  # fmt: skip
        self.procs.append(proc)
        for _ in range(100):
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == comm:
                return proc
            time.sleep(0.02)
        raise AssertionError(f"the stand-in {comm} did not start")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[StandIns]:
    procs = StandIns(tmp_path)
    yield procs
    procs.close()


# -- .ci/deps: the preflight --------------------------------------------------------------


def test_preflight_names_each_missing_program_and_its_package_and_exits_1(tmp_path: Path) -> None:
    table = tmp_path / "programs"
    table.write_text(
        "# group what package\n"
        "emulator  sh                          dash\n"
        "emulator  vmenv-no-such-program       vmenv-pkg-one\n"
        "libvirt   /nonexistent/vmenv/header.h vmenv-pkg-two\n"
    )
    done = ci("deps", "check", env={"VMENV_CI_PROGRAMS": str(table)})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr  # every missing entry, not only the first; not sh
    assert "vmenv-no-such-program is missing (needed by the emulator tests)" in lines[0]
    assert "apt-get install --no-install-recommends vmenv-pkg-one" in lines[0]
    assert "/nonexistent/vmenv/header.h is missing (needed by the libvirt tests)" in lines[1]
    assert "apt-get install --no-install-recommends vmenv-pkg-two" in lines[1]

    only_sh = ci("deps", "check", "emulator", env={"VMENV_CI_PROGRAMS": str(table)})
    assert only_sh.returncode == 1 and "vmenv-pkg-two" not in only_sh.stderr


def test_the_programs_table_lists_the_header_libvirt_python_compiles_against() -> None:
    rows = [line.split() for line in (CI / "programs").read_text().splitlines()]
    entries = {row[1]: row[2] for row in rows if len(row) == 3 and not row[0].startswith("#")}
    assert entries.get("/usr/include/python3.11/Python.h") == "libpython3.11-dev"
    assert "stops at the first" not in (CI / "programs").read_text()


# -- .ci/vsphere.sh: what it prints is eval'd as root ----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:1/sdk$(touch {marker})",
        "https://127.0.0.1:1/sdk`touch {marker}`",
        "https://127.0.0.1:1/sdk;touch {marker}",
        "https://127.0.0.1:1/sdk\ntouch {marker}",
        "https://127.0.0.1:1/sdk\n",
        "https://127.0.0.1:1/sdkX",
        "https://127.0.0.1:/sdk",
        "https://127.0.0.12:1/sdk",
        "https://127.0.0.1.evil:1/sdk",
        "http://127.0.0.1:1/sdk",
        "",
    ],
)
def test_vsphere_refuses_a_url_vcsim_would_not_write(tmp_path: Path, url: str) -> None:
    marker = tmp_path / "ran"
    done = ci("vsphere.sh", "validate-url", url.format(marker=marker))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not a vcsim URL" in done.stderr
    assert not marker.exists()


def test_vsphere_accepts_the_url_vcsim_writes() -> None:
    done = ci("vsphere.sh", "validate-url", "https://127.0.0.1:40123/sdk")
    assert done.returncode == 0, done.stderr


@pytest.fixture
def vcsim_run(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """VMENV_VCSIM_DIR for the scripts, and this checkout's run directory in it."""
    top = tmp_path / "vcsim"
    run = top / "runs" / checkout_key()
    for sub in ("work", "tmp", "out"):
        (run / sub).mkdir(parents=True)
        os.chown(run / sub, NOBODY, -1)
    yield {"VMENV_VCSIM_DIR": str(top)}, run


def nobody_writes(path: Path, text: str) -> None:
    path.write_text(text)
    os.chown(path, NOBODY, -1)


CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@as_root
def test_vsphere_stop_finds_a_vcsim_whose_start_never_recorded_its_pid(
    stand_ins: StandIns, vcsim_run: tuple[dict[str, str], Path]
) -> None:
    env, run = vcsim_run
    vcsim = stand_ins.start("vcsim", cwd=run / "work", user=NOBODY)
    nobody_writes(run / "out" / "pid", f"{vcsim.pid}\n")  # what vcsim wrote; no run/pid
    done = ci("vsphere.sh", "stop", env=env)
    assert done.returncode == 0, done.stderr
    assert gone(vcsim), "stop left the vcsim running (and removed its run directory)"
    assert not run.exists()


@as_root
@pytest.mark.parametrize("spelling", ["dot-dot and slashes", "through a symlink"])
def test_vsphere_stop_finds_its_vcsim_whatever_the_spelling_of_vmenv_vcsim_dir(
    stand_ins: StandIns, vcsim_run: tuple[dict[str, str], Path], tmp_path: Path, spelling: str
) -> None:
    _, run = vcsim_run
    vcsim = stand_ins.start("vcsim", cwd=run / "work", user=NOBODY)
    nobody_writes(run / "out" / "pid", f"{vcsim.pid}\n")
    (run / "pid").write_text(f"{vcsim.pid}\n")  # as a start that got through records it
    if spelling == "through a symlink":
        (tmp_path / "link").symlink_to(tmp_path / "vcsim")
        env = {"VMENV_VCSIM_DIR": str(tmp_path / "link")}
    else:
        env = {"VMENV_VCSIM_DIR": f"{tmp_path}//runs/../vcsim/"}
    done = ci("vsphere.sh", "stop", env=env)
    assert done.returncode == 0, done.stderr
    assert gone(vcsim), "stop left the vcsim running (and removed its run directory)"
    assert not run.exists()


@as_root
def test_vsphere_stop_leaves_a_process_that_is_not_this_runs_vcsim(
    stand_ins: StandIns, vcsim_run: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, run = vcsim_run
    elsewhere = tmp_path / "other-work"
    elsewhere.mkdir()
    other = stand_ins.start("vcsim", cwd=elsewhere, user=NOBODY)  # another checkout's vcsim
    roots = stand_ins.start("vcsim", cwd=run / "work")  # root's, in this run's work/
    nobody_writes(run / "out" / "pid", f"{other.pid}\n")
    (run / "pid").write_text(f"{roots.pid}\n")
    assert ci("vsphere.sh", "stop", env=env).returncode == 0
    assert other.poll() is None and roots.poll() is None


@as_root
def test_vsphere_env_prints_quoted_exports_and_roots_copy_of_the_certificate(
    stand_ins: StandIns, vcsim_run: tuple[dict[str, str], Path]
) -> None:
    env, run = vcsim_run
    vcsim = stand_ins.start("vcsim", cwd=run / "work", user=NOBODY)
    nobody_writes(run / "out" / "pid", f"{vcsim.pid}\n")
    nobody_writes(run / "out" / "url", "https://127.0.0.1:40123/sdk\n")
    nobody_writes(run / "out" / "cert.pem", CERT)
    done = ci("vsphere.sh", "env", env=env)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        ["bash", "-c", 'eval "$1" && printf "%s\\n" "$GOVC_URL" "$VMENV_VCSIM_CA"', "-",
         done.stdout],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert shown == ["https://127.0.0.1:40123/sdk", str(run / "ca.pem")]
    ca = run / "ca.pem"
    assert ca.read_text() == CERT and ca.stat().st_uid == 0 and not ca.is_symlink()


@as_root
@pytest.mark.parametrize(
    ("name", "planted"),
    [
        ("url", "https://127.0.0.1:1/sdk$(touch {marker})\n"),
        ("url", "symlink"),
        ("pid", "symlink"),
        ("pid", "1\n"),
        ("cert.pem", "symlink"),
        ("cert.pem", "fifo"),
    ],
)
def test_vsphere_env_refuses_what_nobody_planted_in_out(
    stand_ins: StandIns, vcsim_run: tuple[dict[str, str], Path], tmp_path: Path,
    name: str, planted: str,
) -> None:  # fmt: skip
    env, run = vcsim_run
    marker = tmp_path / "ran"
    secret = tmp_path / "root-only"
    secret.write_text("https://127.0.0.1:1/sdk\n" if name == "url" else CERT)
    secret.chmod(0o600)
    vcsim = stand_ins.start("vcsim", cwd=run / "work", user=NOBODY)
    files = {
        "pid": f"{vcsim.pid}\n",
        "url": "https://127.0.0.1:40123/sdk\n",
        "cert.pem": CERT,
    }
    for each, text in files.items():
        if each != name:
            nobody_writes(run / "out" / each, text)
    target = run / "out" / name
    if planted == "symlink":
        target.symlink_to(secret if name != "pid" else run / "pid")
        if name == "pid":
            (run / "pid").write_text(f"{vcsim.pid}\n")
    elif planted == "fifo":
        os.mkfifo(target)
    else:
        nobody_writes(target, planted.format(marker=marker))
    done = ci("vsphere.sh", "env", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert re.search("refusing|unexpected URL|names no vcsim", done.stderr), done.stderr
    assert not marker.exists()
    assert not (run / "ca.pem").exists()


# -- .ci/libvirt.sh: a daemon another live run uses is never stopped --------------------------


@pytest.fixture
def libvirt_run(tmp_path: Path, stand_ins: StandIns) -> tuple[dict[str, str], Path]:
    """VMENV_CI_LIBVIRT_RUN with stand-in daemons recorded as started by libvirt.sh."""
    book = tmp_path / "libvirtd-run"
    (book / "users").mkdir(parents=True)
    lines = []
    for name in ("libvirtd", "virtlogd"):
        proc = stand_ins.start(name)
        lines.append(f"{name} {proc.pid} {started_at(proc.pid)} {name}")
    (book / "daemon").write_text("\n".join([*lines, "starter some-checkout-0123456789ab"]) + "\n")
    me = os.getpid()
    (book / "users" / checkout_key()).write_text(f"{me} {started_at(me)}\n")
    return {"VMENV_CI_LIBVIRT_RUN": str(book), "VMENV_CI_USER_PID": str(me)}, book


def daemons(stand_ins: StandIns) -> list[subprocess.Popen[bytes]]:
    return stand_ins.procs[:2]  # libvirtd, virtlogd


def test_libvirt_stop_leaves_the_daemons_while_another_live_run_uses_them(
    stand_ins: StandIns, libvirt_run: tuple[dict[str, str], Path]
) -> None:
    env, book = libvirt_run
    other = stand_ins.start("pytest")  # the other checkout's test-all
    (book / "users" / "other-checkout-0123456789ab").write_text(
        f"{other.pid} {started_at(other.pid)}\n"
    )
    done = ci("libvirt.sh", "stop", env=env)
    assert done.returncode == 0, done.stderr
    assert "still used by other-checkout-0123456789ab" in done.stdout
    assert all(p.poll() is None for p in daemons(stand_ins)), "stopped a daemon in use"
    assert not (book / "users" / checkout_key()).exists()

    other.send_signal(signal.SIGTERM)  # the other run ends (without its stop: it crashed)
    other.wait()
    (book / "users" / checkout_key()).write_text(f"{os.getpid()} {started_at(os.getpid())}\n")
    done = ci("libvirt.sh", "stop", env=env)
    assert done.returncode == 0, done.stderr
    assert all(gone(p) for p in daemons(stand_ins)), "the last run left the daemons running"
    assert not (book / "daemon").exists()
    assert not (book / "users" / "other-checkout-0123456789ab").exists()


def test_libvirt_stop_never_stops_a_libvirtd_it_did_not_start(
    stand_ins: StandIns, libvirt_run: tuple[dict[str, str], Path]
) -> None:
    env, book = libvirt_run
    libvirtd = stand_ins.procs[0]
    # the record names the pid with another start time: that libvirtd is not the one started
    real = f"libvirtd {libvirtd.pid} {started_at(libvirtd.pid)}"
    record = (book / "daemon").read_text().replace(real, f"libvirtd {libvirtd.pid} 1")
    (book / "daemon").write_text(record.replace("virtlogd", "virtlogd-gone", 1))
    done = ci("libvirt.sh", "stop", env=env)
    assert done.returncode == 0, done.stderr
    assert all(p.poll() is None for p in daemons(stand_ins))
