"""vSphere benchmark against vcsim: the plugin's clone cycle over raw pyvmomi, in one run.

    exports=$(bash .ci/vsphere.sh start) && eval "$exports"
    python bench/bench_vsphere.py      # about 20 s

Figures and their targets:
1. clone -> ready -> destroy through ``VsphereBackend`` against raw pyvmomi doing
   ``CloneVM_Task`` + ``PowerOnVM_Task`` + ``PowerOffVM_Task`` + ``Destroy_Task`` (each
   waited with ``pyVim.task.WaitForTask``), median of N cycles each, interleaved, same vcsim,
   same linked-clone spec (target: <= 1.3x). "Ready" is the guest IP from VMware Tools; no SSH,
   since vcsim runs no guest. Measured twice: with the template's own CPU/memory, and with a
   different size (one more reconfigure task).
2. eight clones at once from eight pytest-xdist workers through the whole plugin (markers,
   orchestrator, ledger, teardown): errors must be 0, and the wall time is printed.
Benchmarks are not tests: nothing here asserts; the ratios are for people to read.
"""

from __future__ import annotations

import os
import secrets
import ssl
import statistics
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim
from vmenv_vsphere import VsphereBackend

from pytest_vmenv.backend import Session
from pytest_vmenv.paths import state_dir
from pytest_vmenv.spec import MachineSpec

N = 60
BASE = "vmenv-bench-base"
IP = {"SET.guest.ipAddress": "127.0.0.1"}
START = 'start it with `exports=$(bash .ci/vsphere.sh start) && eval "$exports"`'


def vcsim_env() -> dict[str, str]:
    """``GOVC_URL`` and ``VMENV_VCSIM_CA`` of the running vcsim, from the environment."""
    missing = [k for k in ("GOVC_URL", "VMENV_VCSIM_CA") if not os.environ.get(k)]
    if missing:
        sys.exit(f"bench_vsphere: vcsim is not running here ({' and '.join(missing)} not set): "
                 f"{START} from the repository root, in this shell")  # fmt: skip
    return {k: os.environ[k] for k in ("GOVC_URL", "VMENV_VCSIM_CA")}


