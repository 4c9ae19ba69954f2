"""Templates: one build per distinct key, in parallel, shared by a session's xdist workers.

A template's key is a hash of everything that shapes its disk (:func:`template_key`), plus the
session id unless ``--vm-reuse`` shares it across sessions. Builds start as soon as the
selected tests are known and run in a thread pool; a test that needs one waits for its
future. Before a build the ledger records the intent, so a crash mid-build leaves a record a
sweep can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from typing import Any

from .backend import Backend, Session, Snapshot
from .ledger import Ledger, file_lock
from .spec import MachineSpec
from .summary import Timings

__all__ = ["Templates", "spec_identity", "template_key"]


def _file_identity(value: str) -> Any:
    """Size and mtime of a file an image points at, so a rebuilt image gets a new key."""
    try:
        st = os.stat(value)
    except OSError:
        return value
    return [value, st.st_size, st.st_mtime_ns]


def template_key(spec: MachineSpec) -> str:
    """Hash of what shapes a template's disk: backend, image identity, provision, disk size,
    the packages baked into a built image, the init it boots and whether it is provisioned
    with an outbound network."""
    image_config = {
        k: _file_identity(v) if isinstance(v, str) and os.path.isabs(v) else v
        for k, v in sorted(spec.image_config.items())
    }
    shape: dict[str, Any] = {
        "backend": spec.backend,
        "image": spec.image,
        "image_config": image_config,
        "provision": [list(p) if isinstance(p, tuple) else p for p in spec.provision],
        "disk": spec.disk,
    }
    if spec.packages:  # only when set: a field a spec leaves unset does not change its key
        shape["packages"] = sorted(spec.packages)
    if spec.init is not None:
        shape["init"] = spec.init
    if spec.outbound:
        shape["outbound"] = True
    data = json.dumps(shape, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:20]


def spec_identity(spec: MachineSpec) -> str:
    """Every field of ``spec``, as one string: equal specs make interchangeable machines."""
    return json.dumps(asdict(spec), sort_keys=True, default=str)


TemplateCallback = Callable[[MachineSpec, Snapshot, float], None]


class Templates:
    """The templates of one process: built once per key, in a pool of ``parallel`` threads."""

    def __init__(
        self,
        session: Session,
        ledger: Ledger,
        backend: Callable[[str], Backend],
        timings: Timings,
        *,
        parallel: int = 2,
        on_template: TemplateCallback | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self._ledger = ledger
        self._backend = backend
        self._timings = timings
        self._on_template = on_template
        self._on_wait = on_wait
        self._futures: dict[str, Future[Snapshot]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max(1, parallel), thread_name_prefix="vmenv-build")

    def key(self, spec: MachineSpec) -> str:
        base = template_key(spec)
        return base if self.session.reuse else f"{base}-{self.session.id}"

    def start(self, spec: MachineSpec) -> Future[Snapshot]:
        """The build of ``spec``'s template, started now unless it was already."""
        key = self.key(spec)
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._executor.submit(self._build, spec, key)
                self._futures[key] = future
        return future

    def _build(self, spec: MachineSpec, key: str) -> Snapshot:
        backend = self._backend(spec.backend)
        record = self._ledger.template_intent(
            key, backend.name, name=spec.image, reuse=self.session.reuse
        )
        # xdist workers share a session's templates: the first builds, the others wait here
        # and then find it complete (build_template returns an existing template for a key).
        # The time reported is the build's (or the lookup's), not the wait for the lock.
        with file_lock(self.session.state_dir, f"template-{key}"):
            start = time.monotonic()
            snapshot = backend.build_template(spec, key, self.session)
            seconds = time.monotonic() - start
        self._ledger.update(
            record,
            handle=snapshot.handle,
            name=snapshot.name,
            data=dict(snapshot.data),
            owner=snapshot.owner,
            created=snapshot.created,
        )
        self._timings.record("template", spec.backend, spec.name, seconds)
        if self._on_template:
            self._on_template(spec, snapshot, seconds)
        return snapshot

    def get(self, spec: MachineSpec) -> Snapshot:
        """The template for ``spec``; waits for its build (and raises what the build raised).

        While it waits, and once after, ``on_wait`` is called every half second (the plugin
        shows the progress of image builds from there, on the waiting thread)."""
        future = self.start(spec)
        try:
            while self._on_wait is not None:
                try:
                    return future.result(timeout=0.5)
                except FutureTimeout:
                    self._on_wait()
            return future.result()
        finally:
            if self._on_wait is not None:
                self._on_wait()

    def shutdown(self) -> None:
        """Cancel the builds not started; wait for the running ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
