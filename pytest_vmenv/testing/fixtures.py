"""ConformanceFixtures: what a backend's test class gives the suite, and what the suite builds.

Three kinds of fixture, as fsspec's ``tests/abstract`` has them:

* **required**: ``backend``, ``base_spec`` and ``backend_factory`` raise ``NotImplementedError``
  saying what to return; a backend's test class overrides each.
* **capabilities**: what the tests read to know what this backend can show here. The default
  of ``capabilities`` is ``backend.capabilities()``; the others default to "can". A backend
  that cannot do something overrides the fixture (with a docstring that says why): the test
  then adapts or skips itself, saying why, and is never redefined.
* **built**: ``session``, ``template``, ``machines`` and ``clone``, made from the above.

Class-scoped fixtures are classmethods (pytest's rule for class-scoped fixtures on classes);
an override of one must be a classmethod too.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from ..backend import Backend, Capabilities, MachineRef, Network, Session, SessionEnder, Snapshot
from ..machine import Machine
from ..orchestrator import template_key
from ..paths import state_dir
from ..spec import MachineSpec

__all__ = ["ConformanceFixtures", "MachineMaker", "ids", "new_session", "require"]

MachineMaker = Callable[..., Machine]
"""``machines(name="conf", network=None, **spec_changes)``: a clone of the class's template on
``network`` (a :class:`~pytest_vmenv.backend.Network`), destroyed after the test; the other
keyword arguments replace fields of ``base_spec``."""


def new_session() -> Session:
    """A session of its own: an id no other run has, this process as its owner."""
    return Session(id="conf-" + secrets.token_hex(4), state_dir=state_dir(), worker_id="conf")


def require(flag: bool, why_not: str) -> None:
    """Skip the running test, saying ``why_not``, when a capability fixture's ``flag`` is off."""
    if not flag:
        pytest.skip(why_not)


class ConformanceFixtures:
    """The fixtures every conformance mixin uses; see the module docstring."""

    # -- required ----------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Backend:
        """The backend under test, constructed and ``check()``-ed (yield it to close it after)."""
        raise NotImplementedError(
            "return (or yield) the Backend under test, its check() passed, from a "
            "class-scoped classmethod fixture `backend`"
        )

    @pytest.fixture(scope="class")
    @classmethod
    def base_spec(cls) -> MachineSpec:
        """The spec every machine of the suite starts from.

        Its image needs a POSIX ``/bin/sh`` with ``cat``, ``printf``, ``sleep``, ``head``,
        ``echo``, ``id`` and ``wc`` (busybox is enough), and for the network tests the
        ``netcat`` command (busybox's ``nc`` is enough).
        """
        raise NotImplementedError(
            "return the MachineSpec the suite's machines start from (its image with a POSIX "
            "/bin/sh and busybox's tools) from a class-scoped classmethod fixture `base_spec`"
        )

    @pytest.fixture(scope="class")
    @classmethod
    def backend_factory(cls) -> Callable[[], Backend]:
        """A picklable zero-argument callable that makes another instance of the backend.

        Same options and state as ``backend``: what a second pytest process would construct.
        It is called in a process started with ``multiprocessing``'s ``spawn`` method (so
        a ``functools.partial`` of the backend class fits), which lists ``owned()`` and
        ``destroy``-s there; and, unless ``second_backend`` is overridden, in this process
        to make and keep a machine.
        """
        raise NotImplementedError(
            "return a picklable callable, e.g. functools.partial(MyBackend, options), that "
            "makes a new instance of the backend with the same options and state, from a "
            "class-scoped classmethod fixture `backend_factory`"
        )

    # -- capabilities ------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def capabilities(cls, backend: Backend) -> Capabilities:
        """What the backend says it can do; the tests of each capability read it."""
        return backend.capabilities()

    @pytest.fixture(scope="class")
    @classmethod
    def reverts_files(cls) -> bool:
        """Whether ``revert`` brings the guest's files back (False: only its inventory)."""
        return True

    @pytest.fixture(scope="class")
    @classmethod
    def other_user(cls) -> str | None:
        """A user of ``base_spec``'s image other than the default one, for ``user=``.

        None: commands cannot run as another user here.
        """
        return "nobody"

    @pytest.fixture(scope="class")
    @classmethod
    def netcat(cls) -> str:
        """The shell words of a netcat with ``-l -p PORT`` and ``-w SECONDS HOST PORT``."""
        return "busybox nc"

    @pytest.fixture(scope="class")
    @classmethod
    def second_backend(cls, backend_factory: Callable[[], Backend]) -> Callable[[], Backend]:
        """Makes another instance of the backend in this process, one that can clone.

        Override it when ``backend_factory``'s instances cannot reach the guests from here.
        """
        return backend_factory

    # -- built -------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def session(cls, backend: Backend) -> Iterator[Session]:
        """This class's session; ended on the backend (if it ends sessions) after the class."""
        session = new_session()
        yield session
        if isinstance(backend, SessionEnder):
            backend.end_session(session.id)

    @pytest.fixture(scope="class")
    @classmethod
    def template(
        cls, backend: Backend, base_spec: MachineSpec, session: Session
    ) -> Iterator[Snapshot]:
        """``base_spec`` built once for the class, removed after it."""
        snap = backend.build_template(
            base_spec, template_key(base_spec) + "-" + session.id, session
        )
        yield snap
        backend.remove_template(snap)

    @pytest.fixture
    def machines(
        self, backend: Backend, template: Snapshot, base_spec: MachineSpec, session: Session
    ) -> Iterator[MachineMaker]:
        """Makes clones of ``template`` (see :data:`MachineMaker`); all destroyed after."""
        made: list[MachineRef] = []

        def make(name: str = "conf", network: Network | None = None, **changes: Any) -> Machine:
            spec = replace(base_spec, name=name, network=network.name if network else None)
            spec = replace(spec, **changes)
            ref = backend.clone(template, spec, session, network)
            made.append(ref)
            return Machine(backend, ref, spec)

        yield make
        for ref in made:
            backend.destroy(ref)

    @pytest.fixture
    def clone(self, machines: MachineMaker) -> Machine:
        """One clone of ``template``, named ``conf``."""
        return machines("conf")


def ids(refs: Iterable[MachineRef]) -> set[str]:
    """The ids of ``refs`` (what ``owned()`` returns)."""
    return {ref.id for ref in refs}
