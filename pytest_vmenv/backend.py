"""The backend protocol: what a hypervisor must offer pytest-vmenv.

A backend turns a :class:`~pytest_vmenv.spec.MachineSpec` into machines. The orchestrator
calls ``build_template`` once per distinct template key, then ``clone`` for every machine a
test gets, ``execute``/``copy_in``/``copy_out`` for the test-author verbs, and ``destroy``
at teardown. What it can do beyond that minimum it says in :meth:`Backend.capabilities`, which
the orchestrator reads to fall back; the optional features are the small protocols below
:class:`Backend`, each checked with ``isinstance``.

Contract shared by every method:

* Foreign exceptions (``OSError``, ``libvirtError``, ``MethodFault``) never escape: they are
  mapped to :mod:`pytest_vmenv.errors` by the backend's :class:`~pytest_vmenv.errors.Boundary`.
* Every resource carries ``session.id`` on the backend side, so ``owned(session.id)`` finds
  it even if the plugin's own records are lost.
* Methods may be called from several threads at once (templates are built in parallel).
* ``build_template`` returns the existing complete template when one exists for ``key``:
  that is how xdist workers and ``--vm-reuse`` share templates.

A backend is constructed as ``cls(options)`` with its table from
``[tool.vmenv.backends.NAME]``, kept as ``backend.options``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .owners import boot_id, owner_alive, owner_token, process_start
from .results import GET_LIMIT, OUTPUT_LIMIT, Output, Result

if TYPE_CHECKING:
    from .images import Recipe
    from .spec import MachineSpec

__all__ = [
    "GET_LIMIT",
    "OUTPUT_LIMIT",
    "Backend",
    "BuiltinImages",
    "Cache",
    "CacheKeeper",
    "Capabilities",
    "Closer",
    "Configured",
    "Forwarder",
    "HostExposer",
    "ImageBuilder",
    "MachineRef",
    "Network",
    "Output",
    "Result",
    "Session",
    "SessionEnder",
    "Shell",
    "Snapshot",
    "SpecCheck",
    "Summarizer",
    "TemplateLister",
    "boot_id",
    "owner_alive",
    "owner_token",
    "process_start",
]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the protocol's minimum.

    ``live_snapshot``: ``snapshot``/``revert`` keep running processes and memory; without it a
    revert restarts the machine on the snapshot's disk. ``network``: ``clone``'s ``network`` is
    honoured (a segment per environment instance). ``limits``: ``cpus``/``memory`` are
    enforced. ``console_log``: ``console_log()`` returns what the guest wrote on its console
    (the conformance suite proves it; failure reports show any non-empty tail either way).
    ``outbound``: ``spec.outbound`` is honoured (a machine asking for it on a backend without
    it is refused, with the reason).
    """

    live_snapshot: bool = False
    network: bool = False
    limits: bool = False
    console_log: bool = False
    outbound: bool = False


@dataclass(frozen=True)
class Session:
    """One pytest run (one process of it: xdist workers share ``id``, not ``owner``).

    Every resource carries ``id`` and ``owner`` on the backend side, so a sweep can tell a
    dead owner's leftovers from a live session's machines.
    """

    id: str
    state_dir: Path
    worker_id: str = "master"
    owner: str = field(default_factory=owner_token)
    reuse: bool = False


@dataclass(frozen=True)
class Snapshot:
    """A frozen machine state a clone or a revert starts from.

    ``handle`` is the backend's own identifier (a layer path, a qcow2 file, a vSphere
    snapshot moref); ``key`` is the template key it was built for (empty for a snapshot
    taken with ``vm.snapshot``). A template also says who built it, as :class:`MachineRef`
    does for a machine: ``session`` (id), ``owner`` (an :func:`owner_token`), ``created``
    (epoch seconds), ``reuse`` (built for ``--vm-reuse``: kept across sessions) and
    ``complete`` (False: a build that died half way). ``data`` is the backend's own.
    """

    backend: str
    name: str
    handle: str
    key: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    session: str = ""
    owner: str = ""
    created: float = 0.0
    reuse: bool = False
    complete: bool = True


