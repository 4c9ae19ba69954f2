"""The VMware Tools guest-operations channel (:mod:`vmenv_vsphere.guestops`).

vcsim 0.24.2 does not implement guest operations (``MethodNotFound``), so the channel is
tested against :class:`FakeGuestOps`: a processManager/fileManager that keeps the real API's
contract (StartProgramInGuest runs ``"programPath" arguments`` through ``/bin/sh -c`` with no
stdio and returns a pid; ListProcessesInGuest reports ``endTime``/``exitCode`` once it has
ended; file transfers hand out one-shot ``https://*:PORT/guestFile?...`` URLs) with real local
processes standing in for the guest's, and a real HTTPS server on 127.0.0.1 whose self-signed
certificate the channel verifies through the connection's ``ca_file``. The last tests run the
backend against the real vcsim to prove the limitation is reported plainly.
"""

from __future__ import annotations

import datetime
import http.server
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import base_spec, options
from pyVmomi import vim, vmodl
from vmenv_vsphere import VsphereBackend, VsphereConfig
from vmenv_vsphere.connection import Connection
from vmenv_vsphere.guestops import GuestOpsChannel

from pytest_vmenv import errors
from pytest_vmenv.backend import Session
from pytest_vmenv.paths import state_dir

PASSWORD = "guest-" + secrets.token_hex(8)
WRONG = "wrong-" + secrets.token_hex(8)
BAD_LOGIN = "Failed to authenticate with the guest operating system using the supplied credentials."


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return cert_path, key_path


class FakeGuestOps:
    """``guestOperationsManager`` of one guest whose processes are local ones."""

    def __init__(self, root: Path, vm: Any, user: str = "root", password: str = PASSWORD) -> None:
        self.root, self.vm, self.user, self.password = root, vm, user, password
        self.tmp = root / "guest-tmp"
        self.tmp.mkdir()
        self.procs: dict[int, tuple[subprocess.Popen[bytes], datetime.datetime]] = {}
        self.ended: dict[int, datetime.datetime] = {}
        self.tickets: dict[str, tuple[str, str, int]] = {}  # token -> (method, path, size)
        self.calls: list[str] = []
        self.terminated: list[int] = []
        self.port = 0
        self.processManager = self.fileManager = self

    def _check(self, vm: Any, auth: Any, method: str) -> None:
        self.calls.append(method)
        assert vm is self.vm
        if not isinstance(auth, vim.vm.guest.NamePasswordAuthentication) or (
            auth.username, auth.password) != (self.user, self.password):  # fmt: skip
            raise vim.fault.InvalidGuestLogin(msg=BAD_LOGIN)

    # -- processManager --------------------------------------------------------------------
    def StartProgramInGuest(self, vm: Any, auth: Any, spec: Any) -> int:
        self._check(vm, auth, "StartProgramInGuest")
        assert isinstance(spec, vim.vm.guest.ProcessManager.ProgramSpec)
        line = f'"{spec.programPath}" {spec.arguments}'  # what open-vm-tools hands /bin/sh -c
        proc = subprocess.Popen(
            ["/bin/sh", "-c", line], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=spec.workingDirectory or self.root,
            start_new_session=True, env={"PATH": os.environ["PATH"], "HOME": str(self.root)},
        )  # fmt: skip
        self.procs[proc.pid] = (proc, datetime.datetime.now(datetime.UTC))
        return proc.pid

    def ListProcessesInGuest(self, vm: Any, auth: Any, pids: list[int]) -> list[Any]:
        self._check(vm, auth, "ListProcessesInGuest")
        out = []
        for pid in pids:
            if pid not in self.procs:
                continue
            proc, started = self.procs[pid]
            code = proc.poll()
            if code is not None and pid not in self.ended:
                self.ended[pid] = datetime.datetime.now(datetime.UTC)
            out.append(vim.vm.guest.ProcessManager.ProcessInfo(
                name="sh", pid=pid, owner=self.user, cmdLine=" ".join(map(str, proc.args)),
                startTime=started, endTime=self.ended.get(pid),
                exitCode=None if code is None else (code if code >= 0 else 128 - code),
            ))  # fmt: skip
        return out

    def TerminateProcessInGuest(self, vm: Any, auth: Any, pid: int) -> None:
        self._check(vm, auth, "TerminateProcessInGuest")
        if pid not in self.procs or self.procs[pid][0].poll() is not None:
            raise vim.fault.GuestProcessNotFound(pid=pid)
        self.terminated.append(pid)
        self.procs[pid][0].kill()

    # -- fileManager -----------------------------------------------------------------------
    def CreateTemporaryDirectoryInGuest(
        self, vm: Any, auth: Any, prefix: str, suffix: str, directoryPath: str | None = None
    ) -> str:
        self._check(vm, auth, "CreateTemporaryDirectoryInGuest")
        return tempfile.mkdtemp(suffix, prefix, directoryPath or self.tmp)

    def DeleteDirectoryInGuest(self, vm: Any, auth: Any, path: str, recursive: bool) -> None:
        self._check(vm, auth, "DeleteDirectoryInGuest")
        if not os.path.isdir(path):
            raise vim.fault.FileNotFound(file=path, msg=f"{path} not found")
        shutil.rmtree(path) if recursive else os.rmdir(path)

    def _url(self, method: str, path: str, size: int) -> str:
        token = secrets.token_hex(8)
        self.tickets[token] = (method, path, size)
        return f"https://*:{self.port}/guestFile?id=42&token={token}"

    def InitiateFileTransferToGuest(
        self, vm: Any, auth: Any, path: str, attributes: Any, size: int, overwrite: bool
    ) -> str:
        self._check(vm, auth, "InitiateFileTransferToGuest")
        assert isinstance(attributes, vim.vm.guest.FileManager.FileAttributes)
        if not os.path.isdir(os.path.dirname(path)):
            raise vim.fault.FileNotFound(file=path, msg=f"{os.path.dirname(path)} not found")
        if os.path.exists(path) and not overwrite:
            raise vim.fault.FileAlreadyExists(file=path)
        return self._url("PUT", path, size)

    def InitiateFileTransferFromGuest(self, vm: Any, auth: Any, path: str) -> Any:
        self._check(vm, auth, "InitiateFileTransferFromGuest")
        if not os.path.isfile(path):
            raise vim.fault.FileNotFound(file=path, msg=f"{path} not found")
        size = os.path.getsize(path)
        return vim.vm.guest.FileManager.FileTransferInformation(
            attributes=vim.vm.guest.FileManager.PosixFileAttributes(), size=size,
            url=self._url("GET", path, size),
        )  # fmt: skip


