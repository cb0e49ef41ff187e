"""Prometheus metrics (optional, ``--metrics-listen``): what an operator
watches (requests, latency, locks, sessions, expiry, journal, replication,
peers).  Counters are read from the daemon at scrape time, inside the event
loop, so nothing here races with request handling; the exposition format is
``prometheus_client``'s."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from phpsess import membership as mb
from phpsess.addresses import TcpAddress

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from phpsess.server import Server

log = logging.getLogger("phpsess")

_MAX_REQUEST_BYTES: Final = 8192
# Reading the request, and sending the reply, each get this long.
_IO_TIMEOUT_S: Final = 5.0
_LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0,
)


class _DaemonCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server
        # With --storage: what the scrape handler fetched just before.
        self.sql_stats: dict[str, object] = {}

    def collect(self) -> Iterator[Metric]:
        server = self.server
        if server.sql is not None:
            stats = self.sql_stats
            yield GaugeMetricFamily(
                "phpsess_storage_up",
                "1 if the database answered the count of sessions for this scrape.",
                value=0.0 if "storage_error" in stats else 1.0,
            )
        else:
            stats = server.engine.statistics(trio.current_time())
        requests = CounterMetricFamily(
            "phpsess_requests", "Requests handled, by verb.", labels=["verb"]
        )
        for verb, count in dict(stats["verbs"]).items():  # type: ignore[call-overload]
            requests.add_metric([verb], count)
        yield requests
        yield CounterMetricFamily(
            "phpsess_request_errors", "Requests answered with an error.",
            value=_number(stats["errors_total"]),
        )
        for name, doc, key in (
            ("phpsess_sessions", "Sessions held (as master or backup, or in the database).",
             "sessions"),
            ("phpsess_session_bytes", "Bytes of session data held.", "bytes"),
            ("phpsess_connections", "Open client and peer connections.", "connections"),
            ("phpsess_locks_held", "Session locks held now.", "locks_held"),
            ("phpsess_locks_waiting", "Requests waiting for a lock now.", "locks_waiting"),
            ("phpsess_incoming_bytes", "Bytes of client requests still arriving "
             "(--max-incoming-bytes bounds them).", "incoming_bytes"),
            ("phpsess_outgoing_bytes", "Bytes held for clients that have not read their "
             "replies (--max-outgoing-bytes bounds them).", "outgoing_bytes"),
        ):
            if stats.get(key) is not None:  # the database's, when it did not answer
                yield GaugeMetricFamily(name, doc, value=_number(stats[key]))
        for name, doc, key in (
            ("phpsess_lock_waits", "Requests that had to wait for a lock.", "lock_waits_total"),
            ("phpsess_lock_timeouts", "Lock waits that gave up.", "lock_timeouts_total"),
            ("phpsess_lock_revocations",
             "Locks revoked past their lease (for a request that asked for them; SQL "
             "storage: when it ran out), or because their session moved to another node.",
             "lock_revoked_total"),
            ("phpsess_expired_sessions", "Sessions expired on their TTL.", "expired_total"),
            ("phpsess_incoming_refusals", "Clients answered BUSY for --max-incoming-bytes.",
             "incoming_refusals_total"),
            ("phpsess_connection_refusals", "Clients answered BUSY for --max-connections.",
             "connection_refusals_total"),
            ("phpsess_fd_refusals", "Clients answered BUSY because the daemon was out of "
             "file descriptors (raise LimitNOFILE or lower --max-connections).",
             "fd_refusals_total"),
            ("phpsess_outgoing_closes", "Connections closed for --max-outgoing-bytes.",
             "outgoing_closes_total"),
            ("phpsess_protocol_errors", "Connections closed for a malformed request "
             "(BAD_FRAME, HEADER_TOO_LONG).", "protocol_errors_total"),
        ):
            yield CounterMetricFamily(name, doc, value=_number(stats[key]))
        closes = CounterMetricFamily(
            "phpsess_timeout_closes", "Connections closed by a timeout: no HELLO in time "
            "(handshake), silent for --idle-timeout-s (idle), replies unread (send).",
            labels=["reason"],
        )
        for reason, count in dict(stats["timeout_closes"]).items():  # type: ignore[call-overload]
            closes.add_metric([reason], count)
        yield closes
        persister = server.persister
        if persister is not None:
            yield CounterMetricFamily("phpsess_fsyncs", "Journal fsyncs.",
                                      value=persister.fsyncs_total)
            yield CounterMetricFamily("phpsess_fsync_seconds", "Time spent in journal fsyncs.",
                                      value=persister.fsync_seconds_total)
            yield CounterMetricFamily("phpsess_compactions", "Journal compactions.",
                                      value=persister.compactions_total)
            yield CounterMetricFamily(
                "phpsess_compaction_failures",
                "Compactions that failed (the journal grows meanwhile; retried after 30 s).",
                value=persister.compaction_failures_total,
            )
            yield GaugeMetricFamily("phpsess_journal_bytes", "Size of the current journal.",
                                    value=persister.journal_bytes)
            yield GaugeMetricFamily(
                "phpsess_journal_failed",
                "1 while the journal cannot be written (changes are refused; see the log's "
                "event=journal_write_failed).",
                value=0.0 if persister.failure is None else 1.0,
            )
        cluster = server.cluster
        if cluster is not None:
            membership = cluster.membership
            up = GaugeMetricFamily("phpsess_peer_up", "1 if the peer is alive.", labels=["peer"])
            left = GaugeMetricFamily(
                "phpsess_peer_left",
                "1 if the peer left after a completed drain (it holds no copy: its "
                "phpsess_peer_up 0 is no failure).",
                labels=["peer"],
            )
            for peer in cluster.peer_address:
                up.add_metric([peer], 1.0 if membership.is_alive(peer) else 0.0)
                left.add_metric([peer], 1.0 if membership.state(peer) == mb.LEFT else 0.0)
            yield up
            yield left
            yield GaugeMetricFamily(
                "phpsess_cluster_degraded", "1 if no peer can hold backups.",
                value=1.0 if cluster.membership.degraded else 0.0,
            )
            yield CounterMetricFamily(
                "phpsess_replication_failures", "Replications that failed and were retried.",
                value=cluster.replication_failures_total,
            )
            yield CounterMetricFamily(
                "phpsess_takeovers", "Takeovers after a peer died.",
                value=cluster.takeovers_total,
            )


def _route(request_line: bytes) -> tuple[bytes, bool]:
    """The method of an HTTP request line, and whether it asks for the
    metrics: GET or HEAD of ``/metrics`` (or ``/``), any query string left
    aside (Prometheus sends a scrape config's ``params`` as one)."""
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return b"", False
    method, target, _version = parts
    path = target.split(b"?", 1)[0]
    return method, method in (b"GET", b"HEAD") and path in (b"/metrics", b"/")


def _number(value: object) -> float:
    assert isinstance(value, (int, float))
    return float(value)


class Metrics:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _DaemonCollector(server)
        self.registry.register(self._collector)
        # The standard process_* (CPU seconds, resident memory, open and
        # maximum fds, start time) and python_info, as every exporter has:
        # the daemon is one Python process, its memory is its sessions.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.latency = Histogram(
            "phpsess_request_seconds", "Time from a request's arrival to its reply, by verb.",
            ["verb"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )

    def observe(self, verb: str, seconds: float) -> None:
        self.latency.labels(verb).observe(seconds)

    async def serve(self, address: TcpAddress, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A minimal HTTP endpoint: ``GET /metrics`` (a query string, which a
        scrape config's ``params`` adds, is ignored) and ``HEAD /metrics``."""
        from phpsess.server import StartupError

        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {address}: {exc.strerror or exc}; "
                "choose another metrics_listen (--metrics-listen)"
            ) from exc
        # The addresses bound: the port the system chose for port 0.
        bound = []
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            bound.append(str(TcpAddress(host, port)))
        log.info("event=metrics_listening address=%s", ",".join(bound))
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            request = b""
            with trio.move_on_after(_IO_TIMEOUT_S) as reading:
                while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            if reading.cancelled_caught:
                return
            method, wanted = _route(request.split(b"\r\n", 1)[0])
            if wanted:
                sql = self.server.sql
                if sql is not None:
                    # The session count is a query: not inside collect().  It
                    # is bounded (sqlserver.STATS_TIMEOUT_S) even while the
                    # database hangs: the scrape then says storage_up 0.
                    self._collector.sql_stats = await sql.statistics()
                body = generate_latest(self.registry)
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found: try GET /metrics\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            with trio.move_on_after(_IO_TIMEOUT_S):
                # HEAD: the headers GET would get, no body (RFC 9110 9.3.2).
                await stream.send_all(head if method == b"HEAD" else head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
