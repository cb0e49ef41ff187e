"""The cluster's I/O shell (CLUSTER.md): heartbeats over UDP, authenticated
TCP links to peers, forwarding of client requests to a session's master,
replication to its backup before a write is acknowledged, takeover when a
peer dies, verification of copies of uncertain freshness, and drain.

The decisions live in pure modules: ``membership`` (who is alive),
``replica`` (who masters what, which update to accept), ``placement`` (what
an ID names), ``peerauth`` (who may talk to us).  This module only moves
bytes and calls them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import secrets
import socket as stdsocket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import attrs
import trio

from phpsess import membership as mb
from phpsess import netio, peerauth
from phpsess import protocol as p
from phpsess.addresses import TcpAddress
from phpsess.journal import Op
from phpsess.logs import quoted, sid_tag
from phpsess.placement import check_node_name, named_nodes, suffix
from phpsess.replica import (
    BACKUP,
    DELETED,
    MASTER,
    NOBODY,
    Repl,
    Replicas,
    Verdict,
    decode_meta,
    encode_meta,
)

if TYPE_CHECKING:
    from phpsess.server import Server

log = logging.getLogger("phpsess")

IO_TIMEOUT_S: Final = 5.0
_PIPE_IDLE_S: Final = 60.0
_MAX_LINE: Final = 512
# Unauthenticated TCP handshakes at once (CLUSTER.md §4).  Connections from a
# configured peer's address have their own slots, so that a host without the
# secret cannot crowd out the peers' links by holding connections open; any
# other source (a peer whose connections leave from another address) shares
# the rest.  Each address has a cap of its own, so that one host (even a
# peer's, running other programs) cannot take every slot.  At a cap the
# oldest unauthenticated connection (of that address, else of the pool) is
# closed to make room: a peer's daemon answers CHALLENGE within a round trip,
# so its connection is never the oldest for long, while one that says nothing
# is (a program on a peer's host holding connections open cannot keep the
# daemon there out).
HANDSHAKES_FROM_PEERS: Final = 64
HANDSHAKES_PER_PEER_ADDRESS: Final = 16  # another program on a peer's host
HANDSHAKES_FROM_OTHERS: Final = 16
HANDSHAKES_PER_OTHER_ADDRESS: Final = 4
# Master copies checked at once in the background after a peer is first heard
# (CLUSTER.md §7): a few WHEREs in flight, not one per session at once.
BACKGROUND_VERIFIES: Final = 8
# A completed drain announces that the node leaves (CLUSTER.md §8): so many
# heartbeats, this far apart at most (a UDP datagram may be lost).
LEAVE_ANNOUNCEMENTS: Final = 3
LEAVE_ANNOUNCEMENT_GAP_S: Final = 0.05
# HANDOFFs a drain has in flight at once (CLUSTER.md §8): one after another,
# a round trip each (and the receiver's copy to its new backup), 100,000
# sessions took longer than the drain deadline.
HANDOFFS_IN_FLIGHT: Final = 64
# Connections per peer those HANDOFFs share (each pipelined, as a Pipe): the
# receiver serves one connection's requests in order, each HANDOFF only
# once its new backup has the copy (CLUSTER.md §11.4), so that one
# connection would serialize those copies.
HANDOFF_LANES: Final = 8


@attrs.frozen
class ClusterConfig:
    node: str
    listen: TcpAddress
    peers: tuple[tuple[str, TcpAddress], ...]
    secret: bytes = attrs.field(repr=False)
    heartbeat_s: float = 0.5
    dead_after_s: float = 3.0
    probe_s: float = 0.5
    drain_timeout_s: float = 30.0

    def __attrs_post_init__(self) -> None:
        check_node_name(self.node)
        names = [name for name, _ in self.peers]
        for name in names:
            check_node_name(name)
        if self.node in names or len(set(names)) != len(names):
            raise ValueError("peer names must be unique and differ from --node")
        def same(address: TcpAddress) -> TcpAddress:  # localhost is 127.0.0.1
            return TcpAddress("127.0.0.1", address.port) if address.host == "localhost" \
                else address

        seen: dict[TcpAddress, str] = {}
        for name, given in self.peers:
            address = same(given)
            if address == same(self.listen):
                raise ValueError(
                    f"peer {name}'s address {given} is this node's own cluster listen "
                    "address: a node is not its own peer (a copied config?)"
                )
            if address in seen:
                raise ValueError(f"peers {seen[address]} and {name} have the same address "
                                 f"{given}")
            seen[address] = name
        peerauth.check_secret(self.secret)


class LinkError(Exception):
    """A peer could not be reached or broke the conversation.  ``answered``:
    yet its daemon showed it runs (CLUSTER.md §3): it closed or reset the
    connection after accepting it, or sent bytes we could not use.  A
    timeout never says so: the kernel accepts connections for a daemon that
    is stopped (``SIGSTOP``) or hung as well."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class _Lines:
    """Reads handshake lines from a stream, keeping whatever follows."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > _MAX_LINE:
                raise peerauth.AuthError("handshake line too long")
            data = await self.stream.receive_some(4096)
            if not data:
                raise peerauth.AuthError("connection closed during the handshake")
            self.buf += data


class PeerLink:
    """One authenticated TCP connection to a peer, used one request at a time."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.stream: trio.SocketStream | None = None
        self.parser = p.ReplyParser()
        self.lock = trio.Lock()

    async def connect(self) -> None:
        cluster = self.cluster
        address = cluster.peer_address.get(self.name)
        if address is None:
            raise LinkError(f"{self.name!r} is not a configured peer")
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(IO_TIMEOUT_S):
                stream = await trio.open_tcp_stream(
                    address.host, address.port, local_address=cluster.source_host
                )
                lines = _Lines(stream)
                their_challenge = peerauth.parse_challenge_line(await lines.line())
                mine = peerauth.new_challenge()
                await stream.send_all(
                    peerauth.auth_line(
                        cluster.me, cluster.membership.incarnation, their_challenge,
                        cluster.config.secret, mine,
                    )
                )
                name, tag = peerauth.parse_accept_line(await lines.line())
                if name != self.name:
                    raise peerauth.AuthError(f"expected {self.name}, {name} answered")
                peerauth.verify_proof(cluster.config.secret, mine, name, tag)
        except (OSError, trio.TooSlowError, peerauth.AuthError, trio.BrokenResourceError) as exc:
            # Accepted, then closed, reset or answered wrongly: the daemon
            # runs (a handshake slot may have been taken from it, §4).
            answered = stream is not None and (
                isinstance(exc, peerauth.AuthError) or _reset(exc)
            )
            if stream is not None:
                await trio.aclose_forcefully(stream)
            why = f"no handshake within {IO_TIMEOUT_S:g} s" if isinstance(
                exc, trio.TooSlowError) else str(exc) or type(exc).__name__
            raise LinkError(
                f"cannot reach peer {self.name} at {address}: {why}", answered=answered
            ) from exc
        self.stream = stream
        self.parser = p.ReplyParser()
        self.parser.receive_data(bytes(lines.buf))
        cluster.links.setdefault(self.name, set()).add(self)

    async def call(self, request: p.Request, timeout_s: float = IO_TIMEOUT_S) -> p.Reply:
        async with self.lock:
            if self.stream is None:
                await self.connect()
            assert self.stream is not None
            fd = netio.fileno(self.stream)
            done = False
            try:
                with trio.fail_after(timeout_s):
                    await netio.send(fd, p.encode_request(request))
                    while True:
                        reply = self.parser.next_reply()
                        if not isinstance(reply, p._NeedData):
                            break
                        data = await netio.receive(fd)
                        if not data:
                            raise LinkError(
                                f"peer {self.name} closed the connection", answered=True
                            )
                        self.parser.receive_data(data)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, p.ReplyError,
                    trio.ClosedResourceError) as exc:
                await self.aclose()
                raise LinkError(
                    f"peer {self.name}: {exc or type(exc).__name__}",
                    answered=isinstance(exc, p.ReplyError) or _reset(exc),
                ) from exc
            except LinkError:
                await self.aclose()
                raise
            else:
                done = True
            finally:
                if not done and self.stream is not None:
                    # Cancelled mid-request: the conversation is out of step.
                    with trio.CancelScope(shield=True):
                        await self.aclose()
            return reply

    async def aclose(self) -> None:
        stream, self.stream = self.stream, None
        self.cluster.links.get(self.name, set()).discard(self)
        if stream is not None:
            await trio.aclose_forcefully(stream)

    def abort(self) -> None:
        """Break the connection now (its peer was declared dead): a call in
        progress fails with LinkError and closes the link itself."""
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.socket.shutdown(stdsocket.SHUT_RDWR)


class _Slot:
    __slots__ = ("deadline", "done", "error", "reply", "sid")

    def __init__(self, deadline: float, sid: str | None) -> None:
        self.deadline = deadline
        self.sid = sid
        self.done = trio.Event()
        self.reply: p.Reply | None = None
        self.error: str | None = None


# Times one send moves a session above a destroy's epoch (STALE -): once
# answers an honest peer, twice a second change racing the first.
_MAX_MOVES_UP: Final = 4
# How often a pipe's watchdog looks for a reply that is overdue.
_WATCHDOG_S: Final = 0.25
# How a peer link fails (each ends the link; the requests on it fail).
_LINK_ERRORS: Final = (
    LinkError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, p.ReplyError,
)