def _handler(fake: FakeGuestOps) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _ticket(self, method: str) -> tuple[str, int] | None:
            parts = urlsplit(self.path)
            token = parse_qs(parts.query).get("token", [""])[0]
            got = fake.tickets.pop(token, None)  # one-shot, like ESXi's
            if parts.path != "/guestFile" or got is None or got[0] != method:
                self.send_error(403, "bad ticket")
                return None
            return got[1], got[2]

        def do_GET(self) -> None:
            if (ticket := self._ticket("GET")) is not None:
                data = Path(ticket[0]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def do_PUT(self) -> None:
            if (ticket := self._ticket("PUT")) is not None:
                length = int(self.headers.get("Content-Length", -1))
                if length != ticket[1]:
                    self.send_error(400, "size differs from InitiateFileTransferToGuest's")
                    return
                Path(ticket[0]).write_bytes(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class FakeSI:
    def __init__(self, fake: FakeGuestOps) -> None:
        self.content = type("Content", (), {"guestOperationsManager": fake})()


@pytest.fixture
def guest() -> Iterator[tuple[FakeGuestOps, Connection]]:
    """The fake guest, and a real Connection whose service instance is the fake's."""
    root = state_dir() / "guestops-test" / secrets.token_hex(4)  # never /tmp
    root.mkdir(parents=True)
    cert, key = _self_signed(root)
    fake = FakeGuestOps(root, vm=object())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = Connection(VsphereConfig.load({"host": "127.0.0.1", "ca_file": str(cert)}, {}))
    conn.si = FakeSI(fake)
    try:
        yield fake, conn
    finally:
        server.shutdown()
        server.server_close()
        for proc, _ in fake.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _channel(guest: tuple[FakeGuestOps, Connection], password: str = PASSWORD) -> GuestOpsChannel:
    from vmenv_vsphere import Secret

    fake, conn = guest
    return GuestOpsChannel(conn, fake.vm, "root", Secret(password), machine="g1")


def test_exit_codes_and_binary_safe_output(guest: Any) -> None:
    ch = _channel(guest)
    result = ch.execute(["/bin/sh", "-c", 'printf "a\\0b\\377"; printf "E\\n" >&2; exit 3'])
    assert (result.exit_code, result.stdout_bytes, result.stderr_bytes) == (3, b"a\0b\xff", b"E\n")
    assert ch.execute(["true"]).ok
    assert ch.execute(["no-such-program-vmenv"]).exit_code == 127
    assert ch.execute(["/bin/sh", "-c", "kill -TERM $$"]).exit_code == 128 + signal.SIGTERM
    assert ch.execute(["printf", "%s", 'it\'s a "quoted" $HOME `x`']).stdout == (
        'it\'s a "quoted" $HOME `x`'
    )
    assert ch.execute(["sh", "-c", 'echo "$X"'], env={"X": "1 2"}).stdout == "1 2\n"
    if os.geteuid() == 0:  # as the vcsim tests run: runuser, as over SSH
        assert ch.execute(["id", "-un"], user="nobody").stdout == "nobody\n"
    assert not list(guest[0].tmp.iterdir())  # every temporary directory removed


def test_stdin_is_uploaded_first(guest: Any) -> None:
    fake, _ = guest
    data = bytes(range(256)) * 1000
    result = _channel(guest).execute(["cat"], input=data)
    assert result.stdout_bytes == data
    assert fake.calls.index("InitiateFileTransferToGuest") < fake.calls.index("StartProgramInGuest")
    assert _channel(guest).execute(["cat"]).stdout_bytes == b""  # no input: EOF at once


def test_background_process_does_not_hold_execute(guest: Any) -> None:
    start = time.monotonic()
    assert _channel(guest).execute(["/bin/sh", "-c", "sleep 30 & echo started"]).ok
    assert time.monotonic() - start < 10


def test_timeout_kills_the_process_group(guest: Any) -> None:
    fake, _ = guest
    marker = fake.root / "survived"
    script = f"(sleep 3; touch {marker}) & sleep 30"
    start = time.monotonic()
    with pytest.raises(errors.CommandTimeout, match=r"timed out after 0\.5s"):
        _channel(guest).execute(["/bin/sh", "-c", script], timeout=0.5)
    assert time.monotonic() - start < 10
    assert fake.calls.count("StartProgramInGuest") == 2  # the command, then the group kill
    time.sleep(3.5)
    assert not marker.exists()  # the whole group died, background child included
    assert all(p.poll() is not None for p, _ in fake.procs.values())
    assert not list(fake.tmp.iterdir())


def test_wrapper_still_running_after_group_kill_is_terminated(
    guest: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, _ = guest
    monkeypatch.setattr("vmenv_vsphere.guestops.KILL", "exit 0")  # a kill that does nothing
    with pytest.raises(errors.CommandTimeout):
        _channel(guest).execute(["sleep", "30"], timeout=0.3)
    assert len(fake.terminated) == 1


def test_files_in_and_out(guest: Any) -> None:
    fake, _ = guest
    ch = _channel(guest)
    src = fake.root / "local-src"
    src.write_bytes(b"\x00payload\xff" * 5000)
    ch.copy_in(src, str(fake.tmp / "in.bin"))
    assert ch.execute(["cmp", str(src), str(fake.tmp / "in.bin")]).ok
    ch.copy_in(src, str(fake.tmp / "in.bin"))  # replaced
    dst = fake.root / "local-dst"
    ch.copy_out(str(fake.tmp / "in.bin"), dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(errors.BackendError, match="no such file in the guest"):
        ch.copy_out(str(fake.tmp / "missing"), dst)


def test_output_and_files_out_are_capped(guest: Any) -> None:
    fake, _ = guest
    ch = _channel(guest)
    result = ch.execute(
        ["/bin/sh", "-c", "head -c 3000000 /dev/zero; echo E >&2"], max_output=1 << 20
    )
    assert (len(result.stdout_bytes), result.stdout_dropped) == (1 << 20, 3_000_000 - (1 << 20))
    assert (result.stderr, result.truncated) == ("E\n", True)
    big = fake.tmp / "big"
    with open(big, "wb") as f:
        f.write(b"x")
        f.seek(4 << 20)
        f.write(b"y")
    dst = fake.root / "local-big"
    with pytest.raises(errors.FileTooLarge, match="max_size=1048576"):
        ch.copy_out(str(big), dst, max_size=1 << 20)
    assert not dst.exists()
    ch.copy_out(str(big), dst)
    assert dst.read_bytes() == big.read_bytes() and dst.stat().st_blocks * 512 < 1 << 20


def test_transfer_urls_are_verified(guest: Any) -> None:
    fake, conn = guest
    conn.config = VsphereConfig.load({"host": "127.0.0.1"}, {})  # system store: not our cert
    with pytest.raises(errors.BackendError, match=r"TLS to https://127\.0\.0\.1:.*ca_file"):
        _channel(guest).copy_out(__file__, fake.root / "x")


def test_bad_login_is_mapped_and_the_password_never_shows(
    guest: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ch = _channel(guest, password=WRONG)  # module-level: no test frame local holds it
    with pytest.raises(errors.BackendError, match="guest_user and guest_password") as info:
        ch.execute(["true"])
    text = "".join(traceback.format_exception(info.value)) + repr(ch) + str(ch.__dict__)
    text += caplog.text + repr(info.value.__context__)
    text += str(info.getrepr(showlocals=True, style="long", chain=True))  # as `pytest -l` shows it
    assert "rejected the login as 'root'" in text
    for secret in (WRONG, PASSWORD):
        assert secret not in text
    ok = _channel(guest)
    with pytest.raises(errors.CommandTimeout) as timeout:
        ok.execute(["sleep", "5"], timeout=0.2)
    assert PASSWORD not in "".join(traceback.format_exception(timeout.value)) + caplog.text


def test_faults_are_mapped(guest: Any) -> None:
    fake, _ = guest
    cases = [
        (vim.fault.GuestOperationsUnavailable(), errors.BackendError, "open-vm-tools"),
        (vim.fault.NoPermission(privilegeId="VirtualMachine.GuestOperations.Execute"),
         errors.BackendError, "Guest operations"),
        (vim.fault.GuestPermissionDenied(), errors.BackendError, "not allowed"),
        (vim.fault.OperationDisabledByGuest(), errors.BackendError, "refuses"),
        (vim.fault.InvalidPowerState(), errors.BackendError, "not running"),
        (vmodl.fault.ManagedObjectNotFound(), errors.MachineGone, "g1"),
    ]  # fmt: skip
    for fault, kind, text in cases:

        def boom(*a: Any, fault: Any = fault) -> Any:
            raise fault

        fake.CreateTemporaryDirectoryInGuest = boom  # type: ignore[method-assign]
        with pytest.raises(kind, match=text):
            _channel(guest).execute(["true"])


# -- against the real vcsim -------------------------------------------------------------------


@pytest.fixture
def session() -> Session:
    return Session(id=f"go-{os.urandom(4).hex()}", state_dir=state_dir(), worker_id="go")


def test_vcsim_reports_guest_operations_unsupported(
    vcsim: dict[str, str], vcsim_password: str, base_template: str, session: Session
) -> None:
    backend = VsphereBackend(
        options(vcsim, vcsim_password, guest_user="root", guest_password=PASSWORD), environ={}
    )
    running = {
        "SET.guest.ipAddress": "127.0.0.1",
        "SET.guest.toolsRunningStatus": "guestToolsRunning",
    }
    template = backend.build_template(base_spec(), "go-base", session)
    tools = backend.clone(template, base_spec("tools", extra_config=running), session)
    plain = backend.clone(template, base_spec("notools"), session)
    try:
        unsupported = "guest operations are not supported by this server"
        with pytest.raises(errors.BackendError, match=unsupported) as info:
            backend.execute(tools, ["true"])
        assert "MethodNotFound" in str(info.value) and PASSWORD not in str(info.value)
        with pytest.raises(errors.BackendError, match="VMware Tools is not running"):
            backend.execute(plain, ["true"])
    finally:
        backend.destroy(tools)
        backend.destroy(plain)
        backend.close()
