"""vSphere-specific behaviour against vcsim: labels, secrets, re-login, TLS, tasks, templates."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import VCSIM_BIN, VCSIM_DIR, LabBackend, admin, base_spec, options
from pyVim.connect import Disconnect
from pyVmomi import vim
from vmenv_vsphere import Secret, VsphereBackend, VsphereConfig, vms
from vmenv_vsphere.connection import Connection
from vmenv_vsphere.vms import check_name, props

from pytest_vmenv import errors
from pytest_vmenv.backend import Session
from pytest_vmenv.paths import state_dir


def _session(name: str = "vs") -> Session:
    return Session(id=f"{name}-{os.urandom(4).hex()}", state_dir=state_dir(), worker_id="vs")


@pytest.fixture
def session() -> Session:
    return _session()


@pytest.fixture
def template(lab_backend: LabBackend) -> Any:
    return lab_backend.build_template(base_spec(), "vs-base", _session())


# -- configuration and secrets --------------------------------------------------------------


def test_govc_variables_fill_the_config() -> None:
    env = {
        "GOVC_URL": "https://alice:s3cr%21t@vc.example:8443/sdk", "GOVC_INSECURE": "1",
        "GOVC_DATACENTER": "DC9",
    }  # fmt: skip
    cfg = VsphereConfig.load({}, env)
    assert (cfg.host, cfg.port, cfg.user, cfg.datacenter) == ("vc.example", 8443, "alice", "DC9")
    assert cfg.password.reveal() == "s3cr!t" and cfg.insecure
    assert "s3cr" not in repr(cfg) and "s3cr" not in str(cfg)
    table = VsphereConfig.load({"host": "vc2", "user": "bob", "password": "pw"}, env)
    assert (table.host, table.user, table.password.reveal()) == ("vc2", "bob", "pw")
    assert not VsphereConfig.load({}, {}).insecure  # verified unless said otherwise
    with pytest.raises(errors.ConfigError, match="Choose one of"):
        VsphereConfig.load({"hots": "x"}, {})


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in f"{secret} {secret!r} {[secret]}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


@pytest.fixture(scope="module")
def strict_vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A second vcsim that accepts only user ``vmenv`` with a password: (url, ca, password)."""
    password = "strict-" + os.urandom(6).hex()
    run = VCSIM_DIR / "runs" / f"strict-{os.getpid()}"
    for sub in ("work", "tmp"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "-R", "nobody", str(run)], check=True)
    cmd = (
        f"cd {run}/work && TMPDIR={run}/tmp exec {VCSIM_BIN} -l 127.0.0.1:0 "
        f"-username vmenv -password {password} -url-file {run}/url -cert-file {run}/cert.pem"
    )
    proc = subprocess.Popen(["su", "-s", "/bin/sh", "nobody", "-c", cmd], start_new_session=True)
    try:
        for _ in range(100):
            if (run / "url").exists():
                break
            time.sleep(0.05)
        yield (run / "url").read_text().strip(), str(run / "cert.pem"), password
    finally:
        os.killpg(proc.pid, 15)  # the group of the su we started, and the vcsim under it
        proc.wait()
        shutil.rmtree(run, ignore_errors=True)


