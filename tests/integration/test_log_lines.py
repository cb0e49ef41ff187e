"""The daemon's log lines about its clients, from real daemon processes:
a client cannot flood the log, the count of the lines left out is never
lost, and a line about a connection says what went wrong and who the
client is (PROTOCOL.md §3.2's ``client=`` label; a unix client's uid and
pid)."""

from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from phpsess.server import ADMIN_RESERVED_CONNECTIONS
from tests.conftest import Daemon
from tests.integration.test_cluster import Cluster, _create
from tests.server.test_conn_limits import _receive_exactly


def _connect(daemon: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(daemon.sock_path)
    return s


def _recv_all(s: socket.socket) -> bytes:
    """What the daemon sends until it closes the connection."""
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _events(log: str, event: str) -> list[dict[str, str]]:
    """The fields of each line of ``event`` (logfmt: quoted values whole)."""
    found = []
    for line in log.splitlines():
        if f" event={event} " in line or line.endswith(f" event={event}"):
            found.append(dict(part.split("=", 1) for part in shlex.split(line)[1:]))
    return found


def _accounted(daemon: Daemon, event: str) -> tuple[int, int]:
    """Lines of ``event`` logged, and the sum of the counts of those left out
    (``event=<event>_not_logged count=N``)."""
    log = daemon.log()
    left_out = sum(int(f["count"]) for f in _events(log, f"{event}_not_logged"))
    return len(_events(log, event)), left_out


def _wait_accounted(daemon: Daemon, event: str, total: int) -> tuple[int, int]:
    """Wait (bounded) until every one of ``total`` events is either logged or
    counted as left out; the two numbers."""
    deadline = time.monotonic() + 20
    while True:
        logged, left_out = _accounted(daemon, event)
        if logged + left_out >= total:
            assert logged + left_out == total, (logged, left_out, daemon.log()[-3000:])
            return logged, left_out
        assert time.monotonic() < deadline, (
            f"{event}: {logged} logged + {left_out} counted as left out, not {total}:\n"
            + daemon.log()[-3000:]
        )
        time.sleep(0.05)


def _hold_every_slot(daemon: Daemon, max_connections: int) -> list[socket.socket]:
    """Connections that take every slot (the test runs as root, who has a few
    more for the admin CLI)."""
    held = []
    for _ in range(max_connections + ADMIN_RESERVED_CONNECTIONS):
        s = _connect(daemon)
        s.sendall(b"HELLO 1\n")
        _receive_exactly(s, b"OK 1\n")
        held.append(s)
    return held


def _refused(daemon: Daemon, count: int) -> None:
    for _ in range(count):
        with _connect(daemon) as s:
            assert _recv_all(s).startswith(b"ERR BUSY ")


def test_a_flood_of_bad_frames_logs_a_few_lines_a_second_and_counts_the_rest(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # Connect, send a bad frame, close, in a loop: a line each, about 5,000
    # lines a second.  A few lines a second now; none is left uncounted.
    daemon = start_daemon(*storage_args)
    total = 300
    for _ in range(total):
        with _connect(daemon) as s:
            s.sendall(b"\x00\n")
            assert _recv_all(s).startswith(b"ERR BAD_FRAME ")
    logged, left_out = _wait_accounted(daemon, "protocol_error", total)
    assert logged <= total // 3 and left_out > 0, (logged, left_out)


def test_connections_idle_at_once_log_a_few_lines_a_second_and_count_the_rest(
    start_daemon: Any,
) -> None:
    # 1,500 connections idle since their HELLO gave 1,500 lines at once.
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "2")
    total = 200
    socks = [_connect(daemon) for _ in range(total)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"HELLO 1 client=fpm:%d\n" % i)
        for s in socks:
            _receive_exactly(s, b"OK 1\n")
        for s in socks:
            s.settimeout(20)
            assert _recv_all(s) == b"", "not closed for the idle timeout"
    finally:
        for s in socks:
            s.close()
    logged, left_out = _wait_accounted(daemon, "idle_timeout", total)
    assert logged <= total // 3 and left_out > 0, (logged, left_out)
    # Each says who the client was: its HELLO's label, its uid and pid.
    line = _events(daemon.log(), "idle_timeout")[0]
    assert line["client"].startswith("fpm:"), line
    assert (line["peer"], line["uid"], line["pid"]) == (
        "unix", str(os.getuid()), str(os.getpid())
    ), line


def test_the_count_of_a_burst_left_out_is_logged_once_it_is_over(start_daemon: Any) -> None:
    # The lines left out used to be counted only on the next line of their
    # kind: 334 handshake timeouts gave 10 lines and nothing about the
    # other 324.  Refused connections, throttled the same way, here.
    daemon = start_daemon("--memory-only", "--max-connections", "2")
    held = _hold_every_slot(daemon, 2)
    try:
        total = 60
        _refused(daemon, total)
        logged, left_out = _wait_accounted(daemon, "connection_refused", total)
    finally:
        for s in held:
            s.close()
    assert 1 <= logged < total and left_out > 0, (logged, left_out)
    (line,) = _events(daemon.log(), "connection_refused_not_logged")
    assert line["reason"] == "max_connections" and line["count"] == str(left_out), line
    # Who was refused.
    refused = _events(daemon.log(), "connection_refused")[0]
    assert (refused["uid"], refused["pid"]) == (str(os.getuid()), str(os.getpid())), refused


def test_the_lines_left_out_just_before_a_stop_are_counted_at_the_stop(
    start_daemon: Any,
) -> None:
    daemon = start_daemon("--memory-only", "--max-connections", "2")
    held = _hold_every_slot(daemon, 2)
    total = 60
    try:
        _refused(daemon, total)
        daemon.signal(signal.SIGTERM)  # within the second of the burst
        assert daemon.wait() == 0
    finally:
        for s in held:
            s.close()
    logged, left_out = _accounted(daemon, "connection_refused")
    assert (logged + left_out, left_out > 0) == (total, True), (logged, left_out)


def test_a_protocol_error_line_says_what_was_wrong_and_who_sent_it(
    start_daemon: Any, storage_args: list[str]
) -> None:
    # The line said `code=BAD_FRAME` and `peer=unix` only, while the client
    # got a sentence saying what was wrong; and the label its HELLO gave
    # "for logs" (PROTOCOL.md §3.2) was logged nowhere.
    daemon = start_daemon(*storage_args)
    label = 'fpm:"www"=7'  # one token, quoted in the log
    with _connect(daemon) as s:
        s.sendall(b"HELLO 1 client=%s\n" % label.encode())
        _receive_exactly(s, b"OK 1\n")
        s.sendall(b"\x00\n")
        reply = _recv_all(s).decode()
    assert reply.startswith("ERR BAD_FRAME ")
    sentence = reply.removeprefix("ERR BAD_FRAME ").rstrip("\n")
    deadline = time.monotonic() + 10
    while not (lines := _events(daemon.log(), "protocol_error")):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    (line,) = lines
    assert line["code"] == "BAD_FRAME" and line["client"] == label, line
    # At most 100 characters of it, so that the line stays short.
    assert line["reason"] == (sentence if len(sentence) <= 100 else sentence[:97] + "..."), line
    assert (line["peer"], line["uid"], line["pid"]) == (
        "unix", str(os.getuid()), str(os.getpid())
    ), line


class _AlwaysFsyncCluster(Cluster):
    """Every copy a backup acknowledges is on its disk (a kill -9 keeps it)."""

    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--fsync", "always"]


@pytest.mark.xdist_group("cluster")
def test_a_restart_in_a_cluster_says_how_many_restored_sessions_are_kept(
    workdir: Path,
) -> None:
    # `event=restored sessions=3` beside `event=cluster_restored
    # dropped_backup_copies=3` read as 3 restored, when none was kept.
    cluster = _AlwaysFsyncCluster(workdir, names=("a", "b"))
    try:
        for i in range(3):
            _create(cluster, "a", b"n|i:%d;" % i)  # a masters them, b backs them up
        b = cluster.nodes["b"]
        b.kill9()
        b.start()
        restored = _events(b.log(), "restored")[-1]
        assert (restored["sessions"], restored["kept"]) == ("3", "0"), restored
        assert _events(b.log(), "cluster_restored")[-1]["dropped_backup_copies"] == "3"
    finally:
        cluster.stop()


@pytest.mark.xdist_group("cluster")
def test_a_restarted_node_finding_its_copies_stale_logs_a_few_lines_and_counts_the_rest(
    workdir: Path,
) -> None:
    # A restarted node whose sessions were taken over logged one
    # `stale_copy_dropped` line per session it had mastered (soak review):
    # a million lines for a million sessions.  Three nodes: the takeover
    # finds a new backup at once, so nothing is re-copied to a when it
    # rejoins, and a's own check finds every copy stale.
    cluster = _AlwaysFsyncCluster(workdir, names=("a", "b", "c"))
    try:
        for i in range(30):
            _create(cluster, "a", b"n|i:%d;" % i)  # a masters them
        a = cluster.nodes["a"]
        a.kill9()
        deadline = time.monotonic() + 20
        while not all("event=takeover peer=a" in cluster.nodes[n].log() for n in "bc"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        a.start()
        logged, counted = _wait_accounted(a, "stale_copy_dropped", 30)
        # At most 10 lines a second (however slowly the checks come on a
        # busy machine); some were left out and counted.
        seconds = math.ceil(time.monotonic() - started)
        assert counted > 0 and logged <= 10 * (seconds + 1), (logged, counted, seconds)
    finally:
        cluster.stop()