class Pipe:
    """The ordered, pipelined replication connection to one peer (CLUSTER.md
    §6): every request waiting to go out leaves in one write and the
    replies are matched in order, so concurrent writes share system calls and
    a peer sees one session's updates in the order they were made."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self._outbox: list[bytes] = []
        self._waiting: deque[_Slot] = deque()
        self._kick = trio.Event()
        self._running = False
        self._overdue = False  # the watchdog broke the link
        # The link's socket while the writer task idles (nothing queued):
        # a request then goes out at once from the caller, without waking
        # the writer (a scheduler pass per write); -1 otherwise.
        self._direct_fd = -1
        self._used = False  # a request went out since the writer last looked
        # Sessions with a request on this connection still unanswered, and
        # how many (a drain's HANDOFF must not overtake them: _call_handoff).
        self.unanswered: dict[str, int] = {}

    async def call(self, request: p.Request, timeout_s: float = IO_TIMEOUT_S) -> p.Reply:
        """The peer's reply; LinkError if the link fails or no reply comes
        within ``timeout_s`` (give or take the watchdog's period).  Replies
        come in order, so one watchdog per pipe looking at the oldest
        request replaces a cancel scope (a deadline registration) per call."""
        if not self._running:
            self._running = True
            self.cluster._spawn(self._run)
        sid: str | None = getattr(request, "sid", None)
        slot = _Slot(trio.current_time() + timeout_s, sid)
        if sid is not None:
            self.unanswered[sid] = self.unanswered.get(sid, 0) + 1
        data = p.encode_request(request)
        self._waiting.append(slot)
        self._used = True
        fd = self._direct_fd
        sent = 0
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                pass
            except OSError:
                self.abort()  # the reader fails the link and every request on it
                sent = len(data)
        if sent < len(data):
            # In order behind what is queued; the writer sends it.
            self._direct_fd = -1
            self._outbox.append(data[sent:] if sent else data)
            self._kick.set()
        await slot.done.wait()
        if slot.error is not None or slot.reply is None:
            raise LinkError(f"peer {self.name}: {slot.error or 'no reply'}")
        return slot.reply

    @property
    def waiting(self) -> int:
        """Requests sent or queued, not answered yet."""
        return len(self._waiting)

    def _settle(self, slot: _Slot) -> None:
        sid = slot.sid
        if sid is not None:
            left = self.unanswered.pop(sid) - 1
            if left:
                self.unanswered[sid] = left
        slot.done.set()

    def abort(self) -> None:
        link = getattr(self, "_link", None)
        if link is not None:
            link.abort()

    async def _run(self) -> None:
        try:
            while self._waiting:
                self._link = PeerLink(self.cluster, self.name)
                why: str | None = None
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watchdog)
                        await self._link.connect()
                        nursery.start_soon(self._read)
                        await self._write(nursery.cancel_scope)
                except* _LINK_ERRORS as group:
                    first: BaseException = group
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    why = str(first) or type(first).__name__
                finally:
                    with trio.CancelScope(shield=True):
                        await self._link.aclose()
                if why is not None:
                    self._fail_all("timed out" if self._overdue else why)
                    self._overdue = False
        finally:
            self._running = False
            # Cancelled, or a bug: nobody may wait for a reply that cannot come.
            self._fail_all("the replication link stopped")

    async def _write(self, idle: trio.CancelScope) -> None:
        link = self._link
        assert link.stream is not None
        fd = netio.fileno(link.stream)
        while True:
            if self._outbox:
                batch = b"".join(self._outbox)
                self._outbox.clear()
                await netio.send(fd, batch)
                continue
            self._kick = trio.Event()
            self._used = False
            self._direct_fd = fd
            try:
                while True:
                    with trio.move_on_after(_PIPE_IDLE_S):
                        await self._kick.wait()
                    if self._kick.is_set() or self._used or self._waiting:
                        break
                    idle.cancel()  # unused for a while: close; reopened on demand
                    return
            finally:
                self._direct_fd = -1

    async def _watchdog(self) -> None:
        """Break the link when the oldest request waits past its deadline
        (replies come in order: every later request waits behind it)."""
        while True:
            await trio.sleep(_WATCHDOG_S)
            overdue = self._waiting and self._waiting[0].deadline <= trio.current_time()
            # While connecting (no stream yet), connect() has its own timeout.
            if overdue and self._link.stream is not None:
                self._overdue = True
                self._link.abort()  # the reader fails; this nursery ends

    async def _read(self) -> None:
        link = self._link
        assert link.stream is not None
        fd = netio.fileno(link.stream)
        while True:
            while True:
                reply = link.parser.next_reply()
                if isinstance(reply, p._NeedData):
                    break
                if not self._waiting:
                    raise LinkError("a reply nobody asked for")
                slot = self._waiting.popleft()
                slot.reply = reply
                self._settle(slot)
                if self.cluster._unresponsive:
                    self.cluster._answered(self.name)
            data = await netio.receive(fd)
            if not data:
                raise LinkError("connection closed")
            link.parser.receive_data(data)

    def _fail_all(self, why: str) -> None:
        self._outbox.clear()
        while self._waiting:
            slot = self._waiting.popleft()
            slot.error = why
            self._settle(slot)


@attrs.define(eq=False)
class _Handshake:
    """An unauthenticated peer connection in its handshake (CLUSTER.md §4)."""

    host: str
    pool: dict[_Handshake, None]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


class _Unanswered(LinkError):
    """The link failed after the request went out: it may have been served."""


# Changes a lock guards (PROTOCOL.md §6): refused once the lock is known lost.
_GUARDED: Final = (p.Write, p.Touch, p.Destroy)
_LOCK_LOST_FORWARDED: Final = (
    "the connection to the session's master that held this request's lock broke "
    "(the master or this node was declared dead), so the lock is gone; nothing was "
    "changed by this request"
)


def _peer_closed(link: PeerLink) -> bool:
    """Whether the peer already closed ``link`` (EOF or a reset), so that a
    request sent on it could not be answered."""
    return link.stream is None or netio.hung_up(netio.fileno(link.stream))


class Forwards:
    """The peer links of one client connection, one per master it talked to
    (CLUSTER.md §5.3): the master sees each as that client, so locks hold.

    The locks the client took through a link last as long as that link: when
    it breaks (its peer or this node was declared dead, the peer died, a
    request timed out), the master has released them, maybe granted them to
    others who wrote since.  Those sessions are then remembered as *lost*:
    the client's next ``WRITE``, ``TOUCH`` or ``DESTROY`` of one gets
    ``ERR LOCK_LOST`` (like a revoked lease, PROTOCOL.md §6.3) instead of
    being sent to a master that holds no lock for it (CLUSTER.md §5.3)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.links: dict[str, PeerLink] = {}
        self.hello: p.Hello | None = None
        # Sessions whose lock this client holds through a link: sid -> link.
        self.locked: dict[str, PeerLink] = {}
        # Sessions whose lock went with a broken link (see above).
        self.lost: set[str] = set()

    def broken(self, node: str) -> None:
        """The link to ``node`` failed or is replaced: its locks are lost."""
        link = self.links.pop(node, None)
        for sid, held in list(self.locked.items()):
            if held is link or held.stream is None:
                del self.locked[sid]
                self.lost.add(sid)

    def holds_any(self) -> bool:
        """Whether a lock this client took through a link may still hold:
        that link is still the one to its node, and neither side closed it
        (its master died, or was declared dead).  Not whether the master
        revoked it meanwhile (its lease, for another request): that is
        learnt at the client's next change (LOCK_LOST)."""
        return any(
            held is self.links.get(held.name) and not _peer_closed(held)
            for held in self.locked.values()
        )

    def lock_lost(self, request: object, node: str) -> p.Error | None:
        """``ERR LOCK_LOST`` if ``request`` is a change of a session whose lock
        this client lost, before it goes to ``node`` (this node: served here).
        A lock holds only through the same, unbroken link to the same node."""
        sid = getattr(request, "sid", None)
        if sid is None:
            return None
        held = self.locked.get(sid)
        if held is not None and (held is not self.links.get(node) or held.stream is None):
            del self.locked[sid]
            self.lost.add(sid)
        if sid not in self.lost:
            return None
        if isinstance(request, p.Read) and request.lock:
            self.lost.discard(sid)  # a new locking READ forgets it (PROTOCOL.md §6.3)
        elif isinstance(request, _GUARDED):
            self.lost.discard(sid)  # one error, as for a revoked lease
            return p.Error(p.Code.LOCK_LOST, _LOCK_LOST_FORWARDED)
        return None

    def note(self, link: PeerLink | None, request: p.Request, reply: p.Reply) -> None:
        """Keep :attr:`locked` up to date with ``reply`` to ``request``."""
        if isinstance(request, p.Create):
            if request.lock and link is not None and isinstance(reply, p.Ok) and reply.tokens:
                self.locked[reply.tokens[0]] = link  # made and locked there
            return
        sid = getattr(request, "sid", None)
        if sid is None or link is None:
            return
        if isinstance(reply, p.Error) and reply.code is p.Code.NOT_MASTER:
            if self.locked.get(sid) is link:
                # That master no longer serves it: the lock went with it.
                del self.locked[sid]
                self.lost.add(sid)
            return
        if isinstance(request, p.Read):
            if request.lock and isinstance(reply, (p.Data, p.Miss)):
                self.locked[sid] = link
                self.lost.discard(sid)
        elif isinstance(request, _GUARDED):
            kept = (
                not isinstance(request, p.Destroy) and request.keep and isinstance(reply, p.Ok)
            ) or (isinstance(request, p.Touch) and isinstance(reply, p.Miss))
            if not kept and self.locked.get(sid) is link:
                del self.locked[sid]

    async def call(self, node: str, request: p.Request, wait_s: float) -> p.Reply:
        """``node``'s reply; :class:`_Unanswered` if the link failed once
        ``request`` was sent (it may have been served), LinkError if before."""
        link = self.links.get(node)
        # A WRITE whose outcome is unknown is never sent again (CLUSTER.md §7):
        # not on a link the peer has closed (idle, or it restarted) either.
        if link is not None and isinstance(request, p.Write) and _peer_closed(link):
            await link.aclose()
        if link is not None and link.stream is None:
            self.broken(node)
            link = None
        lost = self.lock_lost(request, node)
        if lost is not None:
            return lost
        if link is None:
            link = PeerLink(self.cluster, node)
            self.links[node] = link
            hello = self.hello or p.Hello(p.PROTOCOL_VERSION)
            reply = await link.call(hello)
            if not isinstance(reply, p.Ok):
                await link.aclose()
                del self.links[node]
                raise LinkError(f"peer {node} refused HELLO: {reply}")
        try:
            reply = await link.call(request, timeout_s=wait_s + IO_TIMEOUT_S)
        except LinkError as exc:
            raise _Unanswered(str(exc)) from exc
        self.note(link, request, reply)
        return reply

    async def broadcast(self, request: p.Request) -> None:
        """HELLO and CLOSE concern every master this client holds locks on."""
        for node, link in list(self.links.items()):
            if link.stream is None:
                continue
            try:
                await link.call(request)
            except LinkError:
                self.links.pop(node, None)
        # Both release every lock; a new HELLO also forgets lost ones (§6.3).
        self.locked.clear()
        if isinstance(request, p.Hello):
            self.lost.clear()

    async def aclose(self) -> None:
        for link in self.links.values():
            await link.aclose()
        self.links.clear()
        self.locked.clear()
        self.lost.clear()


def _source_host(listen_host: str) -> str | None:
    """The address to connect to peers from: the cluster address if it is a
    specific IP (not a wildcard or a name)."""
    try:
        ip = ipaddress.ip_address(listen_host)
    except ValueError:
        return None
    return None if ip.is_unspecified else listen_host


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether an exception of ``kinds`` is behind ``exc`` (its causes,
    contexts and exception groups)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return True
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def _refused(exc: BaseException) -> bool:
    """Whether a connection refusal (nothing listening) is behind ``exc``."""
    return _caused_by(exc, (ConnectionRefusedError,))


def _reset(exc: BaseException) -> bool:
    """Whether the peer reset or closed the connection behind ``exc``."""
    return _caused_by(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))


_SID_REQUESTS: Final = (p.Read, p.Write, p.Touch, p.Exists, p.Destroy, p.Get)