def base_vm(si: Any) -> tuple[Any, Any]:
    """A powered-off copy of a vcsim VM with one snapshot, made once."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vms = {vm.name: vm for vm in view.view}
    if BASE not in vms:
        src = vms["DC0_C0_RP0_VM0"]
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=src.resourcePool))
        WaitForTask(src.CloneVM_Task(folder=src.parent, name=BASE, spec=spec))
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vms = {vm.name: vm for vm in view.view}
        vm = vms[BASE]
        if vm.runtime.powerState == "poweredOn":
            WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.CreateSnapshot_Task("clean", "bench", False, False))
    vm = vms[BASE]
    return vm, vm.snapshot.rootSnapshotList[0].snapshot


def raw_cycle(vm: Any, snap: Any, folder: Any, pool: Any) -> float:
    start = time.perf_counter()
    relocate = vim.vm.RelocateSpec(pool=pool, diskMoveType="createNewChildDiskBacking")
    config = vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in IP.items()]
    )
    spec = vim.vm.CloneSpec(location=relocate, snapshot=snap, config=config)
    task = vm.CloneVM_Task(folder=folder, name="raw-" + secrets.token_hex(4), spec=spec)
    WaitForTask(task)
    clone = task.info.result
    WaitForTask(clone.PowerOnVM_Task())
    WaitForTask(clone.PowerOffVM_Task())
    WaitForTask(clone.Destroy_Task())
    return time.perf_counter() - start


def plugin_cycle(
    backend: VsphereBackend, template: Any, spec: MachineSpec, session: Session
) -> float:
    start = time.perf_counter()
    ref = backend.clone(template, spec, session)
    assert ref.ip
    backend.destroy(ref)
    return time.perf_counter() - start


def xdist_run(env: dict[str, str]) -> tuple[str, float]:
    """Eight tests with a clone each, on eight xdist workers, through the whole plugin."""
    work = state_dir() / "bench" / "vsphere-xdist"
    work.mkdir(parents=True, exist_ok=True)
    (work / "vmenv.toml").write_text(
        'backend = "vsphere"\n'
        "[images.base]\n"
        f'vsphere = {{ template = "{BASE}", snapshot = "clean", '
        'extra_config = { "SET.guest.ipAddress" = "127.0.0.1" } }\n'
        "[backends.vsphere]\n"
        f'host = "{env["GOVC_URL"]}"\nuser = "bench"\npassword = "{{{{ env.BENCH_PW }}}}"\n'
        f'ca_file = "{env["VMENV_VCSIM_CA"]}"\n'
    )
    (work / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider -p no:hypothesispytest -p no:benchmark\n"
    )
    (work / "test_parallel.py").write_text(
        "import pytest, time\n\n"
        "@pytest.mark.parametrize('i', range(8))\n"
        "@pytest.mark.vm(image='base', memory='32M')\n"
        "def test_clone(vm, i):\n"
        "    assert vm.ip == '127.0.0.1'\n"
        "    time.sleep(0.5)  # hold the clone so all eight exist at once\n"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "8", str(work)],
        cwd=work, capture_output=True, text=True, env={**os.environ, "BENCH_PW": "pw"},
        timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return summary, elapsed


def main() -> None:
    env = vcsim_env()
    u = urlsplit(env["GOVC_URL"])
    ctx = ssl.create_default_context(cafile=env["VMENV_VCSIM_CA"])
    si = SmartConnect(host=u.hostname, port=u.port, user="raw", pwd="pw", sslContext=ctx)
    vm, snap = base_vm(si)
    folder, pool = vm.parent, vm.resourcePool
    hardware = vm.config.hardware
    backend = VsphereBackend(
        {
            "host": env["GOVC_URL"],
            "user": "bench",
            "password": "pw",
            "ca_file": env["VMENV_VCSIM_CA"],
        },
        environ={},
    )
    session = Session(id="bench-" + secrets.token_hex(4), state_dir=state_dir())
    image = {"template": BASE, "snapshot": "clean", "extra_config": IP}
    same = MachineSpec(
        name="bench", image="b", backend="vsphere", image_config=image,
        cpus=hardware.numCPU, memory=hardware.memoryMB * 2**20,
    )  # fmt: skip
    resized = MachineSpec(name="bench", image="b", backend="vsphere", image_config=image, cpus=2)
    template = backend.build_template(same, "bench", session)
    for _ in range(5):  # warm up both paths (login, folder, caches)
        raw_cycle(vm, snap, folder, pool)
        plugin_cycle(backend, template, same, session)
    raw, plug, plug_resized = [], [], []
    for _ in range(N):  # interleaved, so drift in vcsim affects both alike
        raw.append(raw_cycle(vm, snap, folder, pool))
        plug.append(plugin_cycle(backend, template, same, session))
        plug_resized.append(plugin_cycle(backend, template, resized, session))
    r, p, pr = (statistics.median(x) * 1000 for x in (raw, plug, plug_resized))
    print(f"vcsim {env['GOVC_URL']}, {N} cycles each, medians:")
    print(f"  raw pyvmomi clone+on+off+destroy       {r:7.1f} ms")
    ratio = f"ratio {p / r:.2f}x (target <= 1.3x)"
    print(f"  plugin clone->ready->destroy           {p:7.1f} ms   {ratio}")
    print(f"  plugin, with cpus/memory reconfigure   {pr:7.1f} ms   ratio {pr / r:.2f}x")
    backend.close()
    Disconnect(si)
    summary, elapsed = xdist_run(env)
    print(f"  8 clones on 8 xdist workers: {summary!r} in {elapsed:.1f} s wall")


if __name__ == "__main__":
    main()
