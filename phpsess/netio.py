"""The cheapest Trio I/O path for stream sockets, used on every request.

Trio's ``SocketStream.receive_some`` tries ``recv`` first, waits if it would
block, then checkpoints again after it; ``send_all`` checkpoints too: three
scheduler passes per request/reply, and a buffer of the requested size
allocated per receive.  Here a receive is one wait (the checkpoint) and one
``readv`` into a buffer that is reused; a send is one ``write`` that waits
only when the socket buffer is full (``writev`` when a reply carries a big
session: its data goes out from the store's object, not copied).  Errors of
a vanished peer become ``trio.BrokenResourceError`` as with streams.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Final, Protocol

import trio

from phpsess import protocol as p

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
    """Told about a send that has to wait for the peer to read (never about
    one that completes at once: the usual reply costs no call).

    ``send_waits`` comes when the send first has to wait, with the bytes it
    holds in memory until it ends (the buffers it writes from: all of them
    stay pinned until the end); ``send_progress`` each time the peer took
    some more of it; ``send_done`` once all is sent (not when the send
    fails or is cancelled: the connection ends then).  The daemon gives the
    whole send a deadline from ``send_waits`` (progress does not refresh it,
    so that a client reading a few bytes now and then cannot keep a big
    reply, the store's object, pinned for ever), and counts what it holds
    against ``max_outgoing_bytes`` (PROTOCOL.md §10)."""

    def send_waits(self, now: float, held_bytes: int) -> None: ...

    def send_progress(self, now: float) -> None: ...

    def send_done(self) -> None: ...


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
    once: callers go on to :func:`receive` (or another checkpoint).  When it
    has to wait, ``stalls`` is told (the daemon closes a connection whose
    client has not read it all in time, and bounds what such sends hold)."""
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:  # the peer went away
        raise trio.BrokenResourceError(str(exc)) from exc
    if sent == len(data):
        return
    if stalls is not None:
        stalls.send_waits(trio.current_time(), len(data))
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
            stalls.send_progress(trio.current_time())
    if stalls is not None:
        stalls.send_done()


# A part of the replies at least this big (a session's data) is written
# from where it lies, with writev, not copied into one buffer with the rest:
# a client that does not read its replies pins no memory of its own (the
# store's object at most), and a big READ costs no copy.
BIG_PART_BYTES: Final = 64 * 1024
# Buffers per writev (Linux's IOV_MAX is 1024).
_IOV_MAX: Final = 1024


def append_reply(out: list[bytes], reply: p.Reply) -> int:
    """Add ``reply``'s bytes to ``out``, a big DATA reply as its header line
    and its data itself (for :func:`send_parts`); how many bytes that is."""
    if type(reply) is p.Data and len(reply.data) >= BIG_PART_BYTES:
        out.append(p.data_header(reply))
        out.append(reply.data)
        return len(reply.data)
    encoded = p.encode_reply(reply)
    out.append(encoded)
    return len(encoded)


async def send_parts(fd: int, parts: list[bytes], stalls: Stalls | None = None) -> None:
    """:func:`send` of the concatenation of ``parts``, copying none of those
    of ``BIG_PART_BYTES`` or more.  Empties ``parts``: the small ones are
    copied into one buffer, and a send that waits for its client holds that
    copy only, not the originals too."""
    for part in parts:
        if len(part) >= BIG_PART_BYTES:
            break
    else:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        await send(fd, data, stalls)
        return
    chunks: list[memoryview] = []
    small: list[bytes] = []
    for part in parts:
        if len(part) < BIG_PART_BYTES:
            small.append(part)
            continue
        if small:
            chunks.append(memoryview(b"".join(small)))
            small = []
        chunks.append(memoryview(part))
    if small:
        chunks.append(memoryview(b"".join(small)))
    parts.clear()
    del small
    first = True
    while True:
        if not first:
            await trio.lowlevel.wait_writable(fd)
        try:
            written = sent = os.writev(fd, chunks[:_IOV_MAX])
        except BlockingIOError:
            written = sent = 0
        except OSError as exc:  # the peer went away
            raise trio.BrokenResourceError(str(exc)) from exc
        while chunks and sent >= len(chunks[0]):
            sent -= len(chunks.pop(0))
        if not chunks:
            break
        if sent:
            chunks[0] = chunks[0][sent:]
        if stalls is not None:
            now = trio.current_time()
            if first:
                # What stays pinned until the end: the whole of each buffer
                # left (a big part is the store's object, or an old copy).
                stalls.send_waits(now, sum(memoryview(chunk.obj).nbytes for chunk in chunks))
            elif written:
                stalls.send_progress(now)
        first = False
    if stalls is not None and not first:
        stalls.send_done()


HANGUP_POLL_S: Final = 0.25


def hung_up(fd: int) -> bool:
    """Whether the peer closed or reset the socket, without reading what it
    sent (POLLRDHUP: Linux).  One ``poll``, no wait."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)  # POLLHUP and POLLERR come anyway
    return bool(poller.poll(0))


async def wait_hangup(fd: int) -> None:
    """Return once the peer closed or reset the socket (:func:`hung_up`);
    looked at every ``HANGUP_POLL_S``."""
    while not hung_up(fd):
        await trio.sleep(HANGUP_POLL_S)