class Cluster:
    def __init__(self, config: ClusterConfig, server: Server) -> None:
        self.config = config
        self.server = server
        self.me = config.node
        self.peer_address = dict(config.peers)
        self.membership = mb.Membership(
            config.node, self.peer_address, secrets.randbelow(2**63 - 2) + 1,
            trio.current_time(), heartbeat_s=config.heartbeat_s, dead_after_s=config.dead_after_s,
        )
        self.replicas = Replicas(config.node, [config.node, *self.peer_address])
        self.links: dict[str, set[PeerLink]] = {}
        self.ready = trio.Event()
        self.draining = False
        self._handing_over: set[str] = set()  # HANDOFFs in flight (CLUSTER.md §8)
        # The drain (CLUSTER.md §8): its deadline; whether nobody stays to
        # take the sessions; how many went; hand-overs under way.
        self._drain_started = self._drain_deadline = 0.0
        self._drain_alone = False
        self._handed = 0
        self._unanswered: set[str] = set()
        # Sessions the drain found locked: new locks on them wait for the
        # hand-over (resolve_lock), so that a busy session goes too.
        self._pending: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._udp: trio.socket.SocketType | None = None
        self._heartbeat_ms = 0  # the timestamp of our last heartbeat
        self._replay_guard = peerauth.ReplayGuard()
        self._wake = trio.Event()
        self._probing: set[str] = set()
        # Peers that left a WHERE unanswered, until they answer (_where_all).
        self._unresponsive: set[str] = set()
        # Peers never heard whose daemon answered our probe's connection but
        # did not complete the handshake: they do not take this node (§2).
        self._refusing_us: set[str] = set()
        # Some session we master may have no backup (restored so, or its
        # backup died while no peer could take a copy): the heartbeat task
        # re-copies them once a peer can.  Set when that may be so.
        self._maybe_degraded = True
        self._recopying = False
        # Master copies to verify (and re-copy) in the background: those
        # whose backup was first heard since our start (_verify_in_background).
        self._to_verify: set[str] = set()
        self._verifying = False
        self._rehomed: set[str] = set()
        self._missing_logged: set[str] = set()
        # Unauthenticated handshakes in progress, oldest first (dicts keep
        # their insertion order): from the peers' addresses, from others,
        # and per address (CLUSTER.md §4).
        self._from_peers: dict[_Handshake, None] = {}
        self._from_others: dict[_Handshake, None] = {}
        self._by_address: dict[str, dict[_Handshake, None]] = {}
        self._peer_hosts: frozenset[str] = frozenset()  # the peers' IP addresses
        # Refused and failed handshakes, per kind: logged rarely (_rare), as
        # rejected heartbeats are, so that a host without the secret cannot
        # flood the log.
        self._refusals: dict[str, int] = {}
        # Copies a backup refused, per (backup, reply code): logged rarely.
        self._copy_refusals: dict[tuple[str, str], int] = {}
        self._pipes: dict[str, Pipe] = {}
        self._lanes: dict[str, list[Pipe]] = {}  # a drain's HANDOFFs, per peer
        self.started = trio.current_time()
        self._last_tick = trio.current_time()
        # How long a request may wait for a failover to complete.
        # Connections to peers come from the cluster address when it is a
        # specific one (peers and firewalls see the address they configured).
        self.source_host = _source_host(config.listen.host)
        self.failover_s = config.dead_after_s + config.probe_s + 2 * config.heartbeat_s + 1
        self.takeovers_total = 0
        self.replication_failures_total = 0
        server.engine.sid_suffix = self._sid_suffix
        server.engine.list_fields = self.list_fields
        if server.persister is not None:
            server.persister.meta_source = self.meta_snapshot
        if server.engine.changes is None:
            server.engine.changes = []

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from phpsess.server import StartupError

        address = self.config.listen
        try:
            check_listen(address)
        except ValueError as exc:
            raise StartupError(f"cannot listen for peers on {address}: {exc}") from None
        udp = trio.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
        try:
            await udp.bind((address.host, address.port))
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            udp.close()
            raise StartupError(
                f"cannot listen for peers on {address}: {exc.strerror}"
            ) from exc
        self._udp = udp
        log.info(
            "event=cluster_listening node=%s address=%s peers=%s heartbeat_ms=%d "
            "dead_after_ms=%d probe_ms=%d",
            self.me, address, ",".join(self.peer_address),
            round(self.config.heartbeat_s * 1000), round(self.config.dead_after_s * 1000),
            round(self.config.probe_s * 1000),
        )
        try:
            await self._resolve_peer_hosts()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_heartbeats)
                nursery.start_soon(self._heartbeats)
                for listener in listeners:
                    nursery.start_soon(self._accept_peers, listener, nursery)
                if not self.peer_address:
                    self.ready.set()
                task_status.started()
        finally:
            udp.close()
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a background task whose failure is logged, never fatal: an
        exception escaping into the cluster's nursery would stop the daemon."""
        assert self._nursery is not None

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("event=cluster_task_failed task=%s", fn.__name__)

        self._nursery.start_soon(guarded)

    def reload_peers(
        self, peers: tuple[tuple[str, TcpAddress], ...]
    ) -> tuple[list[str], list[str]]:
        """A reloaded peer list (SIGHUP): new peers are watched and join once
        they speak; removed ones are treated as dead (their sessions taken
        over, our backups re-homed).  Returns (added, removed)."""
        wanted = dict(peers)
        moved = [
            n for n, a in wanted.items() if n in self.peer_address and self.peer_address[n] != a
        ]
        added, removed = self.membership.set_peers(wanted)
        for name in (*removed, *moved):
            for link in list(self.links.get(name, ())):
                link.abort()
            self._pipes.pop(name, None)
            self._lanes.pop(name, None)
        self.peer_address = wanted
        self._refusing_us &= set(wanted)
        self.replicas.nodes = frozenset([self.me, *wanted])
        for name in removed:
            self._spawn(self._peer_dead, name)
        self._spawn(self._resolve_peer_hosts)
        log.info(
            "event=peers_reloaded added=%s removed=%s moved=%s",
            ",".join(added) or "-", ",".join(removed) or "-", ",".join(moved) or "-",
        )
        return added, removed

    def statistics(self) -> dict[str, object]:
        membership = self.membership
        members = {
            name: {
                "state": membership.state(name),
                "sessions": membership.load(name)[0],
                "draining": membership.load(name)[2],
            }
            for name in self.peer_address
        }
        return {"cluster": {
            "node": self.me,
            "draining": self.draining,
            "degraded": membership.degraded,
            "masters": self.replicas.master_count(),
            "copies": len(self.replicas.meta),
            "takeovers_total": self.takeovers_total,
            "replication_failures_total": self.replication_failures_total,
            "peers": members,
        }}

    def list_fields(self, sid: str) -> str:
        """The two fields a cluster node's ``LIST`` line carries after
        ``<locked>`` (``phpsess ls``): ``master <backup>`` (``master -``:
        the only copy), ``backup <master>``, or ``- -`` for a copy without
        a record (a session being started)."""
        held = self.replicas.holding(sid)
        if held is None:
            return "- -"
        role, other = held
        return f"{role} {other or '-'}"

    def _sid_suffix(self) -> str | p.Error:
        # This node masters what it creates: its CREATE takes the lock here.
        # While it drains, its clients' CREATEs are made on a peer that
        # stays instead (create_elsewhere), and one made here all the same
        # (no such peer answered) is handed over like the others.
        master = self.me
        backup = self.membership.choose_backup(exclude={master})
        if backup is None and self._refusing_us:
            # Alone because the peers whose daemons run do not take us (not
            # in their [cluster.peers], another secret): they would take
            # this node's IDs for client-chosen ones and could start second
            # copies of them, never reconciled (CLUSTER.md §2, §9).
            refusing = sorted(self._refusing_us)
            return p.Error(
                p.Code.UNAVAILABLE,
                f"no peer takes this node ({', '.join(refusing)} "
                f"refuse{'s' if len(refusing) == 1 else ''} its handshake: is it in "
                f"{'its' if len(refusing) == 1 else 'their'} [cluster.peers], with the "
                "same secret?); not creating a session with a single copy",
            )
        return suffix(master, backup)

    def unrecorded_elsewhere(self, sids: list[str], journaled: dict[str, bytes]) -> int:
        """How many restored sessions of a data directory with no cluster
        record at all (a daemon outside a cluster wrote it: a single
        daemon's, made a cluster node's) have an ID that names another node
        master.  That node never had them: dropped as backup copies, they
        would be lost.  A cluster node's own directory has a record for
        every session: one without (its record lost to damage and repair)
        is read as before, by its ID."""
        if journaled:
            return 0
        nodes = self.replicas.nodes
        return sum(named_nodes(sid, nodes)[0] != self.me for sid in sids)

    def adopt_restored(self, sids: list[str], journaled: dict[str, bytes]) -> None:
        """Copies restored from disk (CLUSTER.md §7): those we master stay,
        unverified until checked; backup copies are dropped (their masters
        re-copy).  Roles come from the journal, else from the session ID."""
        store = self.server.engine.store
        dropped = 0
        for sid in sids:
            raw = journaled.get(sid)
            self.replicas.adopt_restored(sid, None if raw is None else decode_meta(raw))
            m = self.replicas.meta[sid]
            if m.role == BACKUP:
                del self.replicas.meta[sid]
                self.replicas.unverified.discard(sid)
                store.delete(sid)
                dropped += 1
        if sids:
            log.info(
                "event=cluster_restored unverified=%d dropped_backup_copies=%d",
                len(sids) - dropped, dropped,
            )

    def _signature(self, sid: str) -> tuple[str, int, str, str | None] | None:
        m = self.replicas.meta.get(sid)
        return None if m is None else (m.role, m.epoch, m.master, m.backup)

    def _journal_meta(self, sid: str, before: object = ()) -> None:
        """Journal a session's role and epoch when they change (not on every
        write: versions are settled with the backup after a restart)."""
        m = self.replicas.meta.get(sid)
        if m is None or self.server.persister is None or self._signature(sid) == before:
            return
        self.server.persister.submit([(Op.META, sid, 0, encode_meta(m))], time.time())

    def meta_snapshot(self) -> dict[str, bytes]:
        return {sid: encode_meta(m) for sid, m in self.replicas.meta.items()}

    # -- heartbeats and membership (CLUSTER.md §3)

    async def _heartbeats(self) -> None:
        membership = self.membership
        while True:
            now = trio.current_time()
            self._notice_stall(now)
            self._last_tick = now
            self._rehome_from_drainers()
            engine = self.server.engine
            membership.set_load(len(engine.store), engine.connections, self.draining)
            if membership.heartbeat_due(now):
                await self._send_heartbeat()
                membership.sent_heartbeat(now)
            for event in membership.tick(now):
                self._on_event(event)
            self._recopy_when_possible()
            if not self.ready.is_set() and (
                all(membership.state(n) != mb.UNKNOWN for n in self.peer_address)
                or now - self.started > self.config.dead_after_s
            ):
                self.ready.set()
            with trio.move_on_at(min(membership.next_deadline(), now + self.config.heartbeat_s)):
                await self._wake.wait()
            self._wake = trio.Event()

    def _notice_stall(self, now: float) -> None:
        """Notice if our own loop stalled (SIGSTOP, VM pause: the heartbeat
        clock is more than ``dead_after_s / 2`` old, CLUSTER.md §3).  What we
        master may have moved meanwhile: mark it unverified, so that it is
        checked (``_verify``) before it is served again.  Called by the
        heartbeat task and, before serving anything as master, by
        ``resolve``: after a resume Trio may run a client's task first."""
        if now - self._last_tick <= self.config.dead_after_s / 2:
            return
        stalled = [s for s, m in self.replicas.meta.items() if m.role == MASTER]
        self.replicas.mark_unverified(stalled)
        log.warning(
            "event=cluster_stall paused_s=%.1f unverified=%d",
            now - self._last_tick, len(stalled),
        )
        self._last_tick = now

    def _rehome_from_drainers(self) -> None:
        """A peer announced it is draining: give our sessions it backs up a
        new backup now, before it leaves (CLUSTER.md §8)."""
        assert self._nursery is not None
        for peer in self.peer_address:
            if not self.membership.load(peer)[2] or peer in self._rehomed:
                continue
            self._rehomed.add(peer)
            moved = [s for s, m in self.replicas.meta.items()
                     if m.role == MASTER and m.backup == peer]
            for sid in moved:
                self.replicas.meta[sid].backup = self.membership.choose_backup(exclude={peer})
                self._journal_meta(sid)
                self._spawn(self._rehome, sid, peer)
            # Our backup copies of its sessions go when it hands them over.
            log.info("event=peer_draining peer=%s rehomed=%d", peer, len(moved))
        for peer in list(self._rehomed):
            if not self.membership.load(peer)[2]:
                self._rehomed.discard(peer)

    async def _send_heartbeat(self) -> None:
        assert self._udp is not None
        self._heartbeat_ms = peerauth.next_heartbeat_ms(time.time(), self._heartbeat_ms)
        datagram = peerauth.encode_heartbeat(
            self.membership.heartbeat(trio.current_time()),
            self.config.secret,
            self._heartbeat_ms / 1000,
        )
        for address in self.peer_address.values():
            with contextlib.suppress(OSError):
                await self._udp.sendto(datagram, (address.host, address.port))

    async def _receive_heartbeats(self) -> None:
        assert self._udp is not None
        rejected = 0
        elsewhere: dict[str, int] = {}
        while True:
            datagram, source = await self._udp.recvfrom(2048)
            try:
                heartbeat, sent_ms = peerauth.decode_heartbeat_sent(
                    datagram, self.config.secret, time.time()
                )
                if heartbeat.name not in self.peer_address:
                    # It holds the secret: a node whose --node or peer list
                    # differs from ours (a typo), or one with our own name.
                    raise peerauth.AuthError(
                        f"heartbeat from {heartbeat.name!r}, which is "
                        + ("this node's own name" if heartbeat.name == self.me else
                           "not a configured peer")
                        + ": check --node and the peer list of the node at "
                        f"{source[0]}"
                    )
                if not self._replay_guard.fresh(heartbeat.name, sent_ms):
                    raise peerauth.AuthError(
                        f"heartbeat from {heartbeat.name} is not newer than the last one"
                        " heard: replayed, or delivered late"
                    )
            except (peerauth.AuthError, ValueError) as exc:
                rejected += 1
                if _rare(rejected):
                    log.warning(
                        "event=heartbeat_rejected source=%s count=%d detail=%s",
                        source[0], rejected, exc,
                    )
                continue
            if _sent_elsewhere(source, self.peer_address[heartbeat.name]):
                count = elsewhere[heartbeat.name] = elsewhere.get(heartbeat.name, 0) + 1
                if _rare(count):
                    log.warning(
                        "event=heartbeat_from_another_address peer=%s source=%s:%d "
                        "configured=%s count=%d detail=%s",
                        heartbeat.name, source[0], source[1],
                        self.peer_address[heartbeat.name], count, quoted(
                            "a daemon sends heartbeats from its cluster address: two "
                            f"daemons may run with node = {heartbeat.name} (a copied "
                            "configuration?), and take turns being it; or the peer list "
                            "has another address for it, or a NAT rewrites it"
                        ),
                    )
            for event in self.membership.receive(heartbeat, trio.current_time()):
                self._on_event(event)

    def _on_event(self, event: object) -> None:
        assert self._nursery is not None
        if isinstance(event, mb.Alive):
            log.info(
                "event=peer_alive peer=%s rejoined=%s", event.name, event.rejoined
            )
            self._refusing_us.discard(event.name)
            if not event.rejoined:
                # First heard since our start: it may have been paused or cut
                # off, and hold newer copies of what we master with it as
                # backup, or have taken them over.  Check before serving (§7),
                # and in the background too: after a restart (ours or the
                # whole cluster's) the peer may hold no copy of them, and
                # each would stay single until next read or written.
                affected = [
                    sid for sid, m in self.replicas.meta.items()
                    if m.role == MASTER and m.backup == event.name
                ]
                self.replicas.mark_unverified(affected)
                self._verify_later(affected)
            self._spawn(self._recopy_degraded)
        elif isinstance(event, mb.Suspect):
            if event.name not in self._probing:
                self._probing.add(event.name)
                self._spawn(self._probe, event.name)
        elif isinstance(event, mb.Dead):
            # Taken over at once, before any other request is answered: a
            # restarted node learns of it when it verifies (§7).  Called from
            # unguarded tasks: a failure here is logged, never fatal.
            try:
                copies = self._take_over(event.name, never_heard=event.incarnation == 0)
            except Exception:
                log.exception("event=cluster_task_failed task=_take_over peer=%s", event.name)
                return
            self._spawn(self._send_copies, copies)
        elif isinstance(event, mb.Left):
            # It drained and holds nothing (CLUSTER.md §8): not a death.  What
            # still names it (a copy whose release was lost) is handled as
            # after a death, without counting a takeover.
            log.info("event=peer_left peer=%s detail=drained, then stopped", event.name)
            try:
                copies = self._take_over(event.name, left=True)
            except Exception:
                log.exception("event=cluster_task_failed task=_take_over peer=%s", event.name)
                return
            self._spawn(self._send_copies, copies)
        elif isinstance(event, mb.Unreachable):
            log.warning(
                "event=peer_unreachable peer=%s witness=%s detail=no answer from it, but "
                "%s still hears it: not declared dead (a broken link, CLUSTER.md §3)",
                event.name, event.witness, event.witness,
            )
        elif isinstance(event, mb.SelfDeclaredDead):
            self._declared_dead(event.by)

    def _verify_later(self, sids: list[str]) -> None:
        """Queue master copies for :meth:`_verify_in_background`."""
        self._to_verify.update(sids)
        if self._to_verify and not self._verifying:
            self._verifying = True
            self._spawn(self._verify_in_background)

    async def _verify_in_background(self) -> None:
        """Verify the queued master copies that are still unverified, a few
        at a time (``BACKGROUND_VERIFIES``): ``_verify`` re-copies each one
        its backup lacks (a whole-cluster restart drops every backup copy,
        CLUSTER.md §7).  Once every peer has been heard or the detection
        time has passed (``ready``): a peer heard later could master a
        copy at a newer epoch than its backup knows."""
        try:
            await self.ready.wait()
            checked = 0

            async def worker() -> None:
                nonlocal checked
                while self._to_verify:
                    sid = self._to_verify.pop()
                    m = self.replicas.meta.get(sid)
                    if m is None or m.role != MASTER or sid not in self.replicas.unverified:
                        await trio.lowlevel.checkpoint()  # read since, or gone
                        continue
                    try:
                        await self._verify(sid)
                    except Exception:
                        log.exception("event=cluster_task_failed task=_verify session=%s",
                                      sid_tag(sid))
                    checked += 1

            # Again if more were queued as the last workers ended: no
            # checkpoint between this test and clearing _verifying.
            while self._to_verify:
                async with trio.open_nursery() as nursery:
                    for _ in range(BACKGROUND_VERIFIES):
                        nursery.start_soon(worker)
            if checked:
                log.info("event=background_verified sessions=%d", checked)
        finally:
            self._verifying = False

    async def _probe(self, name: str) -> None:
        """A direct TCP probe before declaring a silent peer dead (§3)."""
        link = PeerLink(self, name)
        answered = refused = False
        try:
            with trio.move_on_after(self.config.probe_s + 0.5):
                # Any reply will do: OK, or SHUTTING_DOWN from a peer that
                # drains.  (A PING, refused NEED_HELLO, was taken for no
                # answer: no probe ever answered.)
                await link.call(p.Hello(p.PROTOCOL_VERSION), timeout_s=self.config.probe_s)
                answered = True
                self._answered(name)
        except LinkError as exc:
            refused = _refused(exc)
            # Closed or reset by the peer's daemon (one whose handshake slots
            # a program on its host holds, §4): it runs, so it is not
            # silent.  Only a timeout or a refused connection counts as none.
            answered = exc.answered and not refused
            if answered and self.membership.incarnation_of(name) is None:
                if name not in self._refusing_us:
                    log.warning(
                        "event=peer_refuses_this_node peer=%s detail=its daemon runs but "
                        "did not complete the handshake (%s): is this node in its "
                        "[cluster.peers], with the same secret? Until a peer takes this "
                        "node, new sessions are refused here", name, exc,
                    )
                self._refusing_us.add(name)
        finally:
            await link.aclose()
            self._probing.discard(name)
        log.info("event=peer_probe peer=%s answered=%s refused=%s", name, answered, refused)
        now = trio.current_time()
        for event in self.membership.probe_result(name, answered, now, refused=refused):
            self._on_event(event)

    async def _peer_dead(self, name: str) -> None:
        await self._send_copies(self._take_over(name))

    async def _send_copies(self, copies: list[Repl]) -> None:
        for repl in copies:
            await self._send_copy(repl.sid)

    def _take_over(self, name: str, never_heard: bool = False, left: bool = False) -> list[Repl]:
        """``name`` is dead (or ``left``): become master of what it mastered
        and we back up, pick new backups for what it backed up; the copies
        to send."""
        if not never_heard and not left:
            log.warning("event=peer_dead peer=%s", name)
        for link in list(self.links.get(name, ())):
            link.abort()
        # Its connections to us go too, and the locks its clients hold
        # through them with them (§7): a host that froze sends no FIN, and
        # they would stay held until their lease ran out.
        self.server.close_peer_connections(name)
        copies = self.replicas.node_dead(name, self._choose_backup)
        self._maybe_degraded = True
        for repl in copies:
            self._journal_meta(repl.sid)
        if never_heard:
            # Not started yet, or down since before we started (§3): what it
            # was to back up here goes on degraded or to another peer.
            log.warning(
                "event=peer_absent peer=%s copies=%d detail=never heard since this node "
                "started and its port refuses: treated as dead until it speaks",
                name, len(copies),
            )
        elif left:
            if copies:
                log.info("event=left_peer_rehomed peer=%s copies=%d", name, len(copies))
        else:
            self.takeovers_total += 1
            log.info("event=takeover peer=%s copies=%d", name, len(copies))
        return copies

    def _declared_dead(self, by: str) -> None:
        """Peers took over everything we held (CLUSTER.md §3, §7)."""
        dropped = self.replicas.drop_all()
        self.membership.reincarnate(secrets.randbelow(2**63 - 2) + 1)
        for sid in dropped:
            self._drop_local(sid)
        log.warning(
            "event=declared_dead_by_peers by=%s dropped_copies=%d detail=rejoining as a "
            "new incarnation", by, len(dropped),
        )

    def _choose_backup(self) -> str | None:
        return self.membership.choose_backup()

    def _recopy_when_possible(self) -> None:
        """Sessions left alone (their backup died while no peer was alive,
        one only suspect, say) get their second copy once a peer can take
        it: becoming alive again from suspect is no event (heartbeat task)."""
        if self._maybe_degraded and self.membership.choose_backup() is not None:
            self._maybe_degraded = False
            self._spawn(self._recopy_degraded)

    async def _recopy_degraded(self) -> None:
        if self._recopying:
            self._maybe_degraded = True  # the pass under way may miss some
            return
        self._recopying = True
        try:
            for sid in self.replicas.degraded_sessions():
                repl = self.replicas.backup_failed(sid, self._choose_backup)
                if repl is None:
                    self._maybe_degraded = True  # no peer for it yet
                    continue
                self._journal_meta(sid)
                await self._send_copy(sid)
        finally:
            self._recopying = False

    # -- peer connections (CLUSTER.md §4)

    async def _accept_peers(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.error("event=peer_accept_failed error=%s", exc.strerror)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._peer_connection, stream)

    async def _resolve_peer_hosts(self) -> None:
        """The configured peers' IP addresses, whose connections get the
        handshake slots reserved for peers."""
        hosts: set[str] = set()
        for name, address in list(self.peer_address.items()):
            try:
                infos = await trio.socket.getaddrinfo(
                    address.host, address.port, type=stdsocket.SOCK_STREAM
                )
            except OSError as exc:
                log.warning(
                    "event=peer_resolve_failed peer=%s host=%s detail=%s (its connections "
                    "share the handshake slots of unknown sources)", name, address.host, exc,
                )
                continue
            hosts.update(_plain_ip(str(info[4][0])) for info in infos)
        self._peer_hosts = frozenset(hosts)

    def _refused(self, message: str, *args: object) -> None:
        kind = message.split(" ", 1)[0]
        count = self._refusals[kind] = self._refusals.get(kind, 0) + 1
        if _rare(count):
            log.warning(message + " count=%d", *args, count)

    def _admit(self, host: str) -> _Handshake:
        """A slot for an unauthenticated handshake from ``host`` (CLUSTER.md
        §4).  At a cap the oldest handshake of that address, else of its
        pool, is closed to make room (see ``HANDSHAKES_FROM_PEERS``)."""
        if host in self._peer_hosts:
            pool, pool_cap, cap = (
                self._from_peers, HANDSHAKES_FROM_PEERS, HANDSHAKES_PER_PEER_ADDRESS
            )
        else:
            pool, pool_cap, cap = (
                self._from_others, HANDSHAKES_FROM_OTHERS, HANDSHAKES_PER_OTHER_ADDRESS
            )
        mine = self._by_address.setdefault(host, {})
        victim = None
        if len(mine) >= cap:
            victim = next(iter(mine))
        elif len(pool) >= pool_cap:
            victim = next(iter(pool))
        if victim is not None:
            self._release(victim)
            victim.scope.cancel()
            self._refused(
                "event=peer_refused reason=too_many_handshakes peer=%s detail=its oldest "
                "unauthenticated connection closed to make room for a new one", victim.host,
            )
        handshake = _Handshake(host, pool)
        pool[handshake] = None
        self._by_address.setdefault(host, {})[handshake] = None
        return handshake

    def _release(self, handshake: _Handshake) -> None:
        handshake.pool.pop(handshake, None)
        mine = self._by_address.get(handshake.host)
        if mine is not None:
            mine.pop(handshake, None)
            if not mine:
                del self._by_address[handshake.host]

    async def _peer_connection(self, stream: trio.SocketStream) -> None:
        lines = _Lines(stream)
        host = _peer(stream)
        handshake = self._admit(host)
        try:
            with handshake.scope, trio.fail_after(IO_TIMEOUT_S):
                mine = peerauth.new_challenge()
                await stream.send_all(peerauth.challenge_line(mine))
                name, incarnation, tag, theirs = peerauth.parse_auth_line(await lines.line())
                if name not in self.peer_address:  # also refuses our own name
                    raise peerauth.AuthError(f"unknown node {name!r}")
                if theirs == mine:
                    raise peerauth.AuthError("a reflected challenge")
                peerauth.verify_proof(self.config.secret, mine, name, tag)
                await stream.send_all(peerauth.accept_line(self.me, theirs, self.config.secret))
        except (peerauth.AuthError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            self._refused("event=peer_auth_failed peer=%s detail=%s", host, quoted(exc))
            await trio.aclose_forcefully(stream)
            return
        finally:
            self._release(handshake)
        if handshake.scope.cancelled_caught:  # closed for a newer one (_admit)
            await trio.aclose_forcefully(stream)
            return
        for event in self.membership.connected(name, incarnation, trio.current_time()):
            self._on_event(event)
        await self.server.serve_peer(stream, name, bytes(lines.buf))

    # -- serving a session (CLUSTER.md §5)

    def is_sid_request(self, request: object) -> bool:
        return isinstance(request, _SID_REQUESTS)

    async def resolve(self, sid: str) -> str | p.Error:
        """The node that serves ``sid`` now, after checking an unverified copy;
        ``UNAVAILABLE`` while it cannot tell whether another node holds it
        (:meth:`_find_elsewhere`)."""
        # "Am I still master?" must not depend on which task runs first after
        # a stall: notice it here too (one clock comparison when none).
        self._notice_stall(trio.current_time())
        alive = self.membership.is_alive
        node = self.replicas.route(sid, alive)
        if node == self.me and sid in self.replicas.unverified:
            await self._verify(sid)
            node = self.replicas.route(sid, alive)
        if node == self.me and sid not in self.replicas.meta:
            master, backup = named_nodes(sid, self.replicas.nodes)
            if self.me not in (master, backup) or self.server.engine.locks.holder(sid) is None:
                # No copy here, and not a session being started here (CREATE
                # locks it).  It may have moved: both named holders are dead
                # but it was taken over or re-homed, or we are named but gave
                # it away (a drain before a restart) or lost it.  Ask first:
                # one round to the peers for a session that is new or gone.
                found = await self._find_elsewhere(sid, master, backup)
                if found is not None:
                    return found
                node = self.replicas.route(sid, alive)
                if node != self.me:
                    return node
            dead = self.membership.state(master) == mb.DEAD and (
                backup == master or self.membership.state(backup) == mb.DEAD
            )
            if dead and sid not in self._missing_logged:
                # Both copies died at once (CLUSTER.md §9): never serve stale.
                if len(self._missing_logged) > 10_000:
                    self._missing_logged.clear()
                self._missing_logged.add(sid)
                log.warning(
                    "event=session_missing session=%s master=%s backup=%s "
                    "detail=master and backup both died; the session starts empty",
                    sid_tag(sid), master, backup,
                )
        return node

    async def check_hint(self, sid: str, node: str) -> str | p.Error:
        """A peer asks us for ``sid``, which :meth:`resolve` sends to ``node``
        by a hint alone (we hold no copy): the hint may be stale (the session
        was destroyed or expired there since).  Answered ``NOT_MASTER
        <node>`` unchecked, the asker, finding no master, came back here
        until the failover time.  So check, as for a session we are asked
        first (:meth:`_find_elsewhere`): nobody has it, and we are the node
        that starts it (§5 item 5), or its master, or UNAVAILABLE.  The
        hinted node is asked first, alone, for ``probe_s`` at most: if it
        masters the session, or does not answer (cut off from us, not
        necessarily from the asker), the hint is passed on unchecked, as
        before; only if it holds no master's copy are all peers asked."""
        if sid in self.replicas.meta or self.replicas.hinted(sid) != node:
            return node
        reply: p.Reply | None = None
        with contextlib.suppress(LinkError), trio.move_on_after(self.config.probe_s):
            reply = await self.call(node, p.Where(sid))
        if reply is None:
            return node
        if isinstance(reply, p.Data):
            parsed = _where_tokens(reply.tokens)
            if parsed is None or parsed[0] == MASTER:
                return node
        return await self._master_or_starter(sid)

    async def _master_or_starter(self, sid: str) -> str | p.Error:
        """For a session we hold no copy of and no master claimed: its master
        after all (:meth:`_find_elsewhere`), ``UNAVAILABLE`` while that cannot
        be told, else (it exists nowhere) the node that starts it: the one
        :meth:`Replicas.route` names without hints (§5 item 5), the same for
        every asker, never each one its own."""
        found = await self._find_elsewhere(sid, *named_nodes(sid, self.replicas.nodes))
        if found is not None:
            return found
        self.replicas.forget_hint(sid)
        return self.replicas.route(sid, self.membership.is_alive)

    async def create_elsewhere(self, forwards: Forwards, request: p.Create) -> p.Reply | None:
        """While we drain, a client's ``CREATE`` is made on a peer that stays,
        through this node's link for the client (CLUSTER.md §8): the session
        never starts here, and its lock is held where it is mastered, as for
        any session mastered elsewhere (§5.3).  None: there is no such peer,
        or it could not be reached: it is made here, and handed over in turn."""
        target = self.membership.choose_backup()
        if target is None:
            return None
        try:
            return await forwards.call(target, request, 0)
        except LinkError as exc:
            log.info("event=forward_failed peer=%s detail=%s", target, exc)
            forwards.broken(target)  # a lock it may have taken goes with the link
            return None

    async def resolve_lock(self, sid: str, *, peer: bool, change: bool = False,
                           wait_s: float = math.inf) -> str | p.Error:
        """Where a new lock on ``sid``, which :meth:`resolve` says we serve,
        is taken.  While we drain, not on a session about to be handed over
        (CLUSTER.md §8): the HANDOFF would go out under the lock and the new
        master grant it a second time.  A peer's forwarded request gets
        ``NOT_MASTER``: its node looks again and retries (§5.4) until the
        session, free, has been handed over.  Our own clients (served
        through the drain) wait only while a HANDOFF of it is in flight, or
        while the drain waits for the lock to be free to hand
        the session over (it found it locked: without this, requests taking
        turns on its lock would keep it here until the deadline), then go
        where it went, within the request's lock wait ``wait_s``
        (``LOCK_TIMEOUT`` after it, as the engine's own wait).  A ``change``
        without the lock (``WRITE``, ``TOUCH``, ``DESTROY`` of a client that
        does not lock) waits only while a ``HANDOFF`` is in flight: made
        then, its copy could reach the old backup after the snapshot the
        new master starts from.  A session locked by another request is the
        engine's to refuse (``LOCKED``)."""
        node: str | p.Error = self.me
        deadline = trio.current_time() + wait_s
        while self.draining and node == self.me:
            m = self.replicas.meta.get(sid)
            if m is None or m.role != MASTER:
                break  # not one the drain hands over (a session being started)
            if peer:
                return p.Error(p.Code.NOT_MASTER, m.backup or "-")
            if sid not in self._handing_over and (change or sid not in self._pending):
                break
            if trio.current_time() >= deadline:
                return p.Error(
                    p.Code.LOCK_TIMEOUT,
                    f"session is locked by another request; gave up after waiting {wait_s:g} s "
                    "(wait_ms) while this node hands it over (it drains)",
                )
            await trio.sleep(0.01)
            node = await self.resolve(sid)
        return node

    async def _find_elsewhere(self, sid: str, master: str, backup: str) -> str | p.Error | None:
        """For a session we hold no copy of: the node that masters it, else
        ``None`` when it exists nowhere and may start here (CLUSTER.md §5.4,
        §5.5), else ``UNAVAILABLE`` when that cannot be told yet:

        - a named holder never heard since we started (or since a reload
          added it; also one declared absent, its port refusing): it may
          hold the session (paused, cut off, not yet told of us, or
          starting with its journaled copies).  Its first heartbeat is
          waited for a little (``2 × heartbeat + probe``).
        - a live peer holds a copy but nobody masters it: its master died
          and the takeover is under way.  Waited for up to ``failover_s``.

        Serving the session as new meanwhile would start a second, empty
        master copy, and the writes taken on one of the two would be lost."""
        started = trio.current_time()
        unheard_until = started + 2 * self.config.heartbeat_s + self.config.probe_s
        while True:
            found, copies = await self._locate_with_copies(sid)
            if found is not None and found != self.me:
                return found
            unheard = sorted(
                n for n in {master, backup}
                if n != self.me and self.membership.incarnation_of(n) is None
            )
            now = trio.current_time()
            if unheard and now >= unheard_until:
                return p.Error(
                    p.Code.UNAVAILABLE,
                    f"the session's holders ({master}, {backup}): {', '.join(unheard)} not "
                    "heard since this node started; retry",
                )
            if not unheard and copies and now >= started + self.failover_s:
                return p.Error(
                    p.Code.UNAVAILABLE,
                    f"a copy of the session is held by {', '.join(copies)} but no node "
                    "masters it (a takeover under way?); retry",
                )
            if not unheard and not copies:
                return None
            await trio.sleep(0.1)

    async def _verify(self, sid: str) -> None:
        """Check a copy of uncertain freshness against every live peer before
        serving it (CLUSTER.md §7): drop it if the session moved, take the
        backup's data if it is newer, else keep it (and re-copy it)."""
        m = self.replicas.meta.get(sid)
        if m is None:
            self.replicas.unverified.discard(sid)
            return
        answers = await self._where_all(sid)
        if self.replicas.meta.get(sid) is not m:
            # Changed while we asked: a copy from its new master made ours a
            # backup's, say (a takeover right after our restart); what we
            # were checking is gone, and dropping now would drop that.
            return
        deletions = [(e, v) for role, e, v, _, _ in answers.values() if role == DELETED]
        if deletions and max(deletions) >= (m.epoch, m.version):
            # Destroyed since our copy was made (we were down, or it was
            # taken over, then destroyed): never served again (§7).
            self.replicas.stale(sid, NOBODY, max(deletions)[0])
            self._drop_local(sid)
            self._log_stale_copy(sid, NOBODY)
            return
        masters = [(e, v, node) for node, (role, e, v, _, _) in answers.items() if role == MASTER]
        if masters and max(masters)[:2] >= (m.epoch, m.version):
            node = max(masters)[2]
            self.replicas.stale(sid, node)
            self._drop_local(sid)
            self._log_stale_copy(sid, node)
            return
        if any(e > m.epoch for _, e, _, _, _ in answers.values()):
            # A copy at a newer epoch: another node took the session over
            # (its own answer did not come: a link broken by our stall).
            # Ours is stale; the master is found again (resolve).
            self.replicas.stale(sid, "")
            self._drop_local(sid)
            self._log_stale_copy(sid, "-")
            return
        newest = max(
            ((e, v, ttl_ms, data) for role, e, v, ttl_ms, data in answers.values()
             if role == BACKUP and e >= m.epoch),
            default=None,
        )
        if newest is not None and newest[1] > m.version and newest[2] > 0:
            ttl_s = max(1, math.ceil(newest[2] / 1000))
            self.server.engine.store.put(sid, newest[3], ttl_s, trio.current_time())
            self._journal(Op.PUT, sid, ttl_s, newest[3])
            self.replicas.verified(sid, newest[0], newest[1])
            return
        self.replicas.verified(sid, m.epoch, m.version)
        backup = m.backup
        if (
            m.role == MASTER and backup is not None
            and answers.get(backup, (DELETED,))[0] == DELETED  # no copy (an older tombstone)
            and self.membership.is_alive(backup)
        ):
            # The backup lost its copy: restore it.  Not to one that is not
            # alive (never heard since our start): the read would wait for it
            # in vain; our next write to the session copies it whole.
            await self._send_copy(sid)

    def _log_stale_copy(self, sid: str, master: str) -> None:
        suffix = self.server.stale_copy_throttle.suffix(trio.current_time())
        if suffix is not None:
            log.info("event=stale_copy_dropped session=%s master=%s%s", sid_tag(sid), master,
                     suffix)

    async def _where_all(self, sid: str) -> dict[str, tuple[str, int, int, int, bytes]]:
        """``WHERE sid`` of every live peer: node -> (role, epoch, version,
        ttl_ms, data) for those that hold a copy.  No answer counts as no
        copy there (CLUSTER.md §11.4).  A peer that left one unanswered (the
        link failed or timed out) is suspected, and until it answers again
        its answer is waited for ``probe_s`` only, not the link's 5 s: a peer
        that heartbeats but never answers over TCP must not hold up every
        new session and ``EXISTS`` (§5.4)."""
        answers: dict[str, tuple[str, int, int, int, bytes]] = {}

        async def ask(node: str) -> None:
            wait_s = self.config.probe_s if node in self._unresponsive else math.inf
            reply: p.Reply | None = None
            try:
                with trio.move_on_after(wait_s):
                    # Given up, the request stays on the pipe: its reply, if
                    # one comes, is dropped (Pipe.call).
                    reply = await self.call(node, p.Where(sid))
            except LinkError as exc:
                self._no_answer(node, exc)
                return
            if isinstance(reply, p.Data):
                parsed = _where_tokens(reply.tokens)
                if parsed is not None:
                    answers[node] = (*parsed, reply.data)

        async with trio.open_nursery() as nursery:
            for node in self.membership.alive_peers():
                nursery.start_soon(ask, node)
        return answers

    def _no_answer(self, node: str, exc: LinkError) -> None:
        """``node`` left a WHERE unanswered: suspect it (the probe decides),
        and wait for it only briefly until it answers (:meth:`_where_all`)."""
        if node not in self._unresponsive:
            self._unresponsive.add(node)
            log.warning(
                "event=peer_unresponsive peer=%s detail=no answer to WHERE (%s); until it "
                "answers, its answers are waited for %d ms only (probe_ms) and a missing "
                "one counts as no copy there", node, exc, round(self.config.probe_s * 1000),
            )
        for event in self.membership.suspect(node):
            self._on_event(event)

    def _answered(self, node: str) -> None:
        """A reply came from ``node`` over TCP: it answers again."""
        if node in self._unresponsive:
            self._unresponsive.discard(node)
            log.info("event=peer_responsive peer=%s", node)

    def _drop_local(self, sid: str) -> None:
        """Our copy of ``sid`` is gone (stale, moved, deleted): so are the
        locks on it here (CLUSTER.md §7).  Its holder gets ``LOCK_LOST`` on
        its next write here, its waiters an error (a peer's: ``NOT_MASTER``,
        so its node finds the master again), never the copy just dropped."""
        engine = self.server.engine
        if engine.store.delete(sid):
            self._journal(Op.DELETE, sid, 0, b"")
        holder = engine.locks.holder(sid)
        if holder is not None:
            node = self.replicas.route(sid, self.membership.is_alive)
            engine.revoke_session(
                sid, trio.current_time(),
                p.Error(p.Code.UNAVAILABLE,
                        "the session moved to another node while this request waited for "
                        "its lock; retry"),
                p.Error(p.Code.NOT_MASTER, node if node != self.me else "-"),
            )
            # Its next WRITE would go to the new master, where it holds no
            # lock, and be taken (undoing the writes made there meanwhile):
            # its connection is closed, as one through a dead node is (§5.3),
            # so that the client reports the write failed.
            # (Not one whose grant waits for its check: that answers it.)
            conn = self.server._conns.get(holder)  # type: ignore[call-overload]
            if conn is not None and conn.scope is not None and conn.event is None:
                log.warning("event=lock_holder_closed session=%s owner=%s detail=the session "
                            "moved to another node", sid_tag(sid), holder)
                conn.scope.cancel()
            self.server._after_engine()

    def grant_needs_check(self, sid: str) -> bool:
        """Whether a lock granted here from the wait queue on ``sid`` must be
        checked (:meth:`resolve`) before it is delivered: after a stall
        (CLUSTER.md §3), or when another node masters the session.  (No copy
        at all: a session being started here, or one that expired; a copy
        dropped took its locks and waiters with it, :meth:`_drop_local`.)"""
        self._notice_stall(trio.current_time())
        m = self.replicas.meta.get(sid)
        return sid in self.replicas.unverified or (m is not None and m.role != MASTER)

    def _journal(self, op: Op, sid: str, ttl_s: int, data: bytes) -> None:
        changes = self.server.engine.changes
        if changes is not None and self.server.persister is not None:
            self.server.persister.submit([(op, sid, ttl_s, data)], time.time())

    async def forward(self, forwards: Forwards, node: str, request: p.Request,
                      wait_s: float) -> p.Reply | None:
        """Serve ``request`` on ``node`` (CLUSTER.md §5).  After a NOT_MASTER
        answer, or a master that went away, find the master again and retry
        until the cluster has had time to fail over; None means this node is
        the master now: serve it here."""
        sid: str = getattr(request, "sid", "")
        deadline = trio.current_time() + self.failover_s
        pause = 0.02
        while True:
            try:
                # A change of a session whose lock went with a broken link is
                # refused (LOCK_LOST), never sent to a master without its lock.
                reply = await forwards.call(node, request, wait_s)
            except LinkError as exc:
                log.info("event=forward_failed peer=%s detail=%s", node, exc)
                forwards.broken(node)
                self.replicas.forget_hint(sid)
                if isinstance(exc, _Unanswered) and isinstance(request, _GUARDED):
                    # Maybe served, maybe not: never sent again (CLUSTER.md §7).
                    lost = forwards.lock_lost(request, node)
                    if lost is not None:
                        return lost
                    if isinstance(request, p.Write):
                        return p.Error(
                            p.Code.UNAVAILABLE,
                            "the session's master did not answer; the write may or may "
                            "not have been made",
                        )
                await self._wait_for_verdict(node)
            else:
                if not (isinstance(reply, p.Error) and reply.code is p.Code.NOT_MASTER):
                    return reply
                found = await self._locate(sid)
                if found is None and self.replicas.where(sid) is None:
                    # Nobody masters it and we hold no copy: whether it exists
                    # anywhere, as for one we are asked first (a destroyed
                    # session was sent back and forth between its named
                    # master and a stale hint until the failover time).
                    where = await self._master_or_starter(sid)
                    if isinstance(where, p.Error):
                        return where
                    if where == self.me:
                        return None
                    found = where
                if found is not None and found != node:
                    if found == self.me:
                        return None
                    node = found
                    continue
            if trio.current_time() > deadline:
                return p.Error(
                    p.Code.UNAVAILABLE, "the session's master could not be reached; retry"
                )
            await trio.sleep(pause)
            pause = min(pause * 2, 0.25)
            resolved = await self.resolve(sid)
            if isinstance(resolved, p.Error):
                return resolved
            node = resolved
            if node == self.me:
                return None

    async def _wait_for_verdict(self, node: str) -> None:
        """A peer failed a request: suspect it now (the probe decides) and wait
        until membership says dead or alive."""
        for event in self.membership.suspect(node):
            self._on_event(event)
        deadline = trio.current_time() + self.config.dead_after_s + self.config.probe_s + 1
        while trio.current_time() < deadline:
            if (
                (self.membership.gone(node) or self.membership.state(node) == mb.ALIVE)
                and not self._suspected(node)
            ):
                return
            await trio.sleep(0.05)

    def _suspected(self, node: str) -> bool:
        return self.membership.state(node) == mb.SUSPECT or node in self._probing

    async def _locate(self, sid: str) -> str | None:
        """Ask every live peer who masters ``sid`` (CLUSTER.md §5.4)."""
        found, _ = await self._locate_with_copies(sid)
        return found

    async def _locate_with_copies(self, sid: str) -> tuple[str | None, list[str]]:
        """:meth:`_locate`, and the live peers that hold a copy of ``sid``
        that is not a master's (a backup's)."""
        answers = await self._where_all(sid)
        masters = [(e, v, node) for node, (role, e, v, _, _) in answers.items() if role == MASTER]
        copies = sorted(node for node, (role, *_) in answers.items() if role == BACKUP)
        mine = self.replicas.where(sid)
        best = max(masters) if masters else None
        if mine is not None and mine[0] == MASTER and (best is None or mine[1:] > best[:2]):
            return self.me, copies
        if best is None:
            return None, copies
        self.replicas.hint(sid, best[2])
        return best[2], copies

    # -- replication (CLUSTER.md §6)

    async def replicate(self, changes: list[tuple[Op, str, int, bytes]]) -> p.Error | None:
        """Copy our changes to each session's backup; None once all have them."""
        for op, sid, _, _ in changes:
            before = self._signature(sid)
            repl = self.replicas.local_change(sid, op is Op.DELETE, self._choose_backup)
            self._journal_meta(sid, before)
            if repl is None:
                # Alone (local_change found no peer to take a copy): the
                # heartbeat task re-copies it once one can.
                self._maybe_degraded = self._maybe_degraded or op is not Op.DELETE
                continue
            error = await self._send_until_acknowledged(
                sid, deleted=op is Op.DELETE, version=repl.version, epoch=repl.epoch, to=repl.to
            )
            if error is not None:
                return error
        return None

    async def _send_until_acknowledged(self, sid: str, *, deleted: bool, version: int,
                                       epoch: int, to: str | None = None) -> p.Error | None:
        """Send ``sid``'s change or whole copy to its backup until it is
        acknowledged; the error for the client if not."""
        backup_of_deleted = to
        moved_up = 0  # times a STALE - moved the session up (a peer that lies: bounded)
        deadline = trio.current_time() + 2 * (self.config.dead_after_s + self.config.probe_s) + 2
        while True:
            m = self.replicas.meta.get(sid)
            if (m is None and not deleted) or (m is not None and m.role != MASTER):
                return p.Error(p.Code.UNAVAILABLE, "the session moved to another node; retry")
            backup = m.backup if m is not None else backup_of_deleted
            if backup is None:
                self._maybe_degraded = True  # the heartbeat task re-copies it
                return None  # degraded: ours is the only copy (CLUSTER.md §6)
            request: p.Request
            if deleted:
                request = p.ReplDelete(sid, self.me, epoch, version)
            else:
                entry = self.server.engine.store.get(sid, trio.current_time())
                if entry is None:
                    return None
                ttl_s = max(1, math.ceil(entry.expires_at - trio.current_time()))
                assert m is not None
                request = p.ReplPut(sid, self.me, m.epoch, m.version, ttl_s, entry.data)
            try:
                reply = await self.call(backup, request)
            except LinkError as exc:
                self.replication_failures_total += 1
                log.info("event=replication_failed peer=%s detail=%s", backup, exc)
                if trio.current_time() > deadline:
                    return p.Error(
                        p.Code.UNAVAILABLE,
                        f"backup {backup} does not answer; this node keeps the change without "
                        "a second copy, so its outcome is unknown (lost if this node fails "
                        "before a later change is copied)",
                    )
                await self._wait_for_verdict(backup)
                if self.membership.gone(backup):
                    if m is None:
                        return None  # a delete: the dead backup's copy is gone anyway
                    if m.backup == backup:
                        self.replicas.backup_failed(sid, self._choose_backup)
                        self._journal_meta(sid)
                continue
            if reply == p.OK:
                return None
            if isinstance(reply, p.Error) and reply.code is p.Code.STALE:
                master, epoch = _stale_master(reply) or ("", 0)
                if epoch > p.MAX_START_COUNTER:
                    # A peer that lies: an epoch the REPLs could not carry
                    # would wedge the session (as _where_tokens).
                    epoch = 0
                if (master == NOBODY and epoch and moved_up < _MAX_MOVES_UP
                        and self.replicas.restart_above(sid, epoch)):
                    # Destroyed there at that epoch, by a node that holds no
                    # copy, and live here: sent again above it (CLUSTER.md
                    # §11.4).  Dropping it lost a session made again since,
                    # whose copy went to a node that kept an old tombstone
                    # (second nemesis review).
                    moved_up += 1
                    self._journal_meta(sid)
                    continue
                log.warning(
                    "event=write_refused_stale session=%s new_master=%s", sid_tag(sid), master
                )
                self.replicas.stale(sid, master, epoch)
                self._drop_local(sid)
                if master == NOBODY:
                    return p.Error(
                        p.Code.UNAVAILABLE,
                        f"this node's copy is older than the session's destroy on {backup}; "
                        "retry",
                    )
                return p.Error(
                    p.Code.UNAVAILABLE,
                    f"this node is no longer the session's master ({master} is); retry",
                )
            return self._copy_refused(sid, backup, reply)

    def _copy_refused(self, sid: str, backup: str, reply: p.Reply) -> p.Error:
        """The backup answered a copy with something other than OK or STALE
        (CLUSTER.md §6, §11.4): the change stays here, not acknowledged, its
        outcome unknown to the client (PROTOCOL.md §9 ``UNAVAILABLE``)."""
        self.replication_failures_total += 1
        words = _reply_words(reply)
        kind = reply.code.name if isinstance(reply, p.Error) else "unexpected"
        count = self._copy_refusals[(backup, kind)] = self._copy_refusals.get((backup, kind), 0) + 1
        if _rare(count):
            detail = ""
            if isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE:
                detail = (
                    f" detail=the backup's max_session_bytes is smaller than this node's "
                    f"({self.server.engine.limits.max_session_bytes}): set the same "
                    "max_session_bytes on every node"
                )
            log.warning(
                "event=replication_refused peer=%s session=%s count=%d reply=%s%s",
                backup, sid_tag(sid), count, words, detail,
            )
        return p.Error(
            p.Code.UNAVAILABLE,
            f'backup {backup} refused the copy: "{words}"; this node keeps the change '
            "without a second copy, so its outcome is unknown (lost if this node fails "
            "before a later change is copied)",
        )

    async def _rehome(self, sid: str, old_backup: str) -> None:
        """Copy to the new backup, then release the draining one's copy."""
        await self._send_copy(sid)
        m = self.replicas.meta.get(sid)
        if m is not None:
            with contextlib.suppress(LinkError):
                await self.call(old_backup, p.ReplDelete(sid, self.me, m.epoch, m.version))

    async def _send_copy(self, sid: str) -> None:
        m = self.replicas.meta.get(sid)
        if m is None:
            return
        error = await self._send_until_acknowledged(sid, deleted=False, version=m.version,
                                                    epoch=m.epoch)
        if error is not None:
            log.warning("event=copy_failed session=%s detail=%s", sid_tag(sid), error.message)

    async def call(self, node: str, request: p.Request) -> p.Reply:
        """A request to a peer over its ordered, pipelined connection."""
        if node not in self.peer_address:
            raise LinkError(f"{node!r} is not a configured peer")
        pipe = self._pipes.get(node)
        if pipe is None:
            pipe = self._pipes[node] = Pipe(self, node)
        return await pipe.call(request)

    async def _call_handoff(self, node: str, handoff: p.Handoff) -> p.Reply:
        """A drain's HANDOFF to ``node`` (CLUSTER.md §8), on the least busy of
        up to HANDOFF_LANES connections of its own, so that the receiver
        serves several at once.  Not while a copy of the session (REPL,
        REPLDEL) is unanswered on the replication pipe: the HANDOFF could
        overtake it, the receiver would refuse that copy as stale and the
        write behind it, applied and handed over, would be reported
        UNAVAILABLE.  Then it goes on that pipe, in order behind the copy."""
        if node not in self.peer_address:
            raise LinkError(f"{node!r} is not a configured peer")
        pipe = self._pipes.get(node)
        if pipe is None or handoff.sid not in pipe.unanswered:
            lanes = self._lanes.setdefault(node, [])
            pipe = min(lanes, key=lambda lane: lane.waiting, default=None)
            if pipe is None or (pipe.waiting and len(lanes) < HANDOFF_LANES):
                pipe = Pipe(self, node)
                lanes.append(pipe)
        return await pipe.call(handoff)

    # -- the peer's side of replication

    def handle_peer(self, peer: str, request: p.Request, now: float) -> p.Reply:
        engine = self.server.engine
        store = engine.store
        if isinstance(request, p.Where):
            held = self.replicas.where(request.sid)
            entry = store.get(request.sid, now)
            if held is None or entry is None:
                buried = self.replicas.deleted(request.sid)
                if buried is not None:
                    # So that a node restarted with a copy of it, journaled
                    # before the destroy, drops it (_verify, §11.4).
                    return p.Data(b"", (DELETED, str(buried[0]), str(buried[1]), "0"))
                return p.MISS
            role, epoch, version = held
            ttl_ms = max(0, int((entry.expires_at - now) * 1000))
            return p.Data(entry.data, (role, str(epoch), str(version), str(ttl_ms)))
        if isinstance(request, (p.ReplPut, p.ReplDelete)):
            if request.master != peer:
                # Copies come from their master only: a peer may not write
                # over another node's sessions, nor over ours.
                return p.Error(
                    p.Code.BAD_REQUEST, f"a copy of {request.master}'s session sent by {peer}"
                )
            deleted = isinstance(request, p.ReplDelete)
            before = self._signature(request.sid)
            applied = self.replicas.apply(
                request.sid, request.master, request.epoch, request.version, deleted
            )
            if applied.verdict is Verdict.STALE:
                return p.Error(p.Code.STALE, f"{applied.master} {applied.epoch}")
            if applied.verdict is Verdict.ACCEPT:
                if isinstance(request, p.ReplPut):
                    store.put(request.sid, request.data, request.ttl_s, now)
                    self._journal(Op.PUT, request.sid, request.ttl_s, request.data)
                    self._journal_meta(request.sid, before)
                else:
                    self._drop_local(request.sid)
            return p.OK
        if isinstance(request, p.Handoff):
            # Only from the session's master, to its backup, moving on by one
            # epoch, with nothing newer here (CLUSTER.md §8).
            copy = self.replicas.meta.get(request.sid)
            if copy is not None and not (
                copy.role == BACKUP and copy.master == peer
                and copy.epoch == request.epoch - 1 and copy.version <= request.version
            ):
                return p.Error(p.Code.STALE, f"{copy.master} {copy.epoch}")
            store.put(request.sid, request.data, request.ttl_s, now)
            self._journal(Op.PUT, request.sid, request.ttl_s, request.data)
            self.replicas.handoff(request.sid, request.epoch, request.version)
            m = self.replicas.meta[request.sid]
            m.backup = self.membership.choose_backup(exclude={peer})
            self._journal_meta(request.sid)
            return p.OK
        raise AssertionError(request)

    def expired(self, sids: list[str]) -> None:
        for sid in sids:
            self.replicas.meta.pop(sid, None)
            self.replicas.unverified.discard(sid)

    async def after_handoff(self, sid: str) -> None:
        await self._send_copy(sid)

    # -- drain (CLUSTER.md §8)

    async def drain(self) -> None:
        """Hand every session we master over and wait until the masters of
        those we back up have moved them (CLUSTER.md §8), within the drain
        deadline.  The node's own clients are served meanwhile: a locking
        ``READ`` of a session already handed over goes to its new master,
        one of a session not yet handed over takes the lock here, and the
        session goes once it is free (:meth:`resolve_lock`)."""
        self.draining = True
        self.membership.set_load(len(self.server.engine.store), 0, True)
        await self._send_heartbeat()
        self._drain_started = trio.current_time()
        self._drain_deadline = self._drain_started + self.config.drain_timeout_s
        try:
            with trio.move_on_at(self._drain_deadline):
                # Let peers see that we are draining before we hand sessions over.
                await trio.sleep(self.config.heartbeat_s)
                await self._hand_over_all()
        finally:
            self._pending.clear()  # nothing waits for a hand-over that has ended

    async def finish_drain(self, grace_s: float) -> None:
        """Once the node's own clients have ended (their last locks released
        here or through peers, within ``grace_s``: shutdown_timeout_s): hand
        over what their requests kept here, up to ``grace_s`` past the drain
        deadline; say how the drain ended; if nothing is mastered or backed
        up here any more, announce that we leave (CLUSTER.md §8)."""
        deadline = self._drain_deadline + grace_s
        if not self._drain_alone and trio.current_time() < deadline:
            try:
                with trio.move_on_at(deadline):
                    await self._hand_over_all()
            finally:
                self._pending.clear()
        if self._drain_alone or not self.replicas.meta:
            log.info("event=drained handed_over=%d seconds=%.2f", self._handed,
                     trio.current_time() - self._drain_started)
        else:  # the deadline passed first
            masters = {sid: m for sid, m in self.replicas.meta.items() if m.role == MASTER}
            if masters:
                backed = sum(
                    1 for m in masters.values()
                    if m.backup is not None and not self.membership.gone(m.backup)
                )
                locks = self.server.engine.locks
                locked = sum(1 for sid in masters if locks.holder(sid) is not None)
                log.error(
                    "event=drain_incomplete masters=%d handed_over=%d with_live_backup=%d "
                    "locked=%d unanswered=%d detail=the drain deadline (--drain-timeout-s) "
                    "passed with sessions still mastered here (locked: a request still held "
                    "the lock; unanswered: a HANDOFF of it was sent, its answer had not come, "
                    "the peer may master it already); their backups take over the %d with a "
                    "live backup once peers declare this node dead (CLUSTER.md §7); the other "
                    "%d have no other copy %s",
                    len(masters), self._handed, backed, locked,
                    len(self._unanswered & masters.keys()), backed, len(masters) - backed,
                    "and stay in this node's data directory"
                    if self.server.persister is not None else "and are lost (--memory-only)",
                )
            log.warning("event=drain_timeout")
        if not self.replicas.meta:
            # Nothing mastered or backed up here: no peer needs us any more.
            await self._announce_leave()

    async def _hand_over_all(self) -> None:
        """Hand over what we master, round after round, until nothing is
        mastered or backed up here (§8 step 4), or nobody stays to take it.
        The masters of the copies we back up re-home them once they see us
        draining (_rehome_from_drainers); but one that dies meanwhile makes
        us master of them (a takeover during the drain): those are handed
        over in turn, never left behind when we exit."""
        refused: dict[str, set[str]] = {}

        async def hand_over(sid: str) -> None:
            await self._hand_over_counted(sid, refused.setdefault(sid, set()))

        while True:
            masters = [s for s, m in self.replicas.meta.items() if m.role == MASTER]
            backups = any(m.role == BACKUP for m in self.replicas.meta.values())
            live = self.membership.alive_peers()
            staying = [n for n in live if not self.membership.load(n)[2]]
            if masters or (backups and not staying):
                if not staying:
                    # Nobody to hand them to (every peer is dead, or is
                    # draining too: the whole cluster stops): waiting
                    # until the deadline cannot help.
                    log.warning(
                        "event=drain_alone masters=%d draining_peers=%d detail=no live "
                        "peer that stays to hand sessions to%s; they stay in this "
                        "node's data directory, if it has one",
                        len(masters), len(live),
                        " (every live peer is draining too)" if live else "",
                    )
                    self._drain_alone = True
                    return
                # Each one as before, up to HANDOFFS_IN_FLIGHT at once.
                await _for_each(masters, hand_over, HANDOFFS_IN_FLIGHT)
                if any(m.role == MASTER for m in self.replicas.meta.values()):
                    await trio.sleep(0.1)  # a target failed, or a lock: retry
                continue
            if not backups:
                return
            await trio.sleep(0.05)

    async def _hand_over_counted(self, sid: str, refused: set[str]) -> bool:
        """:meth:`_hand_over`, counted; a session whose ``HANDOFF`` was sent
        and not answered is remembered as such until it is (the deadline may
        cut it short: the peer may have taken the session)."""
        self._unanswered.add(sid)
        moved = await self._hand_over(sid, refused)
        self._unanswered.discard(sid)  # not when cancelled: unanswered then
        if moved:
            self._handed += 1  # counted as each one goes (the deadline may cut a round)
        return moved

    async def _announce_leave(self) -> None:
        """Our drain completed: nothing is mastered or backed up here.  Tell
        the peers that this incarnation leaves, so that they record it
        ``left`` rather than find it dead (CLUSTER.md §3, §8).  Every
        heartbeat from now on says so; a few go out at once, a datagram
        being lost now and then.  A peer that hears none of them finds us
        dead once we are gone, as before."""
        engine = self.server.engine
        self.membership.set_load(len(engine.store), engine.connections, True)
        self.membership.leave()
        log.info("event=leaving sessions=%d detail=drain complete, announcing it to the peers",
                 len(engine.store))
        for attempt in range(LEAVE_ANNOUNCEMENTS):
            if attempt:
                await trio.sleep(min(LEAVE_ANNOUNCEMENT_GAP_S, self.config.heartbeat_s / 4))
            await self._send_heartbeat()

    async def _hand_over(self, sid: str, refused: set[str]) -> bool:
        """One attempt to hand ``sid`` to another node (CLUSTER.md §8): to its
        backup, or, if that is dead or refused it, to another live peer
        (placement rule, §2).  True once it is no longer mastered here."""
        m = self.replicas.meta.get(sid)
        if m is None or m.role != MASTER:
            return False
        engine = self.server.engine
        preempt = False
        if engine.locks.holder(sid) is not None:
            if not engine.locks.preemptible(sid, trio.current_time()):
                # A request holding its lock (here or through a peer's
                # forwarded connection, §5.3) finishes first: the next round
                # hands it over, and meanwhile no new lock is taken on it
                # (resolve_lock).
                self._pending.add(sid)
                return False
            # Held past its lease: nobody asked for it when the lease ran
            # out (PROTOCOL.md §6.3), but the drain asks now, as a waiting
            # request would (the requests that want it wait in resolve_lock,
            # not in its queue): revoked below, once there is somewhere to
            # hand it (no await in between).
            preempt = True
        await trio.lowlevel.checkpoint_if_cancelled()  # not past the deadline
        entry = self.server.engine.store.get(sid, trio.current_time())
        if entry is None:
            self.expired([sid])  # expired meanwhile: nothing left to hand over
            return False
        target = m.backup
        if target is None or target in refused or self.membership.gone(target):
            target = self.membership.choose_backup(exclude=refused)
            if target is None:
                refused.clear()  # nobody left to try now: all again next round
                return False
        epoch, old_backup = m.epoch, m.backup
        ttl_s = max(1, math.ceil(entry.expires_at - trio.current_time()))
        handoff = p.Handoff(sid, epoch + 1, m.version, ttl_s, entry.data)
        if preempt:
            # The holder's next change gets LOCK_LOST.
            engine.revoke_session(
                sid, trio.current_time(),
                p.Error(p.Code.UNAVAILABLE, "the session moved to another node while this "
                        "request waited for its lock; retry"),
                p.Error(p.Code.NOT_MASTER, "-"),
            )
            self.server._after_engine()
            self._pending.discard(sid)
        self._handing_over.add(sid)  # no lock is taken on it until the answer (resolve_lock)
        try:
            reply: p.Reply | LinkError = await self._call_handoff(target, handoff)
        except LinkError as exc:
            reply = exc
        finally:
            self._handing_over.discard(sid)
        if isinstance(reply, LinkError):
            log.warning("event=handoff_failed peer=%s detail=%s", target, reply)
            # Dead (then _peer_dead gives the session a new backup) or alive
            # after all: either way the next round tries again.
            await self._wait_for_verdict(target)
            return False
        if reply == p.OK:
            self._pending.discard(sid)
            self.replicas.stale(sid, target)
            self._drop_local(sid)  # a restart must not take it back
            if old_backup not in (None, target) and self.membership.is_alive(old_backup):
                # The old backup must not take over from a copy now stale.
                with contextlib.suppress(LinkError):
                    await self.call(old_backup, p.ReplDelete(sid, self.me, epoch, m.version))
            return True
        newer = _stale_master(reply)
        if newer is not None and newer[0] != self.me and newer[1] > epoch:
            # Mastered elsewhere at a newer epoch already (an earlier HANDOFF
            # went through but its answer was lost): ours is stale.
            self.replicas.stale(sid, newer[0])
            self._drop_local(sid)
            return True
        log.warning("event=handoff_refused peer=%s session=%s detail=%s",
                    target, sid_tag(sid), reply)
        refused.add(target)
        return False


async def _for_each(items: list[str], fn: Callable[[str], Awaitable[None]], limit: int) -> None:
    """``fn`` on every item, at most ``limit`` at once, each item once."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:  # shared: each worker takes the next one left
            await fn(item)

    async with trio.open_nursery() as nursery:
        for _ in range(min(limit, len(items))):
            nursery.start_soon(worker)


def _reply_words(reply: p.Reply) -> str:
    """A peer's reply as its line on the wire (without a DATA's data)."""
    if isinstance(reply, p.Error):
        return f"{reply.code.name} {reply.message}".rstrip()
    if isinstance(reply, p.Data):
        return p.data_header(reply).decode("ascii", "replace").rstrip()
    return p.encode_reply(reply).decode("ascii", "replace").rstrip()


def _stale_master(reply: p.Reply) -> tuple[str, int] | None:
    """``<master> <epoch>`` of a STALE refusal, or None."""
    if not (isinstance(reply, p.Error) and reply.code is p.Code.STALE):
        return None
    master, _, epoch = reply.message.partition(" ")
    if not (master and epoch.isdigit() and len(epoch) < 20):
        return None
    return master, int(epoch)

def _where_tokens(tokens: tuple[str, ...]) -> tuple[str, int, int, int] | None:
    """``<role> <epoch> <version> <ttl_ms>`` of a WHERE reply, or None if a
    peer sent something else."""
    if len(tokens) != 4 or tokens[0] not in (MASTER, BACKUP, DELETED):
        return None
    if not all(t.isascii() and t.isdigit() and len(t) < 20 for t in tokens[1:]):
        return None
    epoch, version, ttl_ms = int(tokens[1]), int(tokens[2]), int(tokens[3])
    # A node may take these as its own (a master copy's version, §7): with
    # room left for the REPLs that carry them on (protocol.MAX_START_COUNTER),
    # so that a peer that lies cannot wedge the session (every write
    # UNAVAILABLE), nor give a lifetime the journal cannot hold (the daemon
    # stopped).
    top = p.MAX_START_COUNTER
    if epoch > top or version > top or ttl_ms > p.MAX_TTL_S * 1000:
        return None
    return tokens[0], epoch, version, ttl_ms


def _peer(stream: trio.SocketStream) -> str:
    try:
        host = str(stream.socket.getpeername()[0])
    except OSError:
        return "?"
    return _plain_ip(host)


def _plain_ip(host: str) -> str:
    """An IPv4 address as such, also when an IPv6 socket reports it mapped."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _sent_elsewhere(source: tuple[str, int], configured: TcpAddress) -> bool:
    """Whether a heartbeat came from another address than the peer list
    gives its sender (which sends from its bound cluster address).  Only
    for an address given as an IP: a host name is not resolved here."""
    try:
        host = ipaddress.ip_address(configured.host)
    except ValueError:
        return False
    if host.is_unspecified:
        return False
    return (source[0], source[1]) != (str(host), configured.port)


def _rare(count: int) -> bool:
    """Whether the ``count``-th of a kind of warning a host without the
    secret can cause is logged: the 1st, 10th, 100th, then every 1000th."""
    return count in (1, 10, 100) or count % 1000 == 0


def parse_peer(text: str) -> tuple[str, TcpAddress]:
    from phpsess.addresses import AddressError, parse_tcp_address

    name, sep, address = text.partition("=")
    if not sep:
        raise ValueError(f"--peer {text!r}: expected NAME=HOST:PORT")
    try:
        parsed = parse_tcp_address(address)
    except AddressError as exc:
        raise ValueError(f"--peer {text!r}: {exc}") from None
    if _is_ipv6(parsed.host):
        raise ValueError(f"--peer {text!r}: cluster addresses are IPv4 in this version "
                         "(CLUSTER.md §10)")
    return check_node_name(name), parsed


def check_listen(address: TcpAddress) -> TcpAddress:
    """``address`` if this version can listen for peers there: ValueError
    for an IPv6 one (the heartbeat socket is IPv4)."""
    if _is_ipv6(address.host):
        raise ValueError("cluster addresses are IPv4 in this version (CLUSTER.md §10); "
                         "use the server's IPv4 address")
    return address


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False  # a name: resolved to IPv4

