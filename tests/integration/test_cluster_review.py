"""Cluster faults found in review, reproduced with real daemon processes
(CLUSTER.md §8, §9)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from phpsess import cluster as cl
from phpsess import protocol as p
from phpsess.addresses import TcpAddress, UnixAddress
from phpsess.client import Client
from phpsess.journal import Op
from phpsess.membership import Heartbeat
from phpsess.replica import MASTER, Meta
from phpsess.server import Server, ServerConfig
from tests.conftest import Daemon
from tests.integration.test_cluster import DEAD_AFTER_MS, Cluster, _create, _Nft
from tests.integration.test_cluster import cluster as cluster  # the fixture
from tests.integration.test_cluster import cluster_fsync_always as cluster_fsync_always

# Their daemons time failure detection: one worker runs them one after
# another (scripts/test runs the rest on two).
pytestmark = pytest.mark.xdist_group("cluster")


def _read(cluster: Cluster, via: str, sid: str) -> p.Reply:
    with Client(cluster.nodes[via].address, timeout_s=30) as c:
        return c.request(p.Read(sid, lock=False))


def test_drain_right_after_the_backup_crashed_hands_sessions_to_a_live_peer(
    cluster: Cluster,
) -> None:
    # Sessions mastered on c; the backup of some of them is killed (not yet
    # detected) and c is told to drain 0.2 s later: the HANDOFF to the dead
    # backup fails, and c must hand those sessions to the survivor instead.
    values = {_create(cluster, "c", f"n|i:{i};".encode()): f"n|i:{i};".encode()
              for i in range(10)}
    backups = sorted({sid.rsplit("-", 1)[1] for sid in values})
    crashed = backups[0]
    survivor = next(n for n in ("a", "b") if n != crashed)
    cluster.nodes[crashed].kill9()
    time.sleep(0.2)
    c = cluster.nodes["c"]
    c.signal(signal.SIGTERM)
    assert c.wait(30) == 0
    log = c.log()
    # Every acknowledged session is readable through the survivor.
    lost = {sid: r for sid in values if (r := _read(cluster, survivor, sid)) != p.Data(values[sid])}
    assert lost == {}, log
    assert "event=drained handed_over=10" in log, log


def test_a_draining_node_is_not_declared_dead_while_a_peer_is_paused(
    cluster: Cluster,
) -> None:
    # c hangs (SIGSTOP), a drains while b forwards writes to it.  The drainer
    # refused the forwarded connections' HELLO (SHUTTING_DOWN), so b suspected
    # it, and b's probe never got an answer (PING before HELLO): a was
    # declared dead mid-drain, its sessions failed over instead of being
    # handed off, and with c paused acknowledged writes were lost.
    sids = [_create(cluster, "a", b"n|i:0;") for _ in range(3)]
    acks: dict[str, int] = dict.fromkeys(sids, 0)
    errors: list[str] = []
    stop = threading.Event()

    def writer(sid: str) -> None:
        while not stop.is_set():
            with Client(cluster.nodes["b"].address, timeout_s=30) as c:
                got = c.request(p.Read(sid))
                if not isinstance(got, p.Data):
                    errors.append(f"{sid}: {got}")
                    time.sleep(0.05)
                    continue
                n = int(got.data.decode().removeprefix("n|i:").rstrip(";")) + 1
                if c.request(p.Write(sid, 1440, f"n|i:{n};".encode())) == p.OK:
                    acks[sid] = n

    threads = [threading.Thread(target=writer, args=(sid,)) for sid in sids]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        cluster.nodes["c"].signal(signal.SIGSTOP)
        time.sleep(0.2)
        a = cluster.nodes["a"]
        a.signal(signal.SIGTERM)
        assert a.wait(40) == 0
        time.sleep(1)  # writes go on through b, to the new masters
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        cluster.nodes["c"].signal(signal.SIGCONT)
    assert "event=drained handed_over=" in a.log(), a.log()
    # Not declared dead before its drain was done.  Once a has drained and
    # closed its port, b may declare it dead (nothing left to take over): a
    # request b sent it as it exited was refused, and the probe then too.
    drained = re.search(r"^(\S+) level=info event=drained ", a.log(), re.M)
    dead = re.search(r"^(\S+) level=warning event=peer_dead peer=a$", cluster.nodes["b"].log(),
                     re.M)
    assert drained is not None
    assert dead is None or dead[1] >= drained[1], (
        cluster.nodes["b"].log() + "\n--- a:\n" + a.log()
    )
    for sid in sids:
        assert acks[sid] > 0
        got = _read(cluster, "b", sid)
        assert isinstance(got, p.Data) and int(got.data[4:-1]) >= acks[sid], (sid, got, acks)


def test_drain_with_every_peer_dead_ends_at_once_and_keeps_the_sessions_on_disk(
    workdir: Path,
) -> None:
    # Nobody to hand sessions to: waiting for the drain deadline cannot help,
    # so the drain ends at once, and the sessions stay in the data directory.
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        values = {_create(cluster, "a", f"n|i:{i};".encode()): f"n|i:{i};".encode()
                  for i in range(5)}
        a = cluster.nodes["a"]
        cluster.nodes["b"].kill9()
        deadline = time.monotonic() + 15
        while "event=peer_dead peer=b" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        started = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        assert time.monotonic() - started < 10, "waited for the drain deadline (20 s)"
        assert "event=drain_alone masters=5" in a.log()
        a.start()
        assert "event=restored sessions=5 " in a.log()
        sid, value = next(iter(values.items()))
        assert _read(cluster, "a", sid) == p.Data(value)
    finally:
        cluster.stop()


class _QuickStopCluster(Cluster):
    """Nodes that wait 1 s, not 10, for their own connections holding locks
    once the drain's hand-over ends (--shutdown-timeout-s)."""

    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--shutdown-timeout-s", "1"]


