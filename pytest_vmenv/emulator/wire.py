"""JSON messages with file descriptors over SOCK_SEQPACKET sockets.

One ``sendmsg`` is one message (SEQPACKET keeps boundaries), so no framing is needed; file
descriptors ride along as SCM_RIGHTS. Received descriptors are close-on-exec from the start
(``MSG_CMSG_CLOEXEC``): a guest's PID 1 must never leak one into a command it spawns, or a
background daemon would keep another command's output pipe open. A message that is not a
JSON object is refused with ``EPROTO`` (an OSError: the peer broke the protocol).

This is the one wire format of the emulator's three processes: pytest and the zygote, pytest
and each guest's PID 1 (its control socket), and a file ``get``'s extent frames
(:data:`FRAME`) on the pipe between them.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["FRAME", "MAX_MESSAGE", "recv", "send", "socketpair"]

MAX_MESSAGE = 1 << 20
_MAX_FDS = 8
FRAME = struct.Struct("<QQ")
"""The header of one extent of a framed ``get`` (see :mod:`.guest.files`): offset, length."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET pair (both ends close-on-exec)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message, with ``fds`` attached."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.sendmsg([data])


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message; ``(None, [])`` at end of stream."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - (len(raw) % fds.itemsize)])
    if not data:
        return None, list(fds)
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "malformed message on a control socket")
    return message, list(fds)
