"""The daemon's I/O shell: listeners, connections, the deadline timer and
graceful shutdown, around the pure :class:`phpsess.engine.Engine`.

Each connection runs one task: receive bytes, feed the parser, hand every
complete request to the engine, and send all replies of that batch with one
write (pipelined requests cost one write).  Connections use the cheapest
Trio I/O path (:mod:`phpsess.netio`): one scheduler pass per request.  A request that must wait
for a lock parks the task on an event until the engine completes it; meanwhile
the task keeps watching the socket so that a client that goes away leaves the
lock queue at once.

Memory held for clients that do not read (PROTOCOL.md §10): a send that has
to wait for its client pins its replies, and the requests read ahead behind
them wait with it.  Those bytes, all connections together, are kept near
``max_outgoing_bytes`` (:meth:`Server.hold_outgoing`): past it, the
connections whose clients have read nothing for longest (at least
``_UNREAD_GRACE_S``) are closed, and every connection is served in smaller
steps until the total is back under it.  A client that reads its replies
is never closed for it: its sends make progress.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import socket as stdsocket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
import trio

from phpsess import journal as j
from phpsess import netio, peeruid, systemd
from phpsess import protocol as p
from phpsess.addresses import Address, TcpAddress, UnixAddress
from phpsess.cluster import _GUARDED, Cluster, ClusterConfig, Forwards, _rare
from phpsess.engine import VERB_NAMES, WAIT, Completion, Engine, Limits, _Wait
from phpsess.logs import Throttle, clipped, quoted, sid_tag
from phpsess.metrics import Metrics
from phpsess.persist import (
    DataDirError,
    JournalFailed,
    PersistConfig,
    Persister,
    SnapshotSource,
    store_snapshot_source,
)
from phpsess.sqlstore import SqlConfig

if TYPE_CHECKING:
    from phpsess.sqlserver import SqlBackend

log = logging.getLogger("phpsess")

# While a request waits for a lock, buffer at most this much of what follows.
_MAX_BUFFER_WHILE_WAITING: Final = 64 * 1024
# A request buffered up to this size is never refused for max_incoming_bytes:
# the usual PHP write goes through whatever the others hold.
_INCOMING_UNCHECKED_BYTES: Final = 64 * 1024
# Past max_outgoing_bytes, replies go out once this much is ready (not
# MAX_REPLY_BYTES_PER_WRITE) and a receive takes at most this much: a
# client that stops reading then holds about one reply and this much
# (about 1 MiB otherwise).  PHP's requests and replies are mostly smaller;
# a big WRITE takes more receives.
_PRESSED_BYTES: Final = 16 * 1024
# A connection whose send has waited this long without its client taking
# any of it may be closed for max_outgoing_bytes; one reading its replies
# takes some every few milliseconds.  What clients that do not read can add
# over the limit is what the daemon can serve them in this time.
_UNREAD_GRACE_S: Final = 0.5
# Requests of one batch handled before its replies so far go out and the
# other connections get a turn: a client pipelining a 256 KiB receive of
# PINGs (50,000 requests) would otherwise hold the event loop for 100 ms.
# PHP sends 1 to 3 requests at a time; the admin commands, a few.
_REQUESTS_PER_TURN: Final = 256
# The requests refused while the journal cannot be written (README,
# Durability): what changes sessions, and CREATE, whose session could not
# be written either.  Reads (and the expiries) go on.
_CHANGES: Final = frozenset({p.Write, p.Touch, p.Destroy, p.Create})
# The most of the sentence a fatal error sent its client (``reason=``) and
# of the client's HELLO label (``client=``) that a log line quotes.
_REASON_CHARS: Final = 100
# The fatal errors that are a client's malformed request (protocol_errors_total).
_MALFORMED: Final = frozenset({p.Code.BAD_FRAME, p.Code.HEADER_TOO_LONG})
_LABEL_CHARS: Final = 64


@attrs.frozen
class ServerConfig:
    listen: tuple[Address, ...]
    limits: Limits = attrs.field(factory=Limits)
    socket_mode: int = 0o660
    max_connections: int = 4096
    # Bytes of client requests still arriving, all connections together.
    max_incoming_bytes: int = 256 * 1024 * 1024
    # Bytes held by replies waiting for their clients to read (and the
    # requests read ahead behind them), all connections together.
    max_outgoing_bytes: int = 256 * 1024 * 1024
    idle_timeout_s: float = 300.0
    # A client connection that has not said HELLO this long after it was
    # accepted is closed (PROTOCOL.md §10), so that connections that send
    # nothing cannot hold max_connections for idle_timeout_s.  Not a
    # setting: every client sends its HELLO as soon as it connects.
    handshake_timeout_s: float = 10.0
    shutdown_timeout_s: float = 10.0
    persist: PersistConfig | None = None
    cluster: ClusterConfig | None = None
    metrics_listen: TcpAddress | None = None
    storage: SqlConfig | None = None  # --storage mysql://...: the SQL backend


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class _Conn:
    __slots__ = (
        "admin", "busy", "event", "forwards", "hello", "idle_since", "incoming", "label", "meter",
        "node", "opened", "outgoing", "owner", "parser", "partial_since", "peer", "peer_ids",
        "read_at", "reply", "scope", "sending_since", "stream", "uid",
    )

    def __init__(
        self, owner: int, stream: trio.abc.Stream, peer: str, opened: float = 0.0
    ) -> None:
        self.owner = owner
        self.stream = stream
        # When it was accepted: it has handshake_timeout_s to say HELLO (§10).
        self.opened = opened
        self.scope: trio.CancelScope | None = None
        self.event: trio.Event | None = None
        self.reply: p.Reply | None = None
        self.busy = False  # a request is being processed or waited on
        self.peer = peer
        self.node: str | None = None  # the peer node, on a cluster connection
        self.forwards: Forwards | None = None  # links to masters (CLUSTER.md §5)
        self.hello: p.Hello | None = None  # the client's accepted HELLO
        # While the connection waits for its next request: since when (see
        # Server._idle_sweeper, which spares a lock holder not mid-request).
        self.idle_since: float | None = None
        # While a write of replies waits for the client to read: since when
        # it first had to wait (progress does not move it: netio.Stalls),
        # when the client last took some of it, and the bytes it holds
        # (counted in Server.outgoing_bytes for a client connection, whose
        # ``meter`` the server is; a peer's are not counted).
        self.sending_since: float | None = None
        self.read_at = 0.0
        self.outgoing = 0
        self.meter: Server | None = None
        # The request parser (engine connections): a request half received
        # is in progress (PROTOCOL.md §10).
        self.parser: p.RequestParser | None = None
        # Since when the request now half received has been arriving: a
        # client sending a byte now and then is cut off like a silent one.
        self.partial_since: float | None = None
        # Bytes of a request half received, counted in Server.incoming_bytes.
        self.incoming = 0
        # Whether the client may use DRAIN and LIST; None until it asks.
        self.admin: bool | None = None
        self.uid: int | None = None  # the client's, once ``admin`` is known
        # For the log lines about the connection (who): the ``client=``
        # label of its accepted HELLO (PROTOCOL.md §3.2), and a unix
        # client's " uid=U pid=P", read at the first such line (None
        # until then; "" when there are none to read).
        self.label = ""
        self.peer_ids: str | None = None

    def who(self) -> str:
        """The fields saying who is at the other end, for a log line:
        ``peer=``, for a unix client ``uid=`` and ``pid=`` (SO_PEERCRED,
        read once, when a line first needs them: never on the request
        path), and ``client=`` when its HELLO gave a label."""
        if self.peer_ids is None:
            self.peer_ids = _peer_ids(self.stream)
        fields = f"peer={self.peer}{self.peer_ids}"
        if self.label:
            fields += f" client={quoted(clipped(self.label, _LABEL_CHARS))}"
        return fields

    # netio.Stalls: told only about a send that has to wait.

    def send_waits(self, now: float, held_bytes: int) -> None:
        self.sending_since = self.read_at = now
        if self.meter is not None:
            self.meter.hold_outgoing(self, held_bytes, now)

    def send_progress(self, now: float) -> None:
        self.read_at = now

    def send_done(self) -> None:
        self.sending_since = None
        if self.meter is not None:
            self.meter.release_outgoing(self)

    @property
    def mid_request(self) -> bool:
        """A request is half received: it is in progress (§10)."""
        return self.parser is not None and self.parser.mid_request

    def waiting_since(self, now: float) -> float:
        """For Server._idle_sweeper, as the connection waits for more bytes:
        now, or since the half-received request began arriving (§10; the
        loops reset it whenever a whole request has come)."""
        if self.parser is not None and self.parser.mid_request:
            if self.partial_since is None:
                self.partial_since = now
            return self.partial_since
        self.partial_since = None
        return now


class Server:
    """``await nursery.start(server.serve)`` runs the daemon until cancelled
    or until :meth:`shutdown` has let in-flight requests finish."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = Engine(config.limits, secrets.token_bytes, trio.current_time())
        self.engine.pid = os.getpid()
        self._conns: dict[int, _Conn] = {}
        self._next_owner = 0
        self._wake = trio.Event()
        self._timer_at = math.inf
        self._stopping = trio.Event()
        self._ending_clients = False  # see _end_clients
        self._no_conns = trio.Event()
        self._unix_paths: list[str] = []
        self._inherited = False  # listening on sockets systemd passed us
        self.admin_denied_total = 0
        self.incoming_bytes = 0  # of client requests half received (count_incoming)
        self.incoming_refusals_total = 0
        # Held by sends waiting for their clients (hold_outgoing), and the
        # connections closed to keep it under max_outgoing_bytes.
        self.outgoing_bytes = 0
        self.outgoing_closes_total = 0
        self._stalled: dict[int, _Conn] = {}  # the connections it counts
        self._shed_at = -math.inf  # when shed_outgoing last looked at them
        self.fd_refusals_total = 0
        self.busy_refusals_total = 0  # clients answered BUSY for max_connections
        # Lines any client can cause at will: a few a second of each kind.
        self.notice_throttle = Throttle()
        self._refusal_throttle = Throttle()
        self._send_timeout_throttle = Throttle()
        self._handshake_throttle = Throttle()
        self._outgoing_throttle = Throttle()
        self._idle_throttle = Throttle()
        self._protocol_error_throttle = Throttle()
        # One line per copy a restarted cluster node finds stale: a node that
        # mastered a million sessions would log a million (cluster.py).
        self.stale_copy_throttle = Throttle()
        # Counted whether logged or not (STATS, metrics).
        self.protocol_errors_total = 0
        self.timeout_closes: dict[str, int] = {"handshake": 0, "idle": 0, "send": 0}
        # How the count of the lines each leaves out is logged once the
        # second they were left out in is over (_log_left_out): the level
        # and the start of the line, ``event=<kind>_not_logged``.
        self._throttles: tuple[tuple[Throttle, int, str], ...] = (
            (self.notice_throttle, logging.WARNING, "event=lock_revoked_not_logged"),
            (self._refusal_throttle, logging.WARNING,
             "event=connection_refused_not_logged reason=max_connections"),
            (self._send_timeout_throttle, logging.INFO, "event=send_timeout_not_logged"),
            (self._handshake_throttle, logging.INFO, "event=handshake_timeout_not_logged"),
            (self._outgoing_throttle, logging.WARNING,
             "event=connection_closed_not_logged reason=max_outgoing_bytes"),
            (self._idle_throttle, logging.INFO, "event=idle_timeout_not_logged"),
            (self._protocol_error_throttle, logging.INFO, "event=protocol_error_not_logged"),
            (self.stale_copy_throttle, logging.INFO, "event=stale_copy_dropped_not_logged"),
        )
        self._uid_lookups = trio.CapacityLimiter(1)  # may_administer_tcp
        self.accept_failures_total = 0
        # Closed to make room for answering BUSY when out of descriptors.
        self._spare_fd = -1
        self.addresses: list[str] = []
        self.persister: Persister | None = None
        if config.persist is not None:
            # A single node stays up while its journal cannot be written
            # (changes refused); a cluster's node stops: its backups hold
            # every write it acknowledged, and take over.
            self.persister = Persister(
                config.persist, retry_failed_appends=config.cluster is None
            )
            self.engine.changes = []
        self.cluster: Cluster | None = None
        if config.cluster is not None:
            self.cluster = Cluster(config.cluster, self)
        self.engine.extra_stats = self._extra_stats
        self.metrics: Metrics | None = None
        if config.metrics_listen is not None:
            self.metrics = Metrics(self)
        # --storage: the SQL backend serves client connections (phpsess.sqlserver).
        self.sql: SqlBackend | None = None
        if config.storage is not None:
            from phpsess.sqlserver import SqlBackend

            self.sql = SqlBackend(config.storage, self)

    # -- lifecycle

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.persister is not None:
            await self._restore(self.persister)
        elif self.sql is None:
            log.info(
                "event=memory_only detail=no data directory (--memory-only): %s",
                "after a restart, the sessions this daemon holds live on only as their "
                "copies on its peers" if self.cluster is not None
                else "a restart of the daemon loses every session it holds",
            )
        try:
            await self._serve(task_status)
        finally:
            if self.persister is not None:
                await self.persister.close()

    async def _restore(self, persister: Persister) -> None:
        # Remaining lifetimes carry over: the clocks differ, the durations don't.
        systemd.notify(f"STATUS=restoring sessions from {persister.dir}")
        try:
            restored = await trio.to_thread.run_sync(
                persister.open, time.time(), trio.current_time()
            )
        except DataDirError as exc:
            raise StartupError(str(exc)) from exc
        for note in restored.torn:
            log.warning("event=journal_torn_tail detail=%s", note)
        count = len(restored.sessions)
        sids = list(restored.sessions) if self.cluster is not None else []
        if self.cluster is not None and (
            elsewhere := self.cluster.unrecorded_elsewhere(sids, restored.meta)
        ):
            raise StartupError(
                f"{persister.dir} holds {elsewhere} session{'s' if elsewhere != 1 else ''} "
                f"(of {count}) that a daemon outside "
                "a cluster wrote (no cluster record) and whose IDs name another node master, "
                "which never had them: as backup copies here they would be dropped and lost. "
                "Bring them into the cluster through export and import: start this daemon "
                "once without [cluster], run `phpsess export -o sessions.jsonl`, stop it, move "
                f"{persister.dir} aside, start the cluster node and run `phpsess import "
                "sessions.jsonl` (docs/DEPLOYMENT.md, §4)"
            )
        self.engine.store.load(restored.sessions)
        if self.cluster is not None:
            self.cluster.adopt_restored(sids, restored.meta)
        # sessions=: read from the data directory; kept=: those this node
        # serves, in a cluster once the backup copies are dropped (their
        # masters copy them anew: event=cluster_restored says how many).
        log.info(
            "event=restored sessions=%d kept=%d expired_while_down=%d files=%d seconds=%.3f "
            "data_dir=%s generation=%d",
            count, len(self.engine.store), restored.expired, restored.files,
            restored.seconds, persister.dir, persister.gen,
        )

    def _snapshot_source(self) -> SnapshotSource:
        return store_snapshot_source(
            self.engine.store.snapshot(), trio.current_time(), time.time()
        )

    def _submit_changes(self) -> int:
        """Hand the engine's changes to the journal; their sequence number."""
        persister = self.persister
        assert persister is not None
        changes = self.engine.changes
        if changes:
            self.engine.changes = []
            return persister.submit(changes, time.time())
        return persister.submitted

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners: list[trio.SocketListener] = []
        self._take_spare()
        try:
            async with trio.open_nursery() as conn_nursery:
                conn_nursery.start_soon(self._timer)
                conn_nursery.start_soon(self._idle_sweeper)
                # Pings only while this event loop runs; ends with the nursery.
                conn_nursery.start_soon(systemd.run_watchdog)
                if self.persister is not None:
                    store = self.engine.store
                    overhead = (
                        j.SNAPSHOT_OVERHEAD_PER_SESSION if self.cluster is None
                        else j.CLUSTER_SNAPSHOT_OVERHEAD_PER_SESSION
                    )
                    await conn_nursery.start(
                        self.persister.run,
                        self._snapshot_source,
                        lambda: store.total_bytes + overhead * len(store),
                    )
                if self.metrics is not None:
                    assert self.config.metrics_listen is not None
                    await conn_nursery.start(self.metrics.serve, self.config.metrics_listen)
                if self.sql is not None:
                    await conn_nursery.start(self.sql.serve)
                if self.cluster is not None:
                    await conn_nursery.start(self.cluster.run)
                    # Serve PHP only once we know who is alive (CLUSTER.md §7).
                    await self.cluster.ready.wait()
                listeners = await self._open_listeners()
                async with trio.open_nursery() as accept_nursery:
                    for listener in listeners:
                        accept_nursery.start_soon(self._accept_loop, listener, conn_nursery)
                    task_status.started()
                    log.info("event=listening addresses=%s", ",".join(self.addresses))
                    systemd.notify(f"READY=1\nSTATUS=serving on {', '.join(self.addresses)}")
                    await self._stopping.wait()
                    if self.cluster is not None:
                        # The node's own clients, old and new, are served on
                        # while it hands its sessions over: their requests
                        # go to the new masters (CLUSTER.md §8).
                        await self.cluster.drain()
                    accept_nursery.cancel_scope.cancel()
                # Our own sockets close now, so that clients are refused at
                # once instead of queueing unanswered until we exit; systemd's
                # (socket activation) stay open and queue them for the next
                # daemon.
                if not self._inherited:
                    for listener in listeners:
                        with trio.CancelScope(shield=True):
                            await listener.aclose()
                    self._unlink_sockets()
                self._end_clients()
                await self._drain()
                if self.cluster is not None:
                    await self.cluster.finish_drain(self.config.shutdown_timeout_s)
                conn_nursery.cancel_scope.cancel()
        finally:
            self._log_left_out(math.inf)  # what the last second left out
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            self._unlink_sockets()
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
                self._spare_fd = -1

    def _unlink_sockets(self) -> None:
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths = []

    # Settings a SIGHUP may change while serving; everything else needs a restart.
    _RELOADABLE: Final = (
        "limits", "max_connections", "max_incoming_bytes", "max_outgoing_bytes",
        "idle_timeout_s", "shutdown_timeout_s",
    )

    def reload(self, fresh: ServerConfig, log_level: str) -> None:
        """Apply a re-read configuration: log level, limits, lock defaults,
        connection limits, the peer list; say what else changed and needs a
        restart.  The limits apply to open connections too (php-fpm keeps
        its own open)."""
        logger = logging.getLogger("phpsess")
        level_before = logger.level
        logger.setLevel(log_level.upper())
        old = self.config
        self.config = attrs.evolve(
            old, **{name: getattr(fresh, name) for name in self._RELOADABLE}
        )
        limits = self.engine.limits = fresh.limits
        for conn in self._conns.values():
            if conn.parser is not None:
                conn.parser.max_session_bytes = limits.max_session_bytes
            # Its lock wait and lease: the defaults, unless its HELLO asked
            # for others.  (With SQL storage, from its next HELLO: the PHP
            # handler sends one per request.)
            self.engine.refresh_limits(conn.owner, conn.hello)
        applied = [n for n in self._RELOADABLE if getattr(old, n) != getattr(fresh, n)]
        # The peer list may change while running, whatever else of [cluster]
        # changed too (that is named below as needing a restart); the node
        # itself may not, and a peer list for another node is not applied.
        if (
            self.cluster is not None and old.cluster is not None and fresh.cluster is not None
            and old.cluster.peers != fresh.cluster.peers and old.cluster.node == fresh.cluster.node
        ):
            self.cluster.reload_peers(fresh.cluster.peers)
            self.config = attrs.evolve(
                self.config, cluster=attrs.evolve(old.cluster, peers=fresh.cluster.peers)
            )
            applied.append("cluster.peers")
        if logger.level != level_before:
            applied.append("log_level")
        ignored = _restart_keys(self.config, fresh, self._RELOADABLE)
        log.info(
            "event=reloaded log_level=%s applied=%s", log_level, ",".join(applied) or "-"
        )
        if ignored:
            log.warning(
                "event=reload_needs_restart changed=%s detail=%s", ",".join(ignored),
                quoted("these settings apply only after a restart (systemctl restart phpsess: "
                       "in a cluster it drains first by itself)"),
            )

    def shutdown(self) -> None:
        """Stop accepting and finish in-flight work (PROTOCOL.md §10)."""
        if self._stopping.is_set():
            return
        log.info(
            "event=stopping connections=%d locks_held=%d",
            len(self._conns),
            self.engine.locks.held_count,
        )
        self._stopping.set()
        if self.cluster is None:
            self._end_clients()
        systemd.notify(
            "STOPPING=1\nSTATUS=stopping: "
            + (f"finishing {len(self._conns)} connections" if self.cluster is None
               else "handing sessions over to the peers")
        )

    def _end_clients(self) -> None:
        """From now on client connections end once they hold no lock (here
        or through a peer) and have nothing in progress, and new ones are
        refused (PROTOCOL.md §10).  At the stop, or in a cluster once the
        drain has handed the sessions over (CLUSTER.md §8)."""
        if self.cluster is not None and not self._ending_clients:
            log.info(
                "event=ending_clients connections=%d locks_held=%d detail=the hand-over ended; "
                "client connections end as they go idle, new ones are refused",
                sum(1 for conn in self._conns.values() if conn.node is None),
                self.engine.locks.held_count,
            )
        self.engine.shutting_down = True
        self._ending_clients = True

    def _holds_locks(self, conn: _Conn) -> bool:
        """Whether ``conn`` holds a lock: here, or on another node through
        the connection this node opened for it there (CLUSTER.md §5.3)."""
        return self.engine.holds_locks(conn.owner) or (
            conn.forwards is not None and conn.forwards.holds_any()
        )

    async def _drain(self) -> None:
        """Client connections end once idle; those holding locks (here or
        through a peer) or in mid-request are waited for, up to
        ``shutdown_timeout_s``.  Peer connections stay: the cluster's drain
        needs them (the masters releasing the copies we back up), and a
        peer's forwarded requests go on until it ends (CLUSTER.md §8).
        Cutting an idle one raced the next request its peer sent on it: the
        lock that request took was lost with the connection (LOCK_LOST)."""
        with trio.move_on_after(self.config.shutdown_timeout_s) as scope:
            while True:
                clients = [conn for conn in self._conns.values() if conn.node is None]
                for conn in clients:
                    idle = not conn.busy and not conn.mid_request and not self._holds_locks(conn)
                    if idle and conn.scope is not None:
                        conn.scope.cancel()
                if not clients:
                    break
                self._no_conns = trio.Event()
                with trio.move_on_after(0.05):
                    await self._no_conns.wait()
        if scope.cancelled_caught:
            # In a cluster they run on through the rest of its drain
            # (finish_drain, CLUSTER.md §8), which closes them when it ends.
            fate = (
                "are closed once the cluster drain ends"
                if self.cluster is not None
                else "were closed"
            )
            log.warning(
                "event=shutdown_timeout connections=%d detail=%s",
                sum(1 for conn in self._conns.values() if conn.node is None),
                f"connections still holding locks or in mid-request {fate}",
            )

    # -- listeners

    async def _open_listeners(self) -> list[trio.SocketListener]:
        try:
            inherited = systemd.inherited_listeners()
        except systemd.SystemdError as exc:
            raise StartupError(f"socket activation: {exc}") from exc
        self._inherited = bool(inherited)
        if inherited:
            # The socket unit's ListenStream= lines replace --listen; those
            # socket files are systemd's, so they are never unlinked here.
            self.addresses.extend(address for address, _ in inherited)
            served = {str(address) for address, _ in inherited}
            ignored = [str(a) for a in self.config.listen if str(a) not in served]
            if ignored:
                # A TCP address in the config file would silently not be
                # served: say so (DEPLOYMENT.md §2).
                log.warning(
                    "event=listen_ignored addresses=%s serving=%s detail=%s",
                    ",".join(ignored), ",".join(sorted(served)),
                    quoted("systemd passed this daemon its sockets (socket activation): it "
                           "serves those only; add a ListenStream= line to the socket unit "
                           "for each address to serve"),
                )
            return [listener for _, listener in inherited]
        listeners: list[trio.SocketListener] = []
        try:
            for address in self.config.listen:
                if isinstance(address, UnixAddress):
                    listeners.append(await self._open_unix(address))
                    self.addresses.append(str(address))
                else:
                    assert isinstance(address, TcpAddress)
                    opened = await self._open_tcp(address)
                    listeners.extend(opened)
                    for listener in opened:
                        host, port = listener.socket.getsockname()[:2]
                        self.addresses.append(str(TcpAddress(host, port)))
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def _open_tcp(self, address: TcpAddress) -> list[trio.SocketListener]:
        try:
            return await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc

    async def _open_unix(self, address: UnixAddress) -> trio.SocketListener:
        path = address.path
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create {directory} for {address}: {exc.strerror}; run as a user "
                "that may, or choose another path with --listen unix:/path.sock"
            ) from exc
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StartupError(
                f"cannot look up {path} for {address}: {exc.strerror}; the daemon's user "
                f"needs search (x) permission on {directory} and the directories above "
                "it, or choose another path with --listen unix:/path.sock"
            ) from exc
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
            alive = _unix_socket_alive(path)
            if alive is not None:
                raise StartupError(
                    f"another daemon is listening on {path} ({alive}); stop it first or "
                    "choose another --listen path"
                )
            try:
                os.unlink(path)  # a stale socket of a daemon that died
            except FileNotFoundError:
                pass  # gone meanwhile
            except OSError as exc:
                raise StartupError(
                    f"cannot remove the old socket {path} (no daemon answered on it) for "
                    f"{address}: {exc.strerror}; remove it as its owner, run as a user that "
                    f"may write to {directory}, or choose another path with --listen "
                    "unix:/path.sock"
                ) from exc
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, self.config.socket_mode)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc
        self._unix_paths.append(path)
        return trio.SocketListener(sock)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream: trio.SocketStream | None
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare_fd >= 0:
                    stream = await self._accept_with_spare(listener)
                    if stream is None:
                        continue
                elif exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.accept_failures_total += 1
                    if _rare(self.accept_failures_total):
                        log.error(
                            "event=accept_failed error=%s count=%d", exc.strerror,
                            self.accept_failures_total,
                        )
                    self._take_spare()
                    await trio.sleep(0.1)
                    continue
                else:
                    raise
            nursery.start_soon(self._connection, stream)

    def _take_spare(self) -> None:
        """Hold the spare descriptor again, if we hold none and one is free."""
        if self._spare_fd < 0:
            self._spare_fd = _spare_descriptor()

    async def _accept_with_spare(self, listener: trio.SocketListener) -> trio.SocketStream | None:
        """Out of file descriptors: accept the next client on the spare one
        kept for this, then take a spare again.  If there is one to take, a
        descriptor was freed meanwhile (or another listener took it back):
        serve the client.  If not, answer it BUSY at once instead of leaving
        it in the backlog until PHP's own timeout."""
        # accept(2) fails so at the limit even with no client waiting: keep
        # the spare until one is, lest another use of a descriptor (a
        # metrics scrape, a compaction) take the one it frees meanwhile.
        await trio.lowlevel.wait_readable(listener.socket)
        if self._spare_fd < 0:
            return None  # another listener's accept uses it now
        os.close(self._spare_fd)
        self._spare_fd = -1
        stream: trio.SocketStream | None = None
        with contextlib.suppress(OSError):
            # A client is waiting and there is no checkpoint before the
            # accept(2): the descriptor just freed is the one it gets.
            stream = await listener.accept()
        self._take_spare()
        if stream is None or self._spare_fd >= 0:
            return stream
        self.fd_refusals_total += 1
        if _rare(self.fd_refusals_total):
            log.error(
                "event=out_of_file_descriptors refused=%d detail=new clients get BUSY; "
                "raise LimitNOFILE or lower max_connections", self.fd_refusals_total,
            )
        # Non-blocking and small: it fits in the new socket's buffer.
        with contextlib.suppress(OSError):
            os.write(netio.fileno(stream), _BUSY_NO_FDS)
        stream.socket.close()
        self._take_spare()
        return None

    # -- connections

    def may_administer(self, conn: _Conn) -> bool:
        """DRAIN and LIST stop the daemon and reveal every session ID: only
        root, the daemon's own user and cluster peers may (PROTOCOL.md §4.9)."""
        if conn.admin is None:
            if conn.node is not None:
                conn.admin = True
            else:
                conn.uid = _peer_uid(conn)
                conn.admin = peeruid.may_administer(conn.uid)
        return conn.admin

    async def may_administer_tcp(self, conn: _Conn) -> bool:
        """:meth:`may_administer`, a TCP client's uid looked up in a thread:
        /proc/net/tcp lists every TCP socket of the host (7 ms with 4,000
        of them), too long for the event loop.  One lookup at a time, so a
        client repeating LIST cannot take the threads the journal needs."""
        if conn.admin is None and conn.node is None and _is_tcp(conn):
            conn.uid = await trio.to_thread.run_sync(
                _peer_uid, conn, limiter=self._uid_lookups
            )
            conn.admin = peeruid.may_administer(conn.uid)
        return self.may_administer(conn)

    def denied(self, conn: _Conn, event: p.Event) -> p.Error:
        verb = VERB_NAMES.get(type(event), "?")
        self.admin_denied_total += 1
        if _rare(self.admin_denied_total):
            uid = conn.uid  # known: every caller asked may_administer_tcp first
            who = conn.who()
            if not conn.peer_ids:  # not a unix client, whose who() says its uid
                who += f" uid={'?' if uid is None else uid}"
            log.warning(
                "event=admin_denied owner=%d %s verb=%s count=%d",
                conn.owner, who, verb, self.admin_denied_total,
            )
        return p.Error(
            p.Code.DENIED,
            f"{verb} is for root and the daemon's own user (run phpsess as one of them)",
        )

    async def _connection(self, stream: trio.SocketStream) -> None:
        if len(self._conns) >= self.config.max_connections and not (
            len(self._conns) < self.config.max_connections + ADMIN_RESERVED_CONNECTIONS
            and stream.socket.family == stdsocket.AF_UNIX
            and peeruid.may_administer(peeruid.peer_uid(stream.socket))  # type: ignore[arg-type]
        ):
            self.busy_refusals_total += 1
            suffix = self._refusal_throttle.suffix(trio.current_time())
            if suffix is not None:
                log.warning(
                    "event=connection_refused reason=max_connections peer=%s%s connections=%d "
                    "refused_total=%d%s", _peer_name(stream), _peer_ids(stream),
                    len(self._conns), self.busy_refusals_total, suffix,
                )
            with trio.move_on_after(1):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(
                        p.encode_reply(
                            p.Error(
                                p.Code.BUSY,
                                f"the daemon is at max_connections={self.config.max_connections}",
                            )
                        )
                    )
                    # Closing with the client's request unread would reset
                    # the connection, and its recv() report that instead of
                    # BUSY: read what it sent until it closes (bounded).
                    await stream.send_eof()
                    for _ in range(16):
                        if not await stream.receive_some(65536):
                            break
            await trio.aclose_forcefully(stream)
            return
        await self._run_connection(stream, _peer_name(stream))

    async def serve_peer(self, stream: trio.SocketStream, node: str, leftover: bytes) -> None:
        """An authenticated connection from peer ``node`` (CLUSTER.md §4)."""
        await self._run_connection(stream, f"peer:{node}", node, leftover)

    async def _run_connection(
        self, stream: trio.SocketStream, peer: str, node: str | None = None, leftover: bytes = b""
    ) -> None:
        self._next_owner += 1
        owner = self._next_owner
        conn = _Conn(owner, stream, peer, trio.current_time())
        conn.node = node
        if node is None:
            conn.meter = self  # max_outgoing_bytes: client connections only
        self._conns[owner] = conn
        self.engine.connect(owner, peer=node is not None)
        try:
            with trio.CancelScope() as conn.scope:
                if self.sql is not None:  # --storage: the SQL backend serves it
                    await self.sql.serve_connection(conn, leftover)
                else:
                    await self._serve_connection(conn, leftover)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; its locks go below
        except JournalFailed as exc:
            # Its changes are made in memory but could not be journaled
            # (logged why): not acknowledged, though they are written if
            # the disk comes back (the retries, or at the stop).  This error
            # instead of the replies that were waiting, then the connection
            # closes.
            assert self.persister is not None
            reply = p.Error(p.Code.UNAVAILABLE, self.persister.in_doubt(exc))
            # Outside conn.scope, which the sweeper cancels: a deadline of its own.
            with trio.move_on_after(self.config.idle_timeout_s), contextlib.suppress(
                OSError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                out: list[bytes] = []
                netio.append_reply(out, reply)
                await netio.send_parts(netio.fileno(stream), out, conn)
        except Exception:
            log.exception("event=connection_crashed owner=%d %s", owner, conn.who())
        finally:
            await self._close_forwards(conn)  # the masters release its locks
            del self._conns[owner]
            self.incoming_bytes -= conn.incoming
            self.release_outgoing(conn)  # a send cut short (timeout, closed for the bound)
            self.engine.disconnect(owner, trio.current_time())
            self._after_engine()
            if not self._conns:
                self._no_conns.set()
            await trio.aclose_forcefully(stream)

    def close_peer_connections(self, node: str) -> None:
        """End every connection from cluster peer ``node`` (declared dead):
        the locks held through them are released as they close."""
        for conn in list(self._conns.values()):
            if conn.node == node and conn.scope is not None:
                conn.scope.cancel()

    async def _cluster_request(self, conn: _Conn, event: p.Event, now: float) -> p.Reply | None:
        """Requests the cluster answers instead of the local engine: peer
        verbs, and requests for sessions another node masters."""
        cluster = self.cluster
        assert cluster is not None
        if isinstance(event, (p.ReplPut, p.ReplDelete, p.Where, p.Handoff)):
            assert conn.node is not None
            reply = cluster.handle_peer(conn.node, event, now)
            if isinstance(event, p.Handoff) and reply == p.OK:
                await cluster.after_handoff(event.sid)
            return reply
        if (
            cluster.draining and isinstance(event, p.Create) and conn.node is None
            and conn.hello is not None
        ):
            return await cluster.create_elsewhere(self._forwards(conn), event)
        if conn.hello is None or not cluster.is_sid_request(event):
            return None
        sid: str = event.sid  # type: ignore[union-attr]
        if conn.node is not None and not cluster.ready.is_set():
            # A peer forwards a client's request before we know who is alive
            # (just started): our restored copies could be verified against
            # nobody and served stale.  PHP's clients wait for it too (run).
            await cluster.ready.wait()
        node = await cluster.resolve(sid)
        if conn.node is not None and isinstance(node, str) and node != cluster.me:
            node = await cluster.check_hint(sid, node)
        wait_s: float | None = None  # the lock wait: only when it is needed
        if (
            cluster.draining and node == cluster.me
            and (
                (isinstance(event, p.Read) and event.lock) or isinstance(event, _GUARDED)
            )
            and not self.engine.locks.holds(conn.owner, sid)
        ):
            # No new lock on a session a drain is about to hand over, nor a
            # change without its lock while it goes (CLUSTER.md §8).
            waited = trio.current_time()
            wait_s = self._lock_wait_s(conn)
            node = await cluster.resolve_lock(
                sid, peer=conn.node is not None, change=not isinstance(event, p.Read),
                wait_s=wait_s,
            )
            wait_s = max(0.0, wait_s - (trio.current_time() - waited))
        if isinstance(node, p.Error):
            return node
        if node == cluster.me:
            if conn.forwards is not None:
                # A lock this client took through a peer does not hold here
                # (the master it was taken on failed over to us).
                return conn.forwards.lock_lost(event, node)
            return None
        if conn.node is not None:
            return p.Error(p.Code.NOT_MASTER, node)  # no second hop
        if isinstance(event, _GUARDED):
            # Its lock here ran past its lease (PROTOCOL.md §6.3) and the
            # session moved since (a drain handed it over): the master it
            # goes to would take it for a change without the lock.
            lost = self.engine.lease_lost(conn.owner, sid)
            if lost is not None:
                return lost
        elif isinstance(event, p.Read) and event.lock:
            # A new lock: a lease lost on it here is forgotten (§6.3), as
            # a locking READ served here would.
            self.engine.locks.take_revoked(conn.owner, sid)
        forwards = self._forwards(conn)
        assert isinstance(event, p.Request)
        if wait_s is None:
            wait_s = self._lock_wait_s(conn)
        return await cluster.forward(forwards, node, event, wait_s)

    def _lock_wait_s(self, conn: _Conn) -> float:
        """How long ``conn``'s requests wait for a lock: its HELLO's
        ``wait_ms``, else the daemon's ``lock_wait_s``."""
        if conn.hello is not None and conn.hello.wait_ms is not None:
            return conn.hello.wait_ms / 1000
        return self.engine.limits.lock_wait_s

    def _forwards(self, conn: _Conn) -> Forwards:
        """The links through which ``conn``'s requests go to other masters."""
        if conn.forwards is None:
            assert self.cluster is not None
            conn.forwards = Forwards(self.cluster)
            conn.forwards.hello = conn.hello
        return conn.forwards

    async def _serve_connection(self, conn: _Conn, leftover: bytes = b"") -> None:
        engine = self.engine
        fd = netio.fileno(conn.stream)
        parser = p.RequestParser(self.config.limits.max_session_bytes, peer=conn.node is not None)
        parser.receive_data(leftover)
        conn.parser = parser
        cluster = self.cluster
        persister = self.persister
        owner = conn.owner
        while True:
            out: list[bytes] = []
            out_bytes = 0
            durable_seq = 0
            handled = 0  # requests since the other connections last had a turn
            # Past max_outgoing_bytes, in smaller steps (hold_outgoing).
            flush_bytes = (
                netio.MAX_REPLY_BYTES_PER_WRITE
                if self.outgoing_bytes <= self.config.max_outgoing_bytes else _PRESSED_BYTES
            )
            now = trio.current_time()
            while True:
                event = parser.next_event()
                if event is p.NEED_DATA:
                    break
                conn.busy = True
                handled += 1
                conn.partial_since = None  # a whole request came: §10's clock restarts
                started = now if self.metrics is None else trio.current_time()
                reply_or_wait: p.Reply | _Wait | None = None
                try:
                    denied = False
                    if type(event) in p.ADMIN_ONLY and conn.hello is not None:
                        # After HELLO: NEED_HELLO comes first (PROTOCOL.md §9).
                        denied = not await self.may_administer_tcp(conn)
                        now = trio.current_time()
                    if denied:
                        reply_or_wait = self.denied(conn, event)
                    elif cluster is not None:
                        reply_or_wait = await self._cluster_request(conn, event, now)
                        now = trio.current_time()
                        if reply_or_wait is not None:
                            engine.count(event)
                        if self.persister is not None and isinstance(
                            event, (p.ReplPut, p.ReplDelete, p.Handoff)
                        ):
                            # The backup acknowledges under its own fsync policy,
                            # once for a whole pipelined batch (group commit).
                            durable_seq = self.persister.submitted
                    if (
                        reply_or_wait is None and persister is not None
                        and persister.failure is not None and conn.hello is not None
                        and type(event) in _CHANGES
                    ):
                        reply_or_wait = self._refuse_change(persister, event)
                    if reply_or_wait is None:
                        reply_or_wait = engine.handle(owner, event, now)
                        if isinstance(event, p.Hello) and reply_or_wait == _OK_1:
                            conn.hello = event
                            conn.label = event.client or ""
                            if conn.forwards is not None:
                                # Links to masters opened from now on say
                                # this HELLO (the open ones get it below).
                                conn.forwards.hello = event
                        if cluster is not None and engine.changes:
                            changes = list(engine.changes)
                            if self.persister is not None:
                                durable_seq = self._submit_changes()
                            else:
                                engine.changes = []
                            # Acknowledged only once the backup has it (CLUSTER.md §6).
                            refused = await cluster.replicate(changes)
                            if refused is not None:
                                reply_or_wait = refused
                            now = trio.current_time()
                        if conn.forwards is not None and isinstance(event, (p.Hello, p.Close)):
                            await conn.forwards.broadcast(event)
                            now = trio.current_time()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise  # the client went away
                except Exception:
                    # A bug: PROTOCOL.md §9 INTERNAL (fatal).  The replies to the
                    # requests before it still go out, then the connection closes.
                    log.exception(
                        "event=internal_error owner=%d %s verb=%s", owner, conn.who(),
                        VERB_NAMES.get(type(event), "INVALID"),
                    )
                    reply_or_wait = p.Error(
                        p.Code.INTERNAL, "a bug in the daemon (logged); reconnect and retry"
                    )
                reply = reply_or_wait
                if engine.changes:
                    # This batch changed sessions: its acknowledgements wait
                    # for the journal as the fsync policy says.
                    durable_seq = self._submit_changes()
                if reply is WAIT:
                    # From now on a completion for this connection is kept,
                    # even if it comes while the replies before it go out.
                    conn.event = trio.Event()
                    conn.reply = None
                    if out:
                        if durable_seq:
                            await self._durable(durable_seq)
                            durable_seq = 0
                        await netio.send_parts(fd, out, conn)
                        out = []
                        out_bytes = 0
                    self._after_engine()
                    waited = await self._wait_for_lock(conn, parser)
                    if waited is None:
                        return  # the client closed while waiting
                    reply = waited
                    now = trio.current_time()
                out_bytes += netio.append_reply(out, reply)
                if self.metrics is not None:
                    self.metrics.observe(
                        VERB_NAMES.get(type(event), "INVALID"), trio.current_time() - started
                    )
                if isinstance(reply, p.Error) and (reply.fatal or isinstance(event, p.FatalError)):
                    self.log_protocol_error(conn, reply)
                    if durable_seq:
                        await self._durable(durable_seq)
                    await netio.send_parts(fd, out, conn)
                    return
                if out_bytes >= flush_bytes or handled >= _REQUESTS_PER_TURN:
                    await self._send_early(conn, fd, out, durable_seq)
                    out = []
                    out_bytes = 0
                    durable_seq = 0
                    if handled >= _REQUESTS_PER_TURN:
                        # A long pipelined batch: let the other connections
                        # (and the timer) run before going on with it.
                        handled = 0
                        await trio.lowlevel.checkpoint()
                    # The send waits for a slow reader (or the journal): the
                    # next request's lease, lifetime and lock wait count from
                    # when it is handled, not from the batch's start.
                    now = trio.current_time()
            if (
                persister is not None and out and persister.always
                and persister.synced < persister.submitted and persister.failure is None
            ):
                # fsync always: a reply must not report what a crash could
                # still undo, though this batch changed nothing (a second
                # DESTROY of a session, a READ of one just written).  Not
                # while the journal fails: reads go on then.
                durable_seq = persister.submitted
            # The usual case (interval, never) costs a call, not a coroutine.
            if durable_seq and not (persister is not None and persister.durable(durable_seq)):
                await self._durable(durable_seq)
            if engine.drain_requested and not self._stopping.is_set():
                log.info("event=drain_requested owner=%d %s", owner, conn.who())
                self.shutdown()
            if engine.completions or engine.notices:
                self._after_engine()
            elif engine.next_deadline_hint < self._timer_at:
                self._wake.set()
            if out:
                await netio.send_parts(fd, out, conn)
            conn.busy = False
            # Stopping (in a cluster: once the drain has handed the sessions
            # over): client connections end once they hold no lock and have
            # no request half received (§10).  Peer connections stay: the
            # drain needs them (probes, the masters releasing the copies we
            # back up: CLUSTER.md §8).
            if (
                self._ending_clients and conn.node is None
                and not parser.mid_request and not self._holds_locks(conn)
            ):
                return
            # Not a cancel scope per request: _idle_sweeper cuts off a silent
            # connection, sparing one that holds a lock (it may think as long
            # as nobody else needs the lock, and for its lease when someone
            # does) unless it stalls mid-request.  Whether it holds one is
            # decided at sweep time: it may be revoked while it waits here.
            incoming = _buffered(parser)
            if (
                incoming != conn.incoming and conn.node is None
                and not await self.count_incoming(conn, fd, incoming)
            ):
                return
            conn.idle_since = conn.waiting_since(trio.current_time())
            data = await netio.receive(
                fd, netio.RECEIVE_BYTES
                if self.outgoing_bytes <= self.config.max_outgoing_bytes else _PRESSED_BYTES
            )
            conn.idle_since = None
            if not data:
                return
            parser.receive_data(data)
            # The parser has its own copy: not this one too while the
            # batch's replies wait for a client that does not read.
            del data

    def log_protocol_error(self, conn: _Conn, reply: p.Error) -> None:
        """Log the fatal error ``reply`` that ends ``conn`` (both storage
        loops): its code, the start of the sentence its client got, and
        who the client is; a few lines a second (a client may send bad
        frames at will), the count of the rest once their second is over."""
        if reply.code in _MALFORMED:  # not BUSY, SHUTTING_DOWN, INTERNAL
            self.protocol_errors_total += 1
        suffix = self._protocol_error_throttle.suffix(trio.current_time())
        if suffix is not None:
            log.info(
                "event=protocol_error owner=%d %s code=%s reason=%s%s", conn.owner,
                conn.who(), reply.code.name, quoted(clipped(reply.message, _REASON_CHARS)),
                suffix,
            )

    def _log_left_out(self, now: float) -> None:
        """Log how many lines each throttle left out in the seconds over by
        ``now`` (``math.inf``: at the stop, all), so that the count of a
        burst is logged though no line of its kind follows it.  (The next
        line of the kind says so too: ``not_logged_before=N``, as before.)"""
        for throttle, level, line in self._throttles:
            count = throttle.left_out(now)
            if count:
                log.log(level, "%s count=%d per_s=%d", line, count, throttle.per_s)

    def _extra_stats(self) -> dict[str, object]:
        """STATS fields of the I/O shell (and of the cluster)."""
        stats: dict[str, object] = {
            "incoming_bytes": self.incoming_bytes,
            "incoming_refusals_total": self.incoming_refusals_total,
            "outgoing_bytes": self.outgoing_bytes,
            "outgoing_closes_total": self.outgoing_closes_total,
            "connection_refusals_total": self.busy_refusals_total,
            "fd_refusals_total": self.fd_refusals_total,
            "protocol_errors_total": self.protocol_errors_total,
            "timeout_closes": dict(self.timeout_closes),
        }
        persister = self.persister
        if persister is not None:
            stats["storage"] = f"journal in {persister.dir}, fsync {persister.config.fsync}"
            stats |= persister.statistics()
        elif self.sql is None:
            stats["storage"] = "memory only (a restart loses every session{})".format(
                " but the copies on peers" if self.cluster is not None else ""
            )
        if self.cluster is not None:
            stats |= self.cluster.statistics()
        return stats

    async def count_incoming(self, conn: _Conn, fd: int, incoming: int) -> bool:
        """Count ``incoming``, the bytes of ``conn``'s requests still
        arriving; past ``max_incoming_bytes`` answer it BUSY (fatal) and
        close it.  Whether to go on."""
        if self.note_incoming(conn, incoming):
            return True
        await self.refuse_incoming(conn, fd)
        return False

    def note_incoming(self, conn: _Conn, incoming: int) -> bool:
        """Keep the bytes of client requests still arriving, all connections
        together, under ``max_incoming_bytes`` (PROTOCOL.md §10), so that
        clients that start big WRITEs and stall cannot exhaust memory.
        False when ``conn``'s request, growing past 64 KiB, takes the total
        over it while others hold some too (a request alone, up to
        ``max_session_bytes``, always fits: the limit is at least that)."""
        grew = incoming > conn.incoming
        self.incoming_bytes += incoming - conn.incoming
        conn.incoming = incoming
        return not (
            grew and incoming > _INCOMING_UNCHECKED_BYTES
            and self.incoming_bytes > self.config.max_incoming_bytes
            and self.incoming_bytes > incoming
        )

    def hold_outgoing(self, conn: _Conn, held_bytes: int, now: float) -> None:
        """``conn``'s send has to wait for its client: count what it holds,
        ``held_bytes`` and the requests read ahead behind it (those not
        counted as incoming), until :meth:`release_outgoing`.  Past
        ``max_outgoing_bytes``, close the connections that read nothing
        (:meth:`shed_outgoing`)."""
        parser = conn.parser
        if parser is not None:
            held_bytes += max(0, _buffered(parser) - conn.incoming)
        self.outgoing_bytes += held_bytes - conn.outgoing
        conn.outgoing = held_bytes
        self._stalled[conn.owner] = conn
        if (
            self.outgoing_bytes > self.config.max_outgoing_bytes
            and now - self._shed_at >= _UNREAD_GRACE_S / 8
        ):
            # Not at every stall: a look is a sort of them all.
            self.shed_outgoing(now)

    def release_outgoing(self, conn: _Conn) -> None:
        """``conn``'s send is over (or the connection): its bytes are free."""
        if self._stalled.pop(conn.owner, None) is not None:
            self.outgoing_bytes -= conn.outgoing
            conn.outgoing = 0

    def flush_bytes(self) -> int:
        """Replies of a batch held back for one write: fewer past
        ``max_outgoing_bytes`` (for the SQL backend's loop; the engine's
        has it inline)."""
        if self.outgoing_bytes <= self.config.max_outgoing_bytes:
            return netio.MAX_REPLY_BYTES_PER_WRITE
        return _PRESSED_BYTES

    def receive_bytes(self) -> int:
        """The most a receive takes: less past ``max_outgoing_bytes``."""
        if self.outgoing_bytes <= self.config.max_outgoing_bytes:
            return netio.RECEIVE_BYTES
        return _PRESSED_BYTES

    def shed_outgoing(self, now: float) -> None:
        """Keep the bytes held for clients that do not read under
        ``max_outgoing_bytes`` (PROTOCOL.md §10): close connections, the one
        whose client has gone longest without taking any of its replies
        first, until the total is under it.  Only those that have read
        nothing for ``_UNREAD_GRACE_S``: a client reading its replies is
        never closed for another's backlog (the total may stay over the
        limit for that long; meanwhile every connection is served in
        smaller steps, so that little more is taken)."""
        limit = self.config.max_outgoing_bytes
        self._shed_at = now
        candidates = sorted(
            (c for c in self._stalled.values() if now - c.read_at >= _UNREAD_GRACE_S),
            key=lambda c: c.read_at,
        )
        for conn in candidates:
            if self.outgoing_bytes <= limit:
                break
            held = conn.outgoing
            # Its task ends at its next checkpoint, freeing them.
            self.release_outgoing(conn)
            self.outgoing_closes_total += 1
            suffix = self._outgoing_throttle.suffix(now)
            if suffix is not None:
                log.warning(
                    "event=connection_closed reason=max_outgoing_bytes owner=%d %s "
                    "held_bytes=%d unread_s=%.1f outgoing_bytes=%d count=%d detail=the client "
                    "did not read its replies while the daemon held max_outgoing_bytes=%d "
                    "for such clients%s", conn.owner, conn.who(), held, now - conn.read_at,
                    self.outgoing_bytes, self.outgoing_closes_total, limit, suffix,
                )
            if conn.scope is not None:
                conn.scope.cancel()

    async def refuse_incoming(self, conn: _Conn, fd: int) -> None:
        """BUSY for a request over ``max_incoming_bytes``; the caller ends
        the connection (its locks are released)."""
        self.incoming_refusals_total += 1
        if _rare(self.incoming_refusals_total):
            log.warning(
                "event=connection_refused reason=max_incoming_bytes owner=%d %s "
                "incoming_bytes=%d count=%d", conn.owner, conn.who(), self.incoming_bytes,
                self.incoming_refusals_total,
            )
        reply = p.Error(
            p.Code.BUSY,
            f"the daemon is receiving max_incoming_bytes={self.config.max_incoming_bytes} "
            "of requests; retry",
        )
        with trio.move_on_after(1):
            # A lingering close: over TCP, closing with the client's bytes
            # unread would reset the connection and lose the reply; read
            # them (for a second at most) until the client closes.
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await netio.send(fd, p.encode_reply(reply), conn)
                stream = conn.stream
                if isinstance(stream, trio.SocketStream):
                    stream.socket.shutdown(stdsocket.SHUT_WR)
                while await netio.receive(fd):
                    pass

    async def _send_early(
        self, conn: _Conn, fd: int, out: list[bytes], durable_seq: int
    ) -> None:
        """Send the replies so far of a batch that has more requests to
        handle: its writes' acknowledgements once durable, and the other
        connections' grants first, as this send may wait for the client.
        With ``fsync always`` none of them may report what a crash could
        still undo, as at the end of a batch."""
        persister = self.persister
        if (
            persister is not None and persister.always
            and persister.synced < persister.submitted and persister.failure is None
        ):
            durable_seq = persister.submitted
        if durable_seq:
            await self._durable(durable_seq)  # at once when it already is
        self._after_engine()
        await netio.send_parts(fd, out, conn)

    async def _close_forwards(self, conn: _Conn) -> None:
        if conn.forwards is not None:
            with trio.CancelScope(shield=True):
                await conn.forwards.aclose()

    async def _wait_for_lock(self, conn: _Conn, parser: p.RequestParser) -> p.Reply | None:
        """Wait for the completion of the request the engine said WAIT to
        (``conn.event`` was made then, so an early completion is not lost)."""
        assert conn.event is not None
        gone = False

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal gone
            gone = await self.read_while_waiting(conn, parser)
            if gone:
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await conn.event.wait()
            nursery.cancel_scope.cancel()
        conn.event = None
        if gone and conn.reply is None:
            return None
        return conn.reply

    async def read_while_waiting(self, conn: _Conn, parser: p.RequestParser) -> bool:
        """While ``conn`` waits for a lock (both storage loops): read on so
        that a vanished client is noticed, but at most
        ``_MAX_BUFFER_WHILE_WAITING`` ahead (back-pressure), counted in
        ``max_incoming_bytes``.  True once the client is gone (or refused),
        False if its requests broke the parser."""
        fd = netio.fileno(conn.stream)
        try:
            while not parser.broken:
                buffered = _buffered(parser)
                if conn.node is None and not self.note_incoming(conn, buffered):
                    await self.refuse_incoming(conn, fd)
                    return True
                if buffered > _MAX_BUFFER_WHILE_WAITING:
                    # Not reading, an EOF would go unseen: ask the socket
                    # whether the client hung up, lest its queued lock be
                    # granted and its buffered writes applied after it gave up.
                    await netio.wait_hangup(fd)
                    return True
                data = await netio.receive(fd, _MAX_BUFFER_WHILE_WAITING + 1 - buffered)
                if not data:
                    return True
                parser.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True  # reset by the client: gone, as with EOF
        return False

    def _refuse_change(self, persister: Persister, event: p.Event) -> p.Error:
        """A change asked for while the journal cannot be written: refused
        before it is made, so nothing is stored (the connection's lock, if
        it holds one, is kept, as after ``LOCKED``)."""
        self.engine.count(event)
        self.engine.errors_total += 1
        message = persister.refusal()
        assert message is not None
        return p.Error(p.Code.UNAVAILABLE, message)

    async def _durable(self, seq: int) -> None:
        assert self.persister is not None
        await self.persister.wait_durable(seq)

    def _after_engine(self) -> None:
        """Deliver late replies and log notices; wake the timer if needed."""
        engine = self.engine
        if engine.completions:
            completions = engine.completions
            engine.completions = []
            cluster = self.cluster
            for completion in completions:
                conn = self._conns.get(completion.owner)  # type: ignore[call-overload]
                if conn is None or conn.event is None:
                    continue
                if (
                    completion.sid and cluster is not None
                    and cluster.grant_needs_check(completion.sid)
                ):
                    # A lock granted from the wait queue on a session whose
                    # copy is unverified (we stalled) or not mastered here:
                    # checked before it is served (CLUSTER.md §3, §7).
                    try:
                        cluster._spawn(self._deliver_checked_grant, conn, conn.event, completion)
                    except RuntimeError:  # the cluster has stopped
                        self._refuse_grant(conn, completion, p.Error(
                            p.Code.UNAVAILABLE, "the cluster is stopping; retry"))
                    continue
                conn.reply = completion.reply
                conn.event.set()
        if engine.notices:
            now = trio.current_time()
            for notice in engine.notices:
                suffix = self.notice_throttle.suffix(now)
                if suffix is not None:
                    holder = self._conns.get(notice.owner)  # type: ignore[call-overload]
                    log.warning(
                        "event=%s session=%s owner=%s%s%s", notice.event, sid_tag(notice.sid),
                        notice.owner, "" if holder is None else " " + holder.who(), suffix,
                    )
            engine.notices = []
        if engine.next_deadline_hint < self._timer_at:
            self._wake.set()

    async def _deliver_checked_grant(
        self, conn: _Conn, event: trio.Event, completion: Completion
    ) -> None:
        """Deliver a lock grant once the cluster has checked the session is
        still ours (CLUSTER.md §3): with what the session holds then, else
        release the lock and answer that it moved."""
        cluster = self.cluster
        assert cluster is not None
        sid, owner = completion.sid, completion.owner
        node: str | p.Error
        try:
            node = await cluster.resolve(sid)
        except Exception:
            log.exception("event=grant_check_failed session=%s", sid_tag(sid))
            node = p.Error(p.Code.UNAVAILABLE, "the session could not be checked; retry")
        if self._conns.get(conn.owner) is not conn or conn.event is not event:
            return  # the client went away: its locks went with it
        engine = self.engine
        now = trio.current_time()
        if node == cluster.me and engine.locks.holds(owner, sid):
            conn.reply = engine.read_reply(sid, now)
            event.set()
            self._after_engine()
            return
        if isinstance(node, p.Error):
            error = node
        elif node == cluster.me:
            error = p.Error(
                p.Code.UNAVAILABLE, "the session's lock was lost while it was checked; retry"
            )
        elif conn.node is not None:
            error = p.Error(p.Code.NOT_MASTER, node)
        else:
            error = p.Error(
                p.Code.UNAVAILABLE,
                f"the session moved to another node ({node}) while this request waited "
                "for its lock; retry",
            )
        self._refuse_grant(conn, completion, error)

    def _refuse_grant(self, conn: _Conn, completion: Completion, error: p.Error) -> None:
        """Answer ``error`` instead of a grant and give the lock up."""
        self.engine.unlock(completion.owner, completion.sid, trio.current_time())
        self.engine.errors_total += 1
        if conn.event is not None:
            conn.reply = error
            conn.event.set()
        self._after_engine()

    async def _idle_sweeper(self) -> None:
        """Close connections silent for ``idle_timeout_s`` while holding no
        lock (or stalled mid-request), connections whose client has not read
        all of a send that had to wait for it within as long, and client
        connections that have not said HELLO within ``handshake_timeout_s``.
        One sweep every eighth of the timeout (at most a second) instead of
        a cancel scope around every receive and send, which cost every
        request a deadline registration: a connection is cut between 1 and
        1.125 timeouts after it stalled.  Past ``max_outgoing_bytes``, also
        :meth:`shed_outgoing`, as often as ``_UNREAD_GRACE_S`` (the new
        sends that wait look too, but they may stop coming).  As it wakes at
        least once a second, it also logs the count of the lines the
        throttles left out (:meth:`_log_left_out`): no task of its own."""
        while True:
            pause = min(1.0, self.config.idle_timeout_s / 8, self.config.handshake_timeout_s / 8)
            if self.outgoing_bytes > self.config.max_outgoing_bytes:
                pause = min(pause, _UNREAD_GRACE_S)
            await trio.sleep(pause)
            now = trio.current_time()
            self._log_left_out(now)
            if self.outgoing_bytes > self.config.max_outgoing_bytes:
                self.shed_outgoing(now)
            limit = self.config.idle_timeout_s
            handshake_limit = self.config.handshake_timeout_s
            for conn in list(self._conns.values()):
                if conn.scope is None:
                    continue
                if (
                    conn.hello is None and now - conn.opened >= handshake_limit
                    and conn.node is None and not self._said_hello(conn)
                ):
                    self.timeout_closes["handshake"] += 1
                    suffix = self._handshake_throttle.suffix(now)
                    if suffix is not None:
                        log.info(
                            "event=handshake_timeout owner=%d %s open_s=%.1f detail=no "
                            "HELLO within %gs of connecting%s", conn.owner, conn.who(),
                            now - conn.opened, handshake_limit, suffix,
                        )
                    conn.scope.cancel()
                    continue
                since = conn.idle_since
                if since is not None and now - since >= limit:
                    # Held now, not when it fell silent: it may have been
                    # revoked since (past its lease, for a request that
                    # asked for it; the wait is not).
                    # Its locks through other nodes too (§5.3): a long
                    # request on a session mastered elsewhere keeps its
                    # connection, and so its lock and its write.
                    if self._holds_locks(conn) and not conn.mid_request:
                        continue
                    conn.idle_since = None
                    self.timeout_closes["idle"] += 1
                    suffix = self._idle_throttle.suffix(now)
                    if suffix is not None:
                        log.info(
                            "event=idle_timeout owner=%d %s silent_s=%.1f%s",
                            conn.owner, conn.who(), now - since, suffix,
                        )
                    conn.scope.cancel()
                    continue
                since = conn.sending_since
                if since is not None and now - since >= limit:
                    # Since the send first had to wait, however much the
                    # client read since: the reply it pins has a deadline.
                    conn.sending_since = None
                    self.timeout_closes["send"] += 1
                    suffix = self._send_timeout_throttle.suffix(now)
                    if suffix is not None:
                        log.info(
                            "event=send_timeout owner=%d %s stalled_s=%.1f detail=the "
                            "client did not read its replies within idle_timeout_s%s",
                            conn.owner, conn.who(), now - since, suffix,
                        )
                    conn.scope.cancel()

    def _said_hello(self, conn: _Conn) -> bool:
        """Whether the SQL backend accepted a HELLO on ``conn`` (the
        engine's loop sets ``conn.hello``; the SQL backend's keeps its own)."""
        return self.sql is not None and self.sql.said_hello(conn.owner)

    async def _timer(self) -> None:
        engine = self.engine
        while True:
            deadline = engine.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            with trio.move_on_at(self._timer_at):
                await self._wake.wait()
            self._wake = trio.Event()
            engine.tick(trio.current_time())
            if engine.changes:
                if self.cluster is not None:
                    # Expiries: each copy expires on its own TTL, nothing to send.
                    self.cluster.expired([sid for _, sid, _, _ in engine.changes])
                if self.persister is not None:
                    self._submit_changes()  # expiries: journaled, nobody waits
                else:
                    engine.changes = []
            self._after_engine()


_OK_1: Final = p.Ok(("1",))
# Connections past max_connections that root and the daemon's own user may
# still open on a unix socket, so that `phpsess status`, `ls` or `drain`
# work while PHP's workers hold every slot (as a database reserves a few
# connections for its superuser).
ADMIN_RESERVED_CONNECTIONS: Final = 4

_BUSY_NO_FDS: Final = p.encode_reply(
    p.Error(p.Code.BUSY, "the daemon is out of file descriptors (LimitNOFILE)")
)


def _spare_descriptor() -> int:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _buffered(parser: p.RequestParser) -> int:
    return len(parser._buf)


def _peer_ids(stream: trio.abc.Stream) -> str:
    """`` uid=U pid=P`` of a unix client (SO_PEERCRED), else ""."""
    if not isinstance(stream, trio.SocketStream):
        return ""
    ids = peeruid.unix_peer(stream.socket)  # type: ignore[arg-type]
    return "" if ids is None else f" uid={ids[0]} pid={ids[1]}"


def _peer_uid(conn: _Conn) -> int | None:
    stream = conn.stream
    if not isinstance(stream, trio.SocketStream):
        return None
    return peeruid.peer_uid(stream.socket)  # type: ignore[arg-type]


def _is_tcp(conn: _Conn) -> bool:
    stream = conn.stream
    return isinstance(stream, trio.SocketStream) and stream.socket.family in (
        stdsocket.AF_INET, stdsocket.AF_INET6
    )


def _unix_socket_alive(path: str) -> str | None:
    """Why the socket file ``path`` may belong to a live process, or None when
    it is stale.  Only a refused connection (or the file gone meanwhile)
    proves it stale: a full backlog (a busy daemon), a timeout or a
    permission error may hide a live daemon, whose socket must not be
    removed from under it."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as exc:
        return f"connecting to it failed with {exc.strerror or 'a timeout'}, not refused"
    finally:
        probe.close()
    return "it accepts connections"


# Settings that need a restart, named as the configuration file names them:
# ServerConfig field -> its sub-fields' keys (others: "<field>.<sub-field>"),
# and the key for the whole section appearing or going.
_RESTART_KEYS: Final[dict[str, dict[str, str]]] = {
    "persist": {
        "data_dir": "data_dir", "fsync": "fsync",
        "fsync_interval_s": "fsync_interval_ms", "min_compact_bytes": "compact_min_bytes",
    },
    "storage": {
        "password": "storage.password", "table": "storage.table",
        "engine": "storage.engine", "pool_size": "storage.pool_size",
    },
    "cluster": {
        "secret": "cluster.secret_file", "heartbeat_s": "cluster.heartbeat_ms",
        "dead_after_s": "cluster.dead_after_ms", "probe_s": "cluster.probe_ms",
    },
}
_WHOLE_KEYS: Final = {"persist": "memory_only", "storage": "storage.url", "cluster": "cluster"}


def _restart_keys(
    current: ServerConfig, fresh: ServerConfig, reloadable: tuple[str, ...]
) -> list[str]:
    """The configuration keys that differ in ``fresh`` and apply only after a
    restart (each once, in field order)."""
    changed: list[str] = []
    for field in attrs.fields(ServerConfig):
        name = field.name
        before, after = getattr(current, name), getattr(fresh, name)
        if name in reloadable or before == after:
            continue
        keys = _RESTART_KEYS.get(name)
        if keys is None:
            changed.append(name)  # listen, socket_mode, metrics_listen
        elif before is None or after is None:
            # persist comes and goes with storage too: then storage.url says it.
            if name != "persist" or (current.storage is None and fresh.storage is None):
                changed.append(_WHOLE_KEYS[name])
        else:
            for sub in attrs.fields(type(before)):
                if getattr(before, sub.name) != getattr(after, sub.name):
                    default = "storage.url" if name == "storage" else f"{name}.{sub.name}"
                    changed.append(keys.get(sub.name, default))
    return list(dict.fromkeys(changed))


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix"


async def run_until_signal(
    server: Server, reload: Callable[[], tuple[ServerConfig, str]] | None = None
) -> None:
    """Serve until SIGTERM, SIGINT or a DRAIN request, then shut down
    gracefully (PROTOCOL.md §10).  SIGHUP calls ``reload`` (when there is a
    configuration file) and applies what can change while running."""
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def wait_signal() -> None:
                stopping = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum != signal.SIGHUP and stopping:
                        # Not left queued: the receiver's exit would deliver
                        # it and kill the daemon as it finishes its stop.
                        log.info(
                            "event=signal_ignored signal=%s detail=already stopping, within "
                            "shutdown_timeout_s (a cluster: drain_timeout_s + "
                            "shutdown_timeout_s); SIGKILL ends it at once", name,
                        )
                        continue
                    log.info("event=signal signal=%s", name)
                    if signum != signal.SIGHUP:
                        stopping = True
                        server.shutdown()
                        continue
                    if reload is None:
                        log.warning("event=reload_skipped detail=no --config file to reload")
                        continue
                    try:
                        fresh, log_level = reload()
                    except Exception as exc:
                        log.error("event=reload_failed detail=%s; the old settings stay", exc)
                        continue
                    server.reload(fresh, log_level)

            nursery.start_soon(wait_signal)
            await server.serve()
            nursery.cancel_scope.cancel()  # served out: stop waiting for signals