@pytest.mark.parametrize("taken", ["just_after_sigterm", "before_sigterm"])
def test_a_lock_held_through_a_peer_while_its_master_drains_is_honoured(
    workdir: Path, taken: str,
) -> None:
    # A request on another node takes X's lock through its master b just
    # after b got SIGTERM (or before, and holds it past b's 1 s for its own
    # connections).  b handed X over with the lock still held: a second
    # request got the lock from the new master at once, and the first one's
    # write then failed LOCKED.  The drain must hand X over only once the
    # lock is free, and grant no new lock on it meanwhile (CLUSTER.md §8).
    cluster = _QuickStopCluster(workdir)
    try:
        sid = _create(cluster, "b", b"v1")
        backup = sid.rsplit("-", 1)[1]  # where the drain hands X over
        other = next(n for n in ("a", "c") if n != backup)
        b = cluster.nodes["b"]
        with Client(cluster.nodes[other].address, timeout_s=30) as first:
            if taken == "before_sigterm":
                assert first.request(p.Read(sid, lock=True)) == p.Data(b"v1")
            b.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while "event=stopping" not in b.log():
                assert time.monotonic() < deadline, b.log()
                time.sleep(0.01)
            if taken == "just_after_sigterm":
                assert first.request(p.Read(sid, lock=True)) == p.Data(b"v1")
            # Past the point where b began the hand-over and would have
            # handed X over.
            while "event=peer_draining peer=b" not in cluster.nodes[backup].log():
                assert time.monotonic() < deadline, cluster.nodes[backup].log()
                time.sleep(0.01)
            time.sleep(1)
            got: list[p.Reply] = []
            with Client(cluster.nodes[backup].address, timeout_s=30) as second:
                waiter = threading.Thread(
                    target=lambda: got.append(second.request(p.Read(sid, lock=True)))
                )
                waiter.start()
                waiter.join(1)
                assert got == [], "a second request got the lock the first one holds"
                assert first.request(p.Write(sid, 1440, b"first")) == p.OK
                waiter.join(10)
                assert got == [p.Data(b"first")], b.log()
                assert second.request(p.Write(sid, 1440, b"second")) == p.OK
        assert b.wait(30) == 0
        assert "event=drained handed_over=1" in b.log(), b.log()
        assert _read(cluster, other, sid) == p.Data(b"second")
    finally:
        cluster.stop()


def test_a_node_restarted_while_its_peer_stays_down_serves_its_sessions_degraded(
    workdir: Path,
) -> None:
    # The power goes out on both nodes and only a comes back.  b, never
    # heard since a's start, used to stay "unknown" for ever: every read of a
    # session it backed up waited 6 s for it, and every write failed
    # UNAVAILABLE.  Now a probes it after the detection time, declares it
    # dead and goes on degraded (CLUSTER.md §3, §6), as after any death.
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        sids = [_create(cluster, "a", f"n|i:{i};".encode()) for i in range(5)]
        time.sleep(0.5)  # past --fsync interval's window
        for daemon in cluster.nodes.values():
            daemon.kill9()
        a = cluster.nodes["a"]
        a.start()
        with Client(a.address, timeout_s=30) as c:
            for sid in sids:
                assert c.request(p.Write(sid, 1440, b"n|i:99;")) == p.OK, a.log()
        assert "event=peer_absent peer=b" in a.log()
        stats = cluster.stats("a")["cluster"]
        assert stats["degraded"] is True and stats["peers"]["b"]["state"] == "dead"
        # b comes back: it joins, and a gives every session its second copy.
        cluster.nodes["b"].start()
        cluster.wait_formed()
        deadline = time.monotonic() + 15
        while cluster.stats("b")["sessions"] < len(sids):
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        a.kill9()
        assert {sid: _read(cluster, "b", sid) for sid in sids} == dict.fromkeys(
            sids, p.Data(b"n|i:99;")
        )
    finally:
        cluster.stop()


