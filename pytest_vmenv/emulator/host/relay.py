"""A TCP relay between two network namespaces: the copy loop of ``vm.forward`` and
``vm.expose_host_port``.

A :class:`Relay` owns one listening socket (made in one namespace) and a thread that accepts
on it. For each connection it accepts it makes the far side's socket with ``make()`` *in that
thread* (a socket keeps the namespace it was made in: ``make`` decides which one), and a
worker (:mod:`.workers`) connects it to ``127.0.0.1:port`` there. The bytes are then pumped by
one worker per direction; when one side ends its stream, the other side's write half is shut
(half-close passes through). :meth:`Relay.close` stops accepting and cuts every relayed
connection. Workers never make a socket: a worker thread may have been started by a thread
that joined a guest's namespace (and so be in it), so only ``make``, in the accepting thread,
decides where a socket lives.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ... import errors
from .workers import Workers

__all__ = ["CONNECT_TIMEOUT", "MAX_CONNECTIONS", "Relay"]

CONNECT_TIMEOUT = 10.0
"""Seconds a relay waits for the far side's service to accept (a loopback connect: at once)."""
MAX_CONNECTIONS = 256
"""Connections one relay carries at once; past it a new one is closed at once. Each costs
this process two sockets, two threads and their buffers, and for ``expose_host_port`` the
guest decides how many it opens: a hostile guest must not exhaust pytest's threads or fds."""
_SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
_CHUNK = 256 * 1024


@dataclass(eq=False)
class _Pair:
    """One relayed connection: the last of its two pumps to end closes both sockets."""

    client: socket.socket
    upstream: socket.socket
    done: Callable[[_Pair], None]
    pumps: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` to ``dst`` until EOF (then shut ``dst``'s write half) or an error."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.cut()
        with self.lock:
            self.pumps -= 1
            last = self.pumps == 0
        if last:
            self.close()

    def close(self) -> None:
        self.client.close()
        self.upstream.close()
        self.done(self)

    def cut(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Relay:
    """``listener``'s connections, each relayed to ``127.0.0.1:port`` through a socket that
    ``make()`` gives (raising ``OSError`` or a :class:`.VmenvError` when the far side is
    gone: that connection is then closed); ``after()`` runs when the accepting thread ends,
    in it."""

    listener: socket.socket
    port: int
    make: Callable[[], socket.socket]
    workers: Workers
    name: str
    after: Callable[[], None] = lambda: None
    live: set[_Pair] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @property
    def address(self) -> tuple[str, int]:
        """Where the listener listens, as seen in its own namespace."""
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept, name=self.name, daemon=True)
        thread.start()
        return thread

    def _accept(self) -> None:
        """Accept, make the far side's socket in this thread, and hand the pair to a worker
        that connects it."""
        try:
            while True:
                try:
                    client, _ = self.listener.accept()
                except OSError as exc:
                    if exc.errno in _SHORTAGE and not self.closed:
                        time.sleep(0.05)  # out of fds or memory for now: not the end
                        continue
                    return
                with self.lock:
                    full = len(self.live) >= MAX_CONNECTIONS
                if full:
                    client.close()
                    continue
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    upstream = self.make()
                except (OSError, errors.VmenvError):
                    client.close()  # the far side is gone: the client sees its connection close
                    continue
                pair = _Pair(client, upstream, self._forget)
                with self.lock:
                    closed = self.closed
                    if not closed:
                        self.live.add(pair)
                if closed:
                    pair.close()
                    return
                self._run(pair, functools.partial(self._connect, pair))
        finally:
            self.after()

    def _run(self, pair: _Pair, job: Callable[[], None]) -> bool:
        try:
            self.workers.run(job)
        except RuntimeError:  # no thread can be started now: drop this connection, not the relay
            pair.close()
            return False
        return True

    def _connect(self, pair: _Pair) -> None:
        try:
            pair.upstream.settimeout(CONNECT_TIMEOUT)
            pair.upstream.connect(("127.0.0.1", self.port))
            pair.upstream.settimeout(None)
        except OSError:
            pair.close()  # the far side refused: so does the relay, by closing
            return
        if self._run(pair, functools.partial(pair.pump, pair.upstream, pair.client)):
            pair.pump(pair.client, pair.upstream)

    def _forget(self, pair: _Pair) -> None:
        with self.lock:
            self.live.discard(pair)

    def close(self) -> None:
        """Stop accepting (the port then refuses) and cut every relayed connection."""
        with self.lock:
            self.closed = True
            live, self.live = list(self.live), set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        for pair in live:
            pair.cut()