def test_password_never_leaks(
    pytester: pytest.Pytester, strict_vcsim: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca, password = strict_vcsim
    wrong = "wrong-" + os.urandom(6).hex()
    monkeypatch.setenv("VS_GOOD", password)  # as a user would: from the environment
    monkeypatch.setenv("VS_WRONG", wrong)
    pytester.makepyfile(
        f"""
        import logging, os
        from vmenv_vsphere import VsphereBackend

        def test_good_login_logs_nothing_secret(caplog):
            caplog.set_level(logging.DEBUG)
            backend = VsphereBackend({{"host": {url!r}, "user": "vmenv",
                                      "password": os.environ["VS_GOOD"], "ca_file": {ca!r}}},
                                     environ={{}})
            backend.check()
            print(repr(backend), backend.config)
            backend.close()

        def test_failed_login():
            backend = VsphereBackend({{"host": {url!r}, "user": "vmenv",
                                      "password": os.environ["VS_WRONG"], "ca_file": {ca!r}}},
                                     environ={{}})
            backend.check()
        """
    )
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-l", "--tb=long", "-o", "log_level=DEBUG", "-o", "log_cli=true",
        "-o", "log_cli_level=DEBUG", f"--junitxml={xml}", "-rA",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str() + result.stderr.str()
    assert "incorrect user name or password" in output  # the failure is reported...
    for text in (output, xml.read_text()):  # ...and no password is, anywhere
        assert password not in text
        assert wrong not in text


def test_relogin_after_session_is_terminated(
    lab_backend: LabBackend, vcsim: dict[str, str]
) -> None:
    key = lab_backend.conn.content.sessionManager.currentSession.key
    si = admin(vcsim)
    si.content.sessionManager.TerminateSession([key])
    list(lab_backend.owned("nobody-has-this-session"))  # transparently logs in again
    assert lab_backend.conn.content.sessionManager.currentSession.key != key


def test_certificates_are_verified_and_insecure_warns_once(
    vcsim: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    unverified = VsphereBackend({"host": vcsim["GOVC_URL"], "user": "u", "password": "p"}, {})
    with pytest.raises(errors.BackendUnavailable, match="ca_file"):
        unverified.check()
    caplog.set_level(logging.WARNING, "vmenv.vsphere")
    port = urlsplit(vcsim["GOVC_URL"]).port
    for _ in range(2):  # a second connection in this process: still one warning
        insecure = VsphereBackend({"host": f"127.0.0.1:{port}", "user": "u", "password": "p2",
                                   "insecure": True}, {})  # fmt: skip
        insecure.check()
        insecure.close()
    assert [r.getMessage() for r in caplog.records].count(
        caplog.records[0].getMessage()
    ) == 1 and "verification is OFF" in caplog.text


@pytest.fixture
def dead_url() -> Iterator[str]:
    """An https URL on 127.0.0.1 where connecting is refused (a bound, never listening port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/sdk"


def test_dead_endpoint_is_one_clear_line(dead_url: str) -> None:
    backend = VsphereBackend({"host": dead_url, "user": "u", "password": "p"}, environ={})
    with pytest.raises(errors.BackendUnavailable) as info:
        backend.check()
    reason = info.value.reason
    assert reason.startswith(f"cannot reach vSphere at {dead_url}: connection refused"), reason
    assert "GOVC_URL" in reason and "Errno" not in reason and "\n" not in reason


def test_stale_govc_url_stops_the_suite_once(dead_url: str) -> None:
    """A stopped vcsim behind a stale GOVC_URL: one usage error before any test, no traceback."""
    ca = ssl.get_default_verify_paths().cafile or ""  # a certificate file that is still there
    env = {**os.environ, "GOVC_URL": dead_url, "VMENV_VCSIM_CA": ca}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_conformance.py"],
        cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert f"vcsim is not running at {dead_url} (connection refused" in out, out
    assert "vsphere.sh start" in out
    assert "ConnectionRefused" not in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 3, out


# -- clones, labels, ownership ---------------------------------------------------------------


def test_clone_is_labelled_sized_and_in_the_session_folder(
    lab_backend: LabBackend, template: Any, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: dict[str, Any] = {}
    clone_vm = vms.clone_vm
    monkeypatch.setattr(vms, "clone_vm", lambda *a, **k: sent.update(k) or clone_vm(*a, **k))
    spec = replace(base_spec("sized"), cpus=2, memory=1024**3)
    ref = lab_backend.clone(template, spec, session)
    try:
        vm = lab_backend._vm(ref.id)
        got = props(lab_backend.conn, vm, ["config", "parent", "runtime.powerState"])
        labels = {o.key: o.value for o in got["config"].extraConfig}
        assert labels["guestinfo.vmenv.session"] == session.id
        assert labels["guestinfo.vmenv.owner"] == session.owner
        # vcsim drops CloneSpec.config.annotation (vCenter keeps it): check what was sent
        assert "pytest-vmenv" in sent["annotation"] and session.id in sent["annotation"]
        assert (got["config"].hardware.numCPU, got["config"].hardware.memoryMB) == (2, 1024)
        assert got["parent"].name == f"vmenv-{session.id}"
        assert got["runtime.powerState"] == "poweredOn" and ref.ip == "127.0.0.1"
        (mine,) = lab_backend.owned(session.id)
        assert (mine.id, mine.name, mine.owner, mine.kept) == (
            ref.id,
            "sized",
            session.owner,
            False,
        )
        lab_backend.keep(ref)
        assert next(iter(lab_backend.owned(session.id))).kept
    finally:
        lab_backend.destroy(ref)


def test_names_with_path_separators_are_refused(
    lab_backend: LabBackend, template: Any, session: Session
) -> None:
    for bad in ("../x", "a/b", "a\\b", "50%", ""):
        with pytest.raises(errors.ConfigError, match="not allowed"):
            check_name(bad)
    with pytest.raises(errors.ConfigError):
        lab_backend.clone(template, replace(base_spec(), name="../escape"), session)
    assert not list(lab_backend.owned(session.id))


def test_destroy_works_from_another_process(
    lab_backend: LabBackend, template: Any, session: Session, vcsim: dict[str, str],
    vcsim_password: str,
) -> None:  # fmt: skip
    ref = lab_backend.clone(template, base_spec("elsewhere"), session)
    script = (
        "import sys, json; from vmenv_vsphere import VsphereBackend\n"
        "b = VsphereBackend(json.loads(sys.argv[1]), environ={})\n"
        "for r in b.owned(sys.argv[2]): b.destroy(r); b.destroy(r)\n"
        "print(len(list(b.owned(sys.argv[2]))))\n"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(options(vcsim, vcsim_password)), session.id],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == "0"
    with pytest.raises(errors.MachineGone):
        lab_backend.execute(ref, ["true"])


def test_snapshot_and_revert_through_the_api(
    lab_backend: LabBackend, template: Any, session: Session
) -> None:
    ref = lab_backend.clone(template, replace(base_spec("snap"), isolation="revert"), session)
    try:
        snap = lab_backend.snapshot(ref, "before")
        vm = lab_backend._vm(ref.id)
        tree = props(lab_backend.conn, vm, ["snapshot"])["snapshot"]
        names = {n.name for n in tree.rootSnapshotList} | {
            c.name for n in tree.rootSnapshotList for c in n.childSnapshotList
        }
        assert {"vmenv-base", "before"} <= names
        lab_backend.revert(ref, snap)
        current = props(lab_backend.conn, vm, ["snapshot"])["snapshot"].currentSnapshot
        assert f"{ref.id}/{current._moId}" == snap.handle
        lab_backend.revert(ref, template)  # isolation="revert": back to the base snapshot
        current = props(lab_backend.conn, vm, ["snapshot"])["snapshot"].currentSnapshot
        assert current._moId == ref.data["base_snapshot"]
        assert lab_backend.execute(ref, ["true"]).ok  # powered on and reachable again
    finally:
        lab_backend.destroy(ref)


def test_revert_to_template_without_base_snapshot_says_how(
    lab_backend: LabBackend, template: Any, session: Session
) -> None:
    ref = lab_backend.clone(template, base_spec("plain"), session)
    try:
        with pytest.raises(errors.BackendError, match="isolation='revert'"):
            lab_backend.revert(ref, template)
    finally:
        lab_backend.destroy(ref)


def test_templates_are_reused_and_listed(lab_backend: LabBackend) -> None:
    spec = replace(base_spec("tpl"), provision=("echo built > /var/tmp/built",))
    key = "vs-reuse-" + os.urandom(3).hex()
    built_by = _session("a")
    first = lab_backend.build_template(spec, key, built_by)
    assert (first.session, first.owner, first.reuse, first.complete) == (
        built_by.id, built_by.owner, False, True,
    )  # fmt: skip
    try:
        again = lab_backend.build_template(spec, key, _session("b"))  # another session
        assert again.handle == first.handle
        assert key in {t.key for t in lab_backend.templates()}
        (listed,) = [t for t in lab_backend.templates() if t.key == key]
        assert (listed.session, listed.owner, listed.reuse, listed.complete) == (
            built_by.id, built_by.owner, False, True,
        )  # fmt: skip
        assert abs(listed.created - first.created) < 60
        assert not [r for r in lab_backend.owned() if r.id == first.handle.partition("/")[0]]
    finally:
        lab_backend.remove_template(first)
    assert key not in {t.key for t in lab_backend.templates()}
    lab_backend.remove_template(first)  # already gone: fine


def test_a_template_with_a_kept_linked_clone_is_left_until_the_clone_is_gone(
    lab_backend: LabBackend,
) -> None:
    """A linked clone reads its template's snapshot disks: the template VM stays while one
    (kept, as ``--vm-keep`` leaves it) exists, and goes once the clone is destroyed."""
    spec = replace(base_spec("tplkeep"), provision=("echo built > /var/tmp/built",))
    session = _session("keep")
    template = lab_backend.build_template(spec, "vs-keep-" + os.urandom(3).hex(), session)
    try:
        ref = lab_backend.clone(template, spec, session)
        try:
            lab_backend.keep(ref)
            with pytest.raises(errors.TemplateInUse) as info:
                lab_backend.remove_template(template)
            assert info.value.holder == f"machine tplkeep ({ref.id}) is a linked clone of it"
            assert template.key in {t.key for t in lab_backend.templates()}
            assert lab_backend.execute(ref, ["cat", "/var/tmp/built"]).stdout == "built\n"
        finally:
            lab_backend.destroy(ref)
        lab_backend.remove_template(template)
        assert template.key not in {t.key for t in lab_backend.templates()}
    finally:
        with contextlib.suppress(errors.VmenvError):
            lab_backend.remove_template(template)


def test_missing_snapshot_is_a_config_error_naming_the_fix(lab_backend: LabBackend) -> None:
    spec = base_spec(snapshot="nope", create_snapshot=False)
    with pytest.raises(errors.ConfigError, match="create_snapshot"):
        lab_backend.build_template(spec, "k", _session())
    with pytest.raises(errors.ConfigError, match="no VM or template"):
        lab_backend.build_template(base_spec(template="no-such-vm"), "k", _session())


def test_task_faults_carry_their_message(lab_backend: LabBackend, template: Any) -> None:
    source, _ = lab_backend._split(template)  # the powered-off base VM
    with pytest.raises(errors.BackendError, match=r"power off base: InvalidPowerState: \S+"):
        lab_backend.conn.wait(source.PowerOffVM_Task(), "power off base")


def test_task_wait_is_bounded() -> None:
    class Stuck:
        _moId = "task-1"
        info = vim.TaskInfo(state=vim.TaskInfo.State.running)

    conn = Connection(VsphereConfig.load({"host": "127.0.0.1"}, {}))
    start = time.monotonic()
    with pytest.raises(errors.BackendError, match=r"did not finish within 0\.3s"):
        conn.wait(Stuck(), "stuck", timeout=0.3)
    assert time.monotonic() - start < 2


def test_commands_without_ssh_config_say_what_to_set(
    vcsim: dict[str, str], vcsim_password: str, template: Any, session: Session
) -> None:
    backend = VsphereBackend(options(vcsim, vcsim_password), environ={})
    ref = backend.clone(template, base_spec("nossh"), session)  # ready = Tools IP only
    try:
        with pytest.raises(errors.BackendError, match="ssh_key or ssh_password"):
            backend.execute(ref, ["true"])
    finally:
        backend.destroy(ref)
        backend.close()


def test_ssh_password_auth(
    vcsim: dict[str, str], vcsim_password: str, lab: Any, template: Any, session: Session,
    tmp_path: Path,
) -> None:  # fmt: skip
    backend = LabBackend(options(vcsim, vcsim_password, ssh_password="guest-pw"), environ={})
    backend.lab = lab
    ref = backend.clone(template, base_spec("pw"), session)
    try:
        assert backend.execute(ref, ["cat", "/proc/sys/kernel/hostname"]).stdout == "pw\n"
        assert "guest-pw" not in repr(backend._channels[ref.id])
    finally:
        backend.destroy(ref)
        backend.close()


def test_plugin_end_to_end_on_xdist_workers(
    pytester: pytest.Pytester, vcsim: dict[str, str], base_template: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Markers -> orchestrator -> this backend on two xdist workers, and nothing left after."""
    pytester.makefile(
        ".toml",
        vmenv=f"""
        backend = "vsphere"
        [images.base]
        vsphere.template = "{base_template}"
        vsphere.snapshot = "clean"
        vsphere.extra_config = {{ "SET.guest.ipAddress" = "127.0.0.1" }}
        [backends.vsphere]
        host = "{vcsim["GOVC_URL"]}"
        user = "e2e"
        password = "{{{{ env.E2E_PW }}}}"
        ca_file = "{vcsim["VMENV_VCSIM_CA"]}"
        """,
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(4))
        @pytest.mark.vm(image="base", memory="64M", cpus=2)
        def test_clone(vm, vmenv_backend, i):
            assert vm.ip == "127.0.0.1"
            assert vm.ref.id in {r.id for r in vmenv_backend.owned(vm.ref.session)}
        """
    )
    monkeypatch.setenv("E2E_PW", "e2e-pw")
    si = admin(vcsim)

    def session_folders() -> set[str]:
        view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.Folder], True)
        names = {f.name for f in view.view if f.name.startswith("vmenv-2")}  # vmenv-<session id>
        view.Destroy()
        return names

    before = session_folders()
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "-p", "no:hypothesispytest", "-p", "no:benchmark"
    )
    result.assert_outcomes(passed=4)
    assert session_folders() <= before  # the last worker out removed the session's folder
    Disconnect(si)
    backend = VsphereBackend({"host": vcsim["GOVC_URL"], "user": "e2e", "password": "x",
                              "ca_file": vcsim["VMENV_VCSIM_CA"]}, environ={})  # fmt: skip
    assert not [r for r in backend.owned() if r.data["vm_name"].startswith("vm-")]
    backend.close()