def _in_process_cluster(tmp_path: Path) -> cl.Cluster:
    """Node a of a, b, c, in this process (no sockets: a test replaces
    ``call``), having heard a heartbeat from b and c."""
    server = Server(ServerConfig(listen=(UnixAddress(str(tmp_path / "s.sock")),)))
    config = cl.ClusterConfig(
        "a", TcpAddress("127.0.0.1", 1),
        (("b", TcpAddress("127.0.0.1", 2)), ("c", TcpAddress("127.0.0.1", 3))),
        secret=b"s" * 32, heartbeat_s=0.25, dead_after_s=1.5,
    )
    cluster = cl.Cluster(config, server)
    for peer in ("b", "c"):
        cluster.membership.receive(Heartbeat(peer, 1, 0, 0, False, ()), trio.current_time())
    return cluster


async def test_a_request_served_first_after_a_stall_is_verified_not_served_stale(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    # In-process and deterministic: node a masters a session, then its loop
    # stalls (SIGSTOP) past detection while b takes the session over at a
    # newer epoch.  After the resume the heartbeat task has not run yet: a
    # client's request comes first (resolve).  It must not be served from
    # a's stale copy (CLUSTER.md §3, §7).
    cluster = _in_process_cluster(tmp_path)
    server, config = cluster.server, cluster.config
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    server.engine.store.put(sid, b"v=1;", 1440, now)
    cluster.replicas.meta[sid] = Meta(MASTER, "a", "b", 1, 1)
    asked: list[tuple[str, p.Request]] = []

    async def call(node: str, request: p.Request) -> p.Reply:
        asked.append((node, request))
        if node == "b" and isinstance(request, p.Where):
            return p.Data(b"v=2;", ("master", "2", "1", "1440000"))
        return p.MISS

    cluster.call = call  # type: ignore[method-assign]
    # No stall: served here, with no question asked (the hot path).
    assert await cluster.resolve(sid) == "a"
    assert asked == []
    await trio.sleep(2 * config.dead_after_s)  # the stall: nothing else runs
    assert await cluster.resolve(sid) == "b"
    assert server.engine.store.get(sid, trio.current_time()) is None
    assert ("b", p.Where(sid)) in asked


def test_a_host_without_the_secret_holding_connections_open_cannot_cut_the_peers_off(
    cluster: Cluster,
) -> None:
    # Every unauthenticated handshake used to share 64 slots: a host without
    # the secret that opened 64 connections and said nothing (renewing them
    # every 5 s) left no slot for the peers, and every request forwarded to
    # a failed UNAVAILABLE.  Connections from the peers' addresses now have
    # their own slots; any other address gets a few (CLUSTER.md §4).
    sid = _create(cluster, "a", b"n|i:1;")
    port = cluster.ports["a"]
    held: list[socket.socket] = []
    try:
        for _ in range(100):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
        time.sleep(0.5)
        # b has no link to a yet: forwarding opens one (a new handshake).
        assert _read(cluster, "b", sid) == p.Data(b"n|i:1;")
        assert _read(cluster, "c", sid) == p.Data(b"n|i:1;")
        log = cluster.nodes["a"].log()
        # Refused, and logged without flooding the log.
        assert "event=peer_refused reason=too_many_handshakes peer=127.0.0.2" in log
        assert log.count("event=peer_refused") <= 2, log
    finally:
        for s in held:
            s.close()


def test_a_node_restarted_before_detection_never_serves_a_copy_a_takeover_made_stale(
    workdir: Path,
) -> None:
    # a is killed and back before its peers notice, and its heartbeats are
    # lost for a while (dropped here with nftables): it verifies its copies
    # with b and c over TCP, who still take it for its old incarnation and
    # answer as backups.  When its heartbeats get through, they declare the
    # old incarnation dead and take its sessions over: a second master, and
    # a served the copies it had verified, stale after the next write
    # elsewhere.  Now the incarnation a names in its TCP handshake counts:
    # they take over before answering a (CLUSTER.md §3, §4, §7).
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
    cluster = Cluster(workdir, hosts=hosts)
    nft = _Nft()
    try:
        sids = [_create(cluster, "a", b"n|i:0;") for _ in range(6)]
        time.sleep(0.5)  # past --fsync interval's window
        nft.drop_udp_from(hosts["a"])
        a = cluster.nodes["a"]
        a.kill9()
        a.start()
        for sid in sids:
            assert _read(cluster, "a", sid) == p.Data(b"n|i:0;")
        nft.close()
        time.sleep(2 * DEAD_AFTER_MS / 1000)  # its heartbeats arrive
        for sid in sids:
            holder = sid.rsplit("-", 1)[1]  # the backup named at creation
            with Client(cluster.nodes[holder].address, timeout_s=30) as c:
                assert c.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
        stale = {sid: r for sid in sids if (r := _read(cluster, "a", sid)) != p.Data(b"n|i:1;")}
        assert stale == {}, cluster.nodes["a"].log()
    finally:
        nft.close()
        cluster.stop()


def test_a_restarted_node_does_not_write_alone_past_a_paused_peer_it_never_heard(
    workdir: Path,
) -> None:
    # b is paused (SIGSTOP: its port still accepts, nothing answers) while a
    # restarts.  Declared dead unheard, b could never learn it, and on resume
    # would take a's sessions over with its older copies, dropping writes a
    # took alone.  So a keeps b unknown: its copies are read at once, and a
    # write that b must back up fails rather than being acknowledged
    # (CLUSTER.md §3, §10).  Once b resumes, all is consistent.
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        sid = _create(cluster, "a", b"n|i:1;")
        time.sleep(0.5)  # past --fsync interval's window
        b = cluster.nodes["b"]
        b.signal(signal.SIGSTOP)
        a = cluster.nodes["a"]
        a.kill9()
        before = len(a.log())
        a.start()
        assert _read(cluster, "a", sid) == p.Data(b"n|i:1;")
        with Client(a.address, timeout_s=60) as c:
            refused = c.request(p.Write(sid, 1440, b"n|i:2;"))
        assert isinstance(refused, p.Error) and refused.code is p.Code.UNAVAILABLE, refused
        since = a.log()[before:]
        assert "event=peer_absent" not in since and "event=peer_dead" not in since, since
        b.signal(signal.SIGCONT)
        # Until a hears b again, a write on a may still be refused with a
        # "retry" (b took the session over): never acknowledged and lost.
        # (The log runs on across the restart: look at this run's part.)
        deadline = time.monotonic() + 15
        while "event=peer_alive peer=b" not in a.log()[before:]:
            assert time.monotonic() < deadline, a.log()[before:]
            time.sleep(0.05)
        # One master again, and the write that counts goes through.
        with Client(a.address, timeout_s=60) as c:
            assert c.request(p.Write(sid, 1440, b"n|i:3;")) == p.OK
        assert _read(cluster, "a", sid) == _read(cluster, "b", sid) == p.Data(b"n|i:3;")
    finally:
        cluster.nodes["b"].signal(signal.SIGCONT)
        cluster.stop()


async def test_a_peer_cannot_send_copies_of_sessions_it_does_not_master(tmp_path: Path) -> None:
    # Authenticated as c, a REPL naming a as master overwrote a's own master
    # copy (and made a its own backup); naming b, b's session.
    cluster = _in_process_cluster(tmp_path)
    store = cluster.server.engine.store
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    store.put(sid, b"v=1;", 1440, now)
    cluster.replicas.meta[sid] = Meta(MASTER, "a", "b", 1, 1)
    for master in ("a", "b"):
        for request in (
            p.ReplPut(sid, master, 1, 99, 60, b"xyz"), p.ReplDelete(sid, master, 1, 99)
        ):
            reply = cluster.handle_peer("c", request, now)
            assert isinstance(reply, p.Error) and reply.code is p.Code.BAD_REQUEST, reply
    entry = store.get(sid, now)
    assert entry is not None and entry.data == b"v=1;"
    assert cluster.replicas.meta[sid] == Meta(MASTER, "a", "b", 1, 1)
    # Its own sessions' copies it may send.
    theirs = "abcdefghijklmnopqrstu-c-a"
    assert cluster.handle_peer("c", p.ReplPut(theirs, "c", 1, 1, 60, b"c=1;"), now) == p.OK
    entry = store.get(theirs, now)
    assert entry is not None and entry.data == b"c=1;"


def test_where_replies_out_of_range_are_ignored() -> None:
    # A lying peer's WHERE: a lifetime the journal cannot hold stopped the
    # daemon (struct.error), an epoch past what REPL carries wedged the
    # session (every write UNAVAILABLE).
    top = str(p.MAX_START_COUNTER)
    year_ms = str(p.MAX_TTL_S * 1000)
    assert cl._where_tokens(("master", top, top, year_ms)) == (
        "master", p.MAX_START_COUNTER, p.MAX_START_COUNTER, p.MAX_TTL_S * 1000
    )
    # ... and the highest it takes leaves room for the REPLs that carry it
    # on (it used to take up to 10^18 - 1, which the next write's REPL
    # could no longer carry: CLUSTER.md §11.4).
    after = p.MAX_START_COUNTER + p.COUNTER_HEADROOM
    parser = p.RequestParser(1024, peer=True)
    parser.receive_data(f"REPL s1-a-b a {after} {after} 60 1\nx".encode())
    assert parser.next_event() == p.ReplPut("s1-a-b", "a", after, after, 60, b"x")
    for tokens in (
        ("master", "1", "1", str(p.MAX_TTL_S * 1000 + 1)),
        ("backup", "1", "1", "1000000000000000000"),
        ("master", str(p.MAX_START_COUNTER + 1), "1", "1"),
        ("backup", "1", str(p.MAX_COUNTER), "1"),
        ("master", "1", "9999999999999999999", "1"),
        ("master", "1", "1", "-1"),
        ("master", "1", "1", "١٢"),  # digits, but not ASCII
        ("boss", "1", "1", "1"),
        ("master", "1", "1"),
    ):
        assert cl._where_tokens(tokens) is None, tokens


async def test_a_session_left_alone_while_its_only_peer_was_suspect_is_copied_again(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    # a masters a session backed up by b.  b dies while c is suspect (not
    # alive: it cannot be picked), so the session goes on alone.  c then
    # answers: suspect to alive is no event, and the session stayed single-
    # copy for good, writes acknowledged alone (lost when a died later).
    cluster = _in_process_cluster(tmp_path)
    store, membership = cluster.server.engine.store, cluster.membership
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    store.put(sid, b"v=1;", 1440, now)
    cluster.replicas.meta[sid] = Meta(MASTER, "a", "b", 1, 1)
    sent: list[tuple[str, p.Request]] = []

    async def call(node: str, request: p.Request) -> p.Reply:
        sent.append((node, request))
        return p.OK

    cluster.call = call  # type: ignore[method-assign]
    membership.suspect("c")
    membership.suspect("b")
    assert membership.probe_result("b", False, trio.current_time(), refused=True)  # dead
    cluster._take_over("b")
    assert cluster.replicas.meta[sid].backup is None  # alone
    assert await cluster.replicate([(Op.PUT, sid, 1440, b"v=2;")]) is None
    assert sent == []  # acknowledged alone: nobody to copy to
    membership.receive(Heartbeat("c", 1, 0, 0, False, ()), trio.current_time())  # c answers
    # The next write copies to c before it is acknowledged.
    store.put(sid, b"v=3;", 1440, trio.current_time())
    assert await cluster.replicate([(Op.PUT, sid, 1440, b"v=3;")]) is None
    assert cluster.replicas.meta[sid].backup == "c"
    assert [(node, type(request)) for node, request in sent] == [("c", p.ReplPut)]
    # And without a write, the heartbeat task copies what is left alone.
    other = "bcdefghijklmnopqrstuv-a-b"
    store.put(other, b"w=1;", 1440, trio.current_time())
    cluster.replicas.meta[other] = Meta(MASTER, "a", None, 1, 1)
    cluster._maybe_degraded = True
    sent.clear()
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery
        cluster._recopy_when_possible()  # as the heartbeat task does
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert cluster.replicas.meta[other].backup == "c"
    assert ("c", p.ReplPut) in [(node, type(request)) for node, request in sent]


def test_ipv6_cluster_addresses_are_refused_in_words(workdir: Path) -> None:
    # The heartbeat socket is IPv4: an IPv6 --cluster-listen failed with
    # "Address family for hostname not supported", an IPv6 --peer was
    # silently never heard.
    assert cl.parse_peer("b=10.0.0.2:7701") == ("b", TcpAddress("10.0.0.2", 7701))
    with pytest.raises(ValueError, match="cluster addresses are IPv4"):
        cl.parse_peer("b=[::1]:7701")
    secret = workdir / "secret"
    secret.write_text("s" * 32)
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--memory-only",
         "--listen", f"unix:{workdir}/s.sock", "--node", "a", "--cluster-listen", "[::1]:7799",
         "--peer", "b=127.0.0.1:7798", "--cluster-secret-file", str(secret)],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=30,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "[cluster] listen (--cluster-listen), [::1]:7799: cluster addresses are IPv4 " \
        "in this version" in proc.stderr, proc.stderr
    # check-config says so too, rather than "ok" for a file that serve
    # refuses (it checked peers only).
    conf = workdir / "v6.toml"
    conf.write_text(f'[cluster]\nnode = "a"\nlisten = "[::1]:7799"\nsecret_file = "{secret}"\n'
                    '[cluster.peers]\nb = "127.0.0.1:7798"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "check-config", str(conf)],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=30,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "cluster addresses are IPv4 in this version" in proc.stderr, proc.stderr


def test_a_forwarded_write_whose_lock_went_with_a_broken_link_gets_lock_lost(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §5.3, §7.  Y, a client of c, holds the lock of a session
    # mastered on a (through c's forwarded link).  c freezes with Y's WRITE
    # queued; a declares c dead and drops the link, and Y's lock with it; Z
    # writes three times under the lock meanwhile, all acknowledged.  When c
    # resumed, it sent Y's WRITE again on a new link, and a accepted it
    # without the lock: the session went back from n|i:3; to n|i:1;.
    sid = _create(cluster, "a", b"n|i:0;")
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    y = Client(c.address, timeout_s=30)
    got: list[p.Reply] = []
    writer = threading.Thread(target=lambda: got.append(y.request(p.Write(sid, 1440, b"n|i:1;"))))
    try:
        assert y.request(p.Read(sid)) == p.Data(b"n|i:0;")  # forwarded to a, locked
        c.signal(signal.SIGSTOP)
        try:
            writer.start()
            deadline = time.monotonic() + 4 * DEAD_AFTER_MS / 1000
            while "event=peer_dead peer=c" not in a.log():
                assert time.monotonic() < deadline, a.log()
                time.sleep(0.05)
            with Client(a.address, wait_ms=5000, timeout_s=30) as z:
                for n in (1, 2, 3):
                    assert z.request(p.Read(sid)) == p.Data(f"n|i:{n - 1};".encode())
                    assert z.request(p.Write(sid, 1440, f"n|i:{n};".encode())) == p.OK
        finally:
            c.signal(signal.SIGCONT)
        writer.join(30)
        assert len(got) == 1 and isinstance(got[0], p.Error), got
        assert got[0].code is p.Code.LOCK_LOST, got
        for name in ("a", "b", "c"):
            with Client(cluster.nodes[name].address, timeout_s=30) as r:
                assert r.request(p.Read(sid, lock=False)) == p.Data(b"n|i:3;"), name
        # One error, as for a revoked lease: a new locking READ starts afresh.
        assert y.request(p.Read(sid)) == p.Data(b"n|i:3;")
        assert y.request(p.Write(sid, 1440, b"n|i:4;")) == p.OK
    finally:
        y.close()


def _wait_log(daemon: Daemon, text: str, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


def test_a_lock_waiter_on_a_paused_master_is_not_granted_its_stale_copy(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §3: Y holds S's lock on its master a, X waits for it there;
    # a is paused past detection, b takes S over and W writes n|i:1; through
    # it; Y's process ends during the pause.  On resume X used to be granted
    # the lock straight from a's wait queue with the stale n|i:0; (or MISS),
    # unchecked, and its increment then went through: an acknowledged write
    # lost.  X must get the current value or an error, never the stale copy.
    sid = _create(cluster, "a", b"n|i:0;")
    a = cluster.nodes["a"]
    y = Client(a.address, timeout_s=30)
    x = Client(a.address, timeout_s=30)
    got: list[p.Reply | Exception] = []

    def waiter() -> None:
        try:
            got.append(x.request(p.Read(sid, lock=True)))
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=waiter)
    try:
        assert y.request(p.Read(sid, lock=True)) == p.Data(b"n|i:0;")
        thread.start()
        deadline = time.monotonic() + 5
        while cluster.stats("a")["locks_waiting"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        a.signal(signal.SIGSTOP)
        try:
            _wait_log(cluster.nodes["b"], "event=takeover peer=a")
            with Client(cluster.nodes["b"].address, timeout_s=30) as w:
                assert w.request(p.Read(sid, lock=True)) == p.Data(b"n|i:0;")
                assert w.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
            y.close()  # Y's PHP process ends while a is paused
            time.sleep(0.2)
        finally:
            a.signal(signal.SIGCONT)
        thread.join(20)
        assert got, "X got no answer"
        reply = got[0]
        assert reply not in (p.Data(b"n|i:0;"), p.MISS), reply
        assert isinstance(reply, (p.Data, p.Error)), reply
        if isinstance(reply, p.Data):
            assert reply == p.Data(b"n|i:1;")
            assert x.request(p.Write(sid, 1440, b"n|i:2;")) == p.OK
            expected = b"n|i:2;"
        else:
            assert reply.code is p.Code.UNAVAILABLE, reply
            expected = b"n|i:1;"
    finally:
        a.signal(signal.SIGCONT)
        x.close()
        y.close()
    for name in ("a", "b", "c"):
        assert _read(cluster, name, sid) == p.Data(expected), name


def test_a_lock_held_across_a_pause_does_not_make_the_resumed_node_serve_it_empty(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §7: Y holds S's lock on its master a when a is paused past
    # detection; b takes S over and W writes n|i:1; through it.  a resumes,
    # learns it was declared dead and drops its copies, but Y's lock stayed
    # in its engine, and a took "a lock is held here" for a session being
    # started here: it served S from its empty store (MISS).
    sid = _create(cluster, "a", b"n|i:0;")
    a = cluster.nodes["a"]
    y = Client(a.address, timeout_s=30)
    try:
        assert y.request(p.Read(sid, lock=True)) == p.Data(b"n|i:0;")
        a.signal(signal.SIGSTOP)
        try:
            _wait_log(cluster.nodes["b"], "event=takeover peer=a")
            with Client(cluster.nodes["b"].address, timeout_s=30) as w:
                assert w.request(p.Read(sid, lock=True)) == p.Data(b"n|i:0;")
                assert w.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
        finally:
            a.signal(signal.SIGCONT)
        _wait_log(a, "event=declared_dead_by_peers")
        for name in ("a", "b", "c"):
            assert _read(cluster, name, sid) == p.Data(b"n|i:1;"), name
        # Y's late write, made from the stale n|i:0;, is not acknowledged
        # (it would undo W's): its lock went with a's copy.
        late: p.Reply | Exception
        try:
            late = y.request(p.Write(sid, 1440, b"n|i:99;"))
        except Exception as exc:
            late = exc
        assert late != p.OK
        # A lock taken through a is the new master's, not one queued behind
        # Y's stale lock.
        with Client(a.address, timeout_s=30, wait_ms=3000) as z:
            assert z.request(p.Read(sid, lock=True)) == p.Data(b"n|i:1;")
            assert z.request(p.Write(sid, 1440, b"n|i:2;")) == p.OK
    finally:
        a.signal(signal.SIGCONT)
        y.close()
    for name in ("a", "b", "c"):
        assert _read(cluster, name, sid) == p.Data(b"n|i:2;"), name


def test_a_session_created_right_after_a_resume_from_a_pause_has_one_master(
    cluster: Cluster,
) -> None:
    # A node resumed from a pause longer than detection learns that it was
    # declared dead, rejoins as a new incarnation and masters new sessions
    # at once.  The first copy of one reached its backup before a's new
    # heartbeat did: the backup, still taking a for dead, stored the copy
    # as a dead master's and served the session itself.  Two masters: a
    # write through b and c was acknowledged, a's copy never saw it, and a
    # locked READ through a missed it, for as long as nobody wrote through
    # a (nemesis review, repro_resume_create.py).  A connection from a new
    # incarnation is now its rejoin (CLUSTER.md §3).
    a = cluster.nodes["a"]
    a.signal(signal.SIGSTOP)
    try:
        for name in "bc":  # however long a busy machine takes to notice
            _wait_log(cluster.nodes[name], "event=peer_dead peer=a", limit_s=20)
    finally:
        a.signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while "event=declared_dead_by_peers" not in a.log():
        assert time.monotonic() < deadline, a.log()
        time.sleep(0.01)
    sid = _create(cluster, "a", b"a")
    for via, add in (("b", b",b"), ("c", b",c")):
        with Client(cluster.nodes[via].address, timeout_s=20) as c:
            got = c.request(p.Read(sid, lock=True))
            assert isinstance(got, p.Data), got
            assert c.request(p.Write(sid, 1440, got.data + add)) == p.OK
    for via in ("a", "b", "c"):
        with Client(cluster.nodes[via].address, timeout_s=20) as c:
            got = c.request(p.Read(sid, lock=False))
            assert got == p.Data(b"a,b,c"), (via, got)
    held = _roles(cluster, sid, tuple(cluster.nodes))
    masters = [name for name, role in held.items() if role == "master"]
    assert masters == ["a"], masters


def test_a_session_destroyed_while_its_master_was_down_is_never_acknowledged_once(
    cluster_fsync_always: Cluster,
) -> None:
    # a masters the session; it is killed, its backup takes it over and the
    # session is destroyed there.  a restarts with its journaled copy.  Its
    # copies to the backup, which holds a tombstone of a later epoch, were
    # answered "OK" as duplicates and not stored: a write through a was
    # acknowledged with one copy, and the next kill -9 of a lost it (nemesis
    # review, repro_tombstone_ack.py).  Now the backup refuses them STALE,
    # a drops its copy, and the session made again is stored twice.
    cluster = cluster_fsync_always
    sid = _create(cluster, "a", b"v1")
    other = "c" if sid.endswith("-a-b") else "b"  # neither a nor its backup
    cluster.nodes["a"].kill9()
    with Client(cluster.nodes[other].address, timeout_s=20) as c:
        assert c.request(p.Read(sid, lock=True)) == p.Data(b"v1")
        assert c.request(p.Destroy(sid)) == p.OK
    cluster.nodes["a"].start()
    cluster.wait_formed()
    acknowledged = None
    for attempt in range(5):
        with Client(cluster.nodes[other].address, timeout_s=20) as c:
            got = c.request(p.Read(sid, lock=True))
            assert isinstance(got, (p.Data, p.Miss)), got
            value = f"after-{attempt}".encode()
            if c.request(p.Write(sid, 1440, value)) == p.OK:
                acknowledged = value
                break
    assert acknowledged is not None
    cluster.nodes["a"].kill9()
    with Client(cluster.nodes[other].address, timeout_s=20) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(acknowledged)


async def test_a_restored_copy_of_a_session_destroyed_since_is_dropped_not_served(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    # In-process and deterministic: a restarted with its journaled master
    # copy (1, 3) of a session that b took over meanwhile and destroyed at
    # (2, 4).  b holds no copy, only its tombstone, and answered WHERE
    # "MISS": a's check found nothing newer and served the destroyed
    # session (a logout undone), until its background re-copy was refused
    # (nemesis review).  b now says where it was deleted.
    cluster = _in_process_cluster(tmp_path)
    server = cluster.server
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    server.engine.store.put(sid, b"v=1;", 1440, now)
    cluster.replicas.adopt_restored(sid, Meta(MASTER, "a", "b", 1, 3))

    b = _in_process_cluster(tmp_path / "b")
    b.replicas.handoff(sid, 2, 3)
    b.replicas.local_change(sid, True, lambda: None)  # destroyed at (2, 4)
    deleted = b.handle_peer("c", p.Where(sid), now)
    assert deleted == p.Data(b"", ("deleted", "2", "4", "0"))

    async def call(node: str, request: p.Request) -> p.Reply:
        if node == "b" and isinstance(request, p.Where):
            return deleted
        return p.MISS

    cluster.call = call  # type: ignore[method-assign]
    await cluster.resolve(sid)
    assert server.engine.store.get(sid, trio.current_time()) is None
    assert cluster.replicas.where(sid) is None
    # Made again here, it starts above the destroy's epoch.
    repl = cluster.replicas.local_change(sid, False, lambda: None)
    assert repl is not None and repl.epoch == 3


async def test_a_backup_that_lies_about_a_destroy_cannot_wedge_a_session(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    # `ERR STALE - <epoch>` moves a client's write above that epoch
    # (CLUSTER.md §11.4).  From a peer that lies, an epoch the REPLs could
    # not carry would make every later write of the session fail: such a
    # reply is taken as a plain refusal, as a WHERE with such numbers is.
    cluster = _in_process_cluster(tmp_path)
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    lie = p.Error(p.Code.STALE, f"- {p.MAX_START_COUNTER + 1}")

    async def call(node: str, request: p.Request) -> p.Reply:
        return lie

    cluster.call = call  # type: ignore[method-assign]
    cluster.server.engine.store.put(sid, b"v=1;", 1440, now)
    refused = await cluster.replicate([(Op.PUT, sid, 1440, b"v=1;")])
    assert isinstance(refused, p.Error) and refused.code is p.Code.UNAVAILABLE, refused
    assert cluster.replicas.where(sid) is None
    repl = cluster.replicas.local_change(sid, False, lambda: None)
    assert repl is not None and repl.epoch == 1


def test_a_session_made_again_over_an_old_tombstone_survives_its_backups_death(
    cluster_fsync_always: Cluster,
) -> None:
    # S, created on a, is taken over by its backup when a dies with its data;
    # then destroyed: its master and backup keep tombstones.  The master
    # restarts (its tombstone, in memory, goes) and so does a: S is made
    # again through a, below the destroy's epoch, and its backup, holding no
    # tombstone any more, stores it: acknowledged twice.  When that backup
    # dies, a's copy to a new backup, the node that kept its old tombstone,
    # was refused STALE -, and a dropped the live session and the write
    # with it (second nemesis review, repro_stale_tomb_recopy.py).
    cluster = cluster_fsync_always
    sid = _create(cluster, "a", b"v1")
    backup = sid.rsplit("-", 1)[1]
    third = ({"b", "c"} - {backup}).pop()
    a = cluster.nodes["a"]
    a.kill9()
    shutil.rmtree(a.data_dir)
    deadline = time.monotonic() + 20
    while _roles(cluster, sid, (backup, third)) != {backup: "master", third: "backup"}:
        assert time.monotonic() < deadline, _roles(cluster, sid, (backup, third))
        time.sleep(0.1)
    with Client(cluster.nodes[third].address, timeout_s=20) as c:
        assert c.request(p.Destroy(sid)) == p.OK
    cluster.nodes[backup].kill9()
    cluster.nodes[backup].start()
    a.start()
    cluster.wait_formed()
    with Client(a.address, timeout_s=20) as c:
        assert c.request(p.Write(sid, 1440, b"important")) == p.OK
    assert _roles(cluster, sid, ("a", backup)) == {"a": "master", backup: "backup"}
    cluster.nodes[backup].kill9()
    deadline = time.monotonic() + 20
    while _roles(cluster, sid, ("a", third)) != {"a": "master", third: "backup"}:
        assert time.monotonic() < deadline, _roles(cluster, sid, ("a", third))
        time.sleep(0.1)
    for via in ("a", third):
        with Client(cluster.nodes[via].address, timeout_s=20) as c:
            assert c.request(p.Read(sid, lock=False)) == p.Data(b"important"), via


def _roles(cluster: Cluster, sid: str, names: tuple[str, ...]) -> dict[str, str]:
    """How each of ``names`` holds ``sid`` (LIST ... ROLES)."""
    held = {}
    for name in names:
        with Client(cluster.nodes[name].address) as c:
            listed = c.request(p.List(None, 10000, roles=True))
            assert isinstance(listed, p.Data), listed
            for line in listed.data.decode().splitlines():
                fields = line.split()
                if fields[0] == sid:
                    held[name] = fields[4]
    return held


async def test_a_copy_that_arrives_while_a_restored_one_is_checked_is_kept(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    # a restarted with a master copy of S, unverified; b took S over while a
    # was down.  While a asks its peers about S, b's copy arrives (b picked
    # a as S's new backup): a holds S as b's backup now.  The check, going
    # on with what it had read before, dropped that copy as stale: S was
    # left with one (second nemesis review, suspected by reading).
    cluster = _in_process_cluster(tmp_path)
    now = trio.current_time()
    sid = "abcdefghijklmnopqrstu-a-b"
    cluster.server.engine.store.put(sid, b"v=1;", 1440, now)
    cluster.replicas.adopt_restored(sid, Meta(MASTER, "a", "b", 1, 3))

    async def call(node: str, request: p.Request) -> p.Reply:
        if node == "b" and isinstance(request, p.Where):
            # b's REPL of S, on its own connection, is served meanwhile.
            assert cluster.handle_peer(
                "b", p.ReplPut(sid, "b", 2, 1, 1440, b"v=2;"), trio.current_time()
            ) == p.OK
            return p.Data(b"v=2;", ("master", "2", "1", "1440000"))
        return p.MISS

    cluster.call = call  # type: ignore[method-assign]
    assert await cluster.resolve(sid) == "b"
    assert cluster.replicas.where(sid) == ("backup", 2, 1)
    assert cluster.server.engine.store.get(sid, trio.current_time()) is not None