@dataclass(frozen=True)
class MachineRef:
    """A live machine as the backend knows it. ``id`` is unique within the backend."""

    backend: str
    id: str
    name: str
    session: str
    ip: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    owner: str = ""  # the owner token (see owner_token) it was labelled with
    created: float = 0.0  # epoch seconds
    kept: bool = False  # detached with keep(): outlives its session until gc


@dataclass(frozen=True)
class Cache:
    """Something kept on disk between sessions, as ``vmenv images`` lists it.

    ``id`` is what ``vmenv images rm ID`` takes (unique within ``backend``); ``size`` is bytes
    on this host's disk (None: not stored here, e.g. a vSphere template); ``held`` says why it
    must stay ("" when nothing live uses it and it may go); ``handle`` is the backend's own
    object for it (a :class:`Snapshot` for a template).
    """

    backend: str
    kind: str
    id: str
    size: int | None
    path: str = ""
    detail: str = ""
    created: float = 0.0
    held: str = ""
    handle: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Network:
    """The private network that one environment instance's machines share.

    ``name`` is the ``network=`` the user wrote: a name (``"lan"``) or a subnet
    (``"10.77.0.0/24"``, then also its :attr:`subnet`). ``instance`` sets apart the environment
    instances that asked for the same name, so two tests that both say ``network="lan"`` never
    share a segment: machines are on one segment exactly when their :attr:`id` is equal.
    """

    name: str
    instance: str

    @property
    def id(self) -> str:
        """Unique per environment instance; what a backend names the segment by."""
        return f"{self.name}#{self.instance}"

    @property
    def subnet(self) -> str | None:
        """The subnet the user asked for, or None (the backend picks a free one)."""
        name = self.name
        return name if "/" in name and name.replace(".", "").replace("/", "").isdigit() else None


# -- the protocol: what every backend has, then each optional feature -----------------------


@runtime_checkable
class Backend(Protocol):
    """A hypervisor backend. See the module docstring for the shared contract."""

    name: str

    def capabilities(self) -> Capabilities: ...

    def check(self) -> None:
        """Raise ``BackendUnavailable(name, reason)`` if this backend cannot run here."""

    def build_template(self, spec: MachineSpec, key: str, session: Session) -> Snapshot:
        """Boot ``spec.image``, run ``spec.provision``, and freeze the result under ``key``."""

    def clone(
        self,
        snapshot: Snapshot,
        spec: MachineSpec,
        session: Session,
        network: Network | None = None,
    ) -> MachineRef:
        """Start a linked clone of ``snapshot``, running and ready for commands, on
        ``network`` if given (``spec.network`` is what the user wrote; ``network`` is it for
        this environment instance)."""

    def execute(
        self,
        ref: MachineRef,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        max_output: int = OUTPUT_LIMIT,
    ) -> Result:
        """Run ``argv`` in the machine; raise ``CommandTimeout`` after killing its group.

        ``timeout`` bounds the whole call, reading the output included. At most
        ``max_output`` bytes of each stream are held in memory (see :class:`Result`).
        """

    def copy_in(self, ref: MachineRef, src: Path, dst: str) -> None: ...

    def copy_out(
        self, ref: MachineRef, src: str, dst: Path, *, max_size: int | None = GET_LIMIT
    ) -> None:
        """Copy the file ``src`` out to ``dst``; a file over ``max_size`` bytes (None: no
        limit) raises ``FileTooLarge`` and leaves no ``dst`` behind."""

    def snapshot(self, ref: MachineRef, name: str) -> Snapshot: ...

    def revert(self, ref: MachineRef, snapshot: Snapshot) -> None:
        """Return ``ref`` to ``snapshot`` (one of its own, or the template it was cloned from)."""

    def console_log(self, ref: MachineRef) -> str: ...

    def destroy(self, ref: MachineRef) -> None:
        """Remove the machine and everything it holds; already gone is success.

        Works from any process on a ref from ``owned()`` (that is how ``vmenv gc`` sweeps)."""

    def keep(self, ref: MachineRef) -> None:
        """Let the machine outlive this process (``--vm-keep``) until ``destroy``."""

    def remove_template(self, snapshot: Snapshot) -> None:
        """Delete a template built by ``build_template``; already gone is success.

        While a machine (a kept one, say) is still built on it, the template is left and
        :class:`~pytest_vmenv.errors.TemplateInUse` says which machine; works from any process.
        """

    def owned(self, session_id: str | None = None) -> Iterable[MachineRef]:
        """Machines that carry our labels (of the session ``session_id`` only, if given)."""


