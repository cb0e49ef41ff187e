"""The cheapest Trio I/O path for stream sockets, used on every request.

Trio's ``SocketStream.receive_some`` tries ``recv`` first, waits if it would
block, then checkpoints again after it; ``send_all`` checkpoints too: three
scheduler passes per request/reply, and a buffer of the requested size
allocated per receive.  Here a receive is one wait (the checkpoint) and one
``readv`` into a buffer that is reused; a send is one ``write`` that waits
only when the socket buffer is full.  Errors of a vanished peer become
``trio.BrokenResourceError`` as with streams.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Final, Protocol

import trio

RECEIVE_BYTES: Final = 256 * 1024
# A receive reads into its thread's one buffer and copies out what came.  A
# plain ``os.read(fd, RECEIVE_BYTES)`` allocates RECEIVE_BYTES each time,
# which glibc serves with mmap (over its 128 KiB threshold) until something
# has raised that threshold, then shrinks with mremap and frees with munmap:
# three system calls and two page faults per request.  One buffer per thread
# (the daemon's I/O is all in the Trio thread): receive() copies out before
# it awaits again, so tasks cannot mix their bytes.
_buffers = threading.local()


def _buffer() -> memoryview:
    try:
        buffer: memoryview = _buffers.view
    except AttributeError:
        buffer = _buffers.view = memoryview(bytearray(RECEIVE_BYTES))
    return buffer

# Replies of one batch held back for its single write: past this much, what
# is there goes out before the next request is handled, so that pipelined
# READs of big sessions cost one reply of memory, and a client that does not
# read its replies is held back by its socket buffer.
MAX_REPLY_BYTES_PER_WRITE: Final = 256 * 1024


class Stalls(Protocol):
    """Told since when a send has been waiting for the peer to read (it is
    refreshed whenever the peer makes room, and None once all is sent)."""

    sending_since: float | None


def fileno(stream: trio.abc.Stream) -> int:
    assert isinstance(stream, trio.SocketStream)
    return stream.socket.fileno()


async def receive(fd: int, size: int = RECEIVE_BYTES) -> bytes:
    """Bytes from the socket, b"" once the peer closed it."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        buffer = _buffer()
        try:
            got = os.readv(fd, (buffer if size >= RECEIVE_BYTES else buffer[:size],))
        except BlockingIOError:
            continue
        except OSError as exc:  # reset by the peer
            raise trio.BrokenResourceError(str(exc)) from exc
        return bytes(buffer[:got])


async def send(fd: int, data: bytes, stalls: Stalls | None = None) -> None:
    """Write all of ``data``.  Not a checkpoint when the write completes at
    once: callers go on to :func:`receive` (or another checkpoint).  While it
    has to wait, ``stalls.sending_since`` says since when the peer last made
    room (the daemon closes a connection whose client stopped reading)."""
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:  # the peer went away
        raise trio.BrokenResourceError(str(exc)) from exc
    if sent == len(data):
        return
    if stalls is not None:
        stalls.sending_since = trio.current_time()
    view = memoryview(data)
    while sent < len(view):
        await trio.lowlevel.wait_writable(fd)
        try:
            sent += os.write(fd, view[sent:])
        except BlockingIOError:
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if stalls is not None:
            stalls.sending_since = trio.current_time()  # it reads, however slowly
    if stalls is not None:
        stalls.sending_since = None


HANGUP_POLL_S: Final = 0.25


async def wait_hangup(fd: int) -> None:
    """Return once the peer closed or reset the socket, without reading
    what it sent (POLLRDHUP: Linux); looked at every ``HANGUP_POLL_S``."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)  # POLLHUP and POLLERR come anyway
    while not poller.poll(0):
        await trio.sleep(HANGUP_POLL_S)