@runtime_checkable
class SpecCheck(Protocol):
    """A backend that runs here but cannot make every machine (unprivileged: no ``network=``).

    Asked once per distinct spec before anything is built, so that only the tests whose own
    machines cannot be made are skipped or failed (``--vm-unavailable``), each with its reason.
    """

    def unavailable_for(self, spec: MachineSpec) -> str | None: ...  # why not, and what to do
    def restrictions(self) -> str | None: ...  # one line for ``vmenv backends``


@runtime_checkable
class CacheKeeper(Protocol):
    """Everything kept between sessions (templates, images, leftovers), for ``vmenv images``;
    ``remove_cache`` raises ``BackendError`` saying why if the cache is (now) in use."""

    def caches(self, live_sessions: Collection[str]) -> list[Cache]: ...
    def remove_cache(self, cache: Cache, live_sessions: Collection[str]) -> None: ...


@runtime_checkable
class ImageBuilder(Protocol):
    """``vmenv images build NAME --backend NAME``: the backend's own image of ``recipe`` (one
    it boots, beyond the core's tree), built ahead unless it is there, publishing progress
    (:func:`~pytest_vmenv.images.publish`): (its id in ``vmenv images``, its path)."""

    def build_image(self, recipe: Recipe) -> tuple[str, Path]: ...


@runtime_checkable
class Forwarder(Protocol):
    """``vm.forward``: an address on ``host`` (the loopback unless the user asks for another)
    that reaches TCP ``port`` as the machine's own loopback sees it, while the machine lives
    (closed by ``destroy`` and ``close``); the same ``port`` and ``host`` again give the same."""

    def forward(self, ref: MachineRef, port: int, host: str = "127.0.0.1") -> tuple[str, int]: ...


@runtime_checkable
class HostExposer(Protocol):
    """``vm.expose_host_port``: an address inside the machine (for its own processes) that
    reaches TCP ``port`` on the host's ``127.0.0.1`` and nothing else of the host, while the
    machine lives (closed by ``destroy`` and ``close``); the same ``port`` again gives the
    same address."""

    def expose_host_port(self, ref: MachineRef, port: int) -> tuple[str, int]: ...


@runtime_checkable
class TemplateLister(Protocol):
    """Every template, from any session, that ``remove_template`` takes (for ``vmenv images``
    and the sweeps), each saying its ``session``, ``owner`` and ``created``."""

    def templates(self) -> list[Snapshot]: ...


@runtime_checkable
class Shell(Protocol):
    """``vmenv shell NAME``: ``argv`` (None: a login shell) on this terminal; its status."""

    def shell(self, ref: MachineRef, argv: Sequence[str] | None = None, /) -> int: ...


@runtime_checkable
class Summarizer(Protocol):
    """Lines for pytest's terminal summary (what the backend did this session)."""

    def summary(self) -> list[str]: ...


@runtime_checkable
class SessionEnder(Protocol):
    """Cleanup once per session (networks, locks), by whoever ends it: the plugin at exit, or
    the watchdog or a sweep after a crash."""

    def end_session(self, session_id: str) -> None: ...


@runtime_checkable
class Configured(Protocol):
    """``options``, the table it was made with: the ledger records it (no secrets) so that a
    sweep in another process can make the backend again."""

    options: Mapping[str, Any]


@runtime_checkable
class BuiltinImages(Protocol):
    """On the class: the images it makes without an ``[images]`` entry (``host``, ``tiny``)."""

    builtin_images: Sequence[str]


@runtime_checkable
class Closer(Protocol):
    """Release what this process holds (connections, helper processes) at exit."""

    def close(self) -> None: ...
