"""Peers and hosts that misbehave, against real daemon processes: a program
on a peer's host holding the cluster port's handshake slots, a peer whose
daemon closes every connection or never answers, a peer holding the secret
that sends counters no REPL can carry on, a backup that refuses copies
(CLUSTER.md §3, §4, §6, §11.4; PROTOCOL.md §9 UNAVAILABLE)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phpsess import cluster as cl
from phpsess import peerauth
from phpsess import protocol as p
from phpsess.client import Client
from phpsess.membership import Heartbeat
from tests.integration.test_cluster import Cluster, _create, _free_port
from tests.integration.test_cluster_review import _in_process_cluster

# Their daemons time failure detection: one worker runs them one after
# another (scripts/test runs the rest on two).
pytestmark = pytest.mark.xdist_group("cluster")


class _WithFakePeer(Cluster):
    """Real nodes that also list node ``x``, which the test plays (_FakePeer),
    on ``fake_port``; ``extra`` adds options per node."""

    def __init__(self, workdir: Path, names: tuple[str, ...],
                 extra: dict[str, list[str]] | None = None) -> None:
        self.fake_port = _free_port()
        self.extra = extra or {}
        super().__init__(workdir, names=names)

    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--peer", f"x=127.0.0.1:{self.fake_port}",
                *self.extra.get(name, [])]


class _FakePeer:
    """Node ``x``: it holds the secret and heartbeats to the real nodes (as
    hearing them all), while its TCP port ``tcp``: "close"s every connection
    at once, or stays "mute" (accepts, never sends a byte)."""

    def __init__(self, cluster: _WithFakePeer, tcp: str) -> None:
        self.key = cluster.secret.read_bytes().strip()
        self.targets = [cluster.ports[n] for n in cluster.nodes]
        self.hears = tuple(sorted(cluster.nodes))
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", cluster.fake_port))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.threads = [
            threading.Thread(target=self._heartbeats, daemon=True),
            threading.Thread(target=self._accept, args=(tcp,), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _heartbeats(self) -> None:
        hb = Heartbeat("x", 4242, 0, 0, False, (), self.hears)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            while not self.stop.wait(0.1):
                datagram = peerauth.encode_heartbeat(hb, self.key, time.time())
                for port in self.targets:
                    udp.sendto(datagram, ("127.0.0.1", port))

    def _accept(self, tcp: str) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            if tcp == "close":
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def fake_cluster(workdir: Path) -> Iterator[list[_WithFakePeer]]:
    made: list[_WithFakePeer] = []
    yield made
    for cluster in made:
        cluster.stop()


def _wait_for(log: Callable[[], str], text: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log():
        assert time.monotonic() < deadline, log()
        time.sleep(0.05)


class _PeerConnection:
    """An authenticated peer connection to ``port`` as node ``name`` (the
    test holds the secret), speaking requests and replies."""

    def __init__(self, port: int, name: str, key: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        theirs = peerauth.parse_challenge_line(self._line())
        mine = peerauth.new_challenge()
        self.sock.sendall(peerauth.auth_line(name, 4242, theirs, key, mine))
        name_there, tag = peerauth.parse_accept_line(self._line())
        peerauth.verify_proof(key, mine, name_there, tag)
        self.parser = p.ReplyParser()
        self.parser.receive_data(self.buf)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            assert data, "the listener closed the connection"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def request(self, raw: bytes) -> p.Reply:
        self.sock.sendall(raw)
        while True:
            reply = self.parser.next_reply()
            if not isinstance(reply, p._NeedData):
                return reply
            data = self.sock.recv(65536)
            assert data, "the listener closed the connection"
            self.parser.receive_data(data)

    def close(self) -> None:
        self.sock.close()


def test_a_program_on_a_peers_host_holding_handshake_slots_does_not_cut_that_peer_off(
    workdir: Path,
) -> None:
    # CLUSTER.md §4.  A local user on a's host (PHP, say) holds 20
    # connections to b's cluster port without a word, opening new ones as
    # they are closed.  They came from a's address, so they took the 16
    # handshake slots a's daemon has there: b refused a's connections before
    # CHALLENGE, a's forwarded requests failed, and a declared b dead.  Now
    # the oldest silent connection is closed to make room for a new one.
    cluster = Cluster(workdir, names=("a", "b"))
    stop = threading.Event()
    port = cluster.ports["b"]

    def hog() -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            alive = []
            for s in held:
                try:
                    if s.recv(100) == b"":  # closed by b (CHALLENGE is read and dropped)
                        s.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    continue
                alive.append(s)
            held = alive
            while len(held) < 20 and not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=1)
                except OSError:
                    break
                s.setblocking(False)
                held.append(s)
            time.sleep(0.02)
        for s in held:
            s.close()

    thread = threading.Thread(target=hog, daemon=True)
    try:
        sids = {_create(cluster, "b", f"n|i:{i};".encode()): f"n|i:{i};".encode()
                for i in range(5)}
        thread.start()
        b = cluster.nodes["b"]
        _wait_for(b.log, "event=peer_refused reason=too_many_handshakes peer=127.0.0.1")
        # Each read through a opens a new forwarded connection to b: a new
        # handshake from the hog's address.
        for sid, value in sids.items():
            with Client(cluster.nodes["a"].address, timeout_s=30) as c:
                assert c.request(p.Read(sid, lock=False)) == p.Data(value), b.log()
        assert "event=peer_dead" not in cluster.nodes["a"].log()
        assert "event=declared_dead_by_peers" not in b.log()
    finally:
        stop.set()
        thread.join(5)
        cluster.stop()


async def test_at_a_handshake_cap_the_oldest_unauthenticated_connection_makes_room(
    tmp_path: Path,
) -> None:
    # CLUSTER.md §4, in-process: per address, then per pool, the oldest
    # handshake still in progress is closed for the new one; a new
    # connection is never turned away.
    cluster = _in_process_cluster(tmp_path)
    peers = [f"10.0.0.{i}" for i in range(1, 6)]
    cluster._peer_hosts = frozenset(peers)
    first = [cluster._admit(peers[0]) for _ in range(cl.HANDSHAKES_PER_PEER_ADDRESS)]
    newest = cluster._admit(peers[0])
    assert first[0].scope.cancel_called
    assert not any(h.scope.cancel_called for h in (*first[1:], newest))
    others = [cluster._admit(host) for host in peers[1:4]
              for _ in range(cl.HANDSHAKES_PER_PEER_ADDRESS)]
    assert len(cluster._from_peers) == cl.HANDSHAKES_FROM_PEERS
    cluster._admit(peers[4])  # the peers' pool is full: its oldest goes
    assert first[1].scope.cancel_called
    assert not any(h.scope.cancel_called for h in others)
    # Unknown addresses: a few each, a few in all, apart from the peers'.
    stranger = [cluster._admit("192.0.2.1") for _ in range(cl.HANDSHAKES_PER_OTHER_ADDRESS + 1)]
    assert [h.scope.cancel_called for h in stranger] == [True] + [False] * 4
    assert len(cluster._from_peers) == cl.HANDSHAKES_FROM_PEERS
    # A handshake that ends gives its slot back.
    cluster._release(newest)
    assert newest not in cluster._from_peers and newest not in cluster._by_address[peers[0]]


def test_a_peer_whose_daemon_closes_the_probes_connection_is_not_declared_dead(
    workdir: Path, fake_cluster: list[_WithFakePeer],
) -> None:
    # CLUSTER.md §3.  x heartbeats, and its daemon closes every TCP
    # connection at once (as b did when a program on a's host held its
    # handshake slots, §4).  A probe closed that way was taken for no
    # answer: with no witness, x was declared dead and a served x's session
    # as new here (MISS), a second master.  A close after the connection was
    # accepted shows the daemon runs: x stays alive, its session UNAVAILABLE.
    cluster = _WithFakePeer(workdir, names=("a",))
    fake_cluster.append(cluster)
    fake = _FakePeer(cluster, tcp="close")
    try:
        a = cluster.nodes["a"]
        _wait_for(a.log, "event=peer_alive peer=x")
        with Client(a.address, timeout_s=30) as c:
            got = c.request(p.Read("abcdefghijklmnopqrstuvwxyz-x-a", lock=False))
        assert isinstance(got, p.Error) and got.code is p.Code.UNAVAILABLE, (got, a.log())
        assert "event=peer_probe peer=x answered=True" in a.log()
        assert "event=peer_dead peer=x" not in a.log()
    finally:
        fake.close()


def test_a_peer_that_never_answers_over_tcp_does_not_hold_up_every_new_session(
    workdir: Path, fake_cluster: list[_WithFakePeer],
) -> None:
    # CLUSTER.md §5.4, §11.4.  x heartbeats (and c hears it: a witness, so
    # it stays alive) but its TCP port never answers.  Every WHERE a new
    # session ID or an EXISTS needs went to x too and waited the link's 5 s
    # for it, again and again.  Now the first one that goes unanswered
    # marks x: until it answers, it is waited for probe_ms only.
    cluster = _WithFakePeer(workdir, names=("a", "c"))
    fake_cluster.append(cluster)
    fake = _FakePeer(cluster, tcp="mute")
    try:
        a = cluster.nodes["a"]
        _wait_for(a.log, "event=peer_alive peer=x")
        _wait_for(cluster.nodes["c"].log, "event=peer_alive peer=x")
        with Client(a.address, timeout_s=30) as c:
            assert c.request(p.Exists("fresh0abcdefghijklmnopqrst-a-c")) == p.Ok(("0",))
        assert "event=peer_unresponsive peer=x" in a.log()
        # Less than the link's timeout each, where each waited all of it.
        for i in range(1, 4):
            with Client(a.address, timeout_s=cl.IO_TIMEOUT_S / 2) as c:
                sid = f"fresh{i}abcdefghijklmnopqrst-a-c"
                assert c.request(p.Exists(sid)) == p.Ok(("0",))
                assert c.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
    finally:
        fake.close()


def test_a_handoff_with_counters_no_repl_could_carry_on_is_refused(
    workdir: Path, fake_cluster: list[_WithFakePeer],
) -> None:
    # CLUSTER.md §11.4.  A peer holding the secret handed a session over at
    # epoch and version 10^18 - 1: taken, every later write had a version no
    # REPL may carry, the backup refused it, and the client got UNAVAILABLE
    # (the data stored all the same).  Counters a node starts from are now
    # bounded, with room left for the REPLs that carry them on.
    cluster = _WithFakePeer(workdir, names=("a", "c"))
    fake_cluster.append(cluster)
    a = cluster.nodes["a"]
    peer = _PeerConnection(cluster.ports["a"], "x", cluster.secret.read_bytes().strip())
    try:
        top = p.MAX_COUNTER
        wedged = "wedgedabcdefghijklmnopqrs-a-c"
        for epoch, version in ((top, top), (p.MAX_START_COUNTER + 1, 1),
                               (1, p.MAX_START_COUNTER + 1)):
            got = peer.request(f"HANDOFF {wedged} {epoch} {version} 600 4\norig".encode())
            assert isinstance(got, p.Error) and got.code is p.Code.BAD_REQUEST, got
        # The highest a node takes leaves room: writes go on, two copies.
        highest = "highestabcdefghijklmnopqr-a-c"
        n = p.MAX_START_COUNTER
        assert peer.request(f"HANDOFF {highest} {n} {n} 600 4\norig".encode()) == p.OK
        with Client(a.address, timeout_s=30) as c:
            for sid in (wedged, highest):
                assert c.request(p.Write(sid, 1440, b"new")) == p.OK, a.log()
        assert cluster.stats("c")["sessions"] == 2  # c backs both up
    finally:
        peer.close()


class _SmallBackup(Cluster):
    """Node b takes sessions of at most 1024 bytes; a, the default."""

    def args(self, name: str, secret: Path) -> list[str]:
        extra = ["--max-session-bytes", "1024"] if name == "b" else []
        return [*super().args(name, secret), *extra]


def test_a_copy_the_backup_refuses_is_reported_in_protocol_words(workdir: Path) -> None:
    # PROTOCOL.md §9, CLUSTER.md §6.  b's max_session_bytes is smaller than
    # a's: b refuses the copy of a 2 KB write TOO_LARGE.  The client got
    # "refused the copy: Error(code=<Code.TOO_LARGE: ...>...)", a Python
    # repr, and a logged nothing about the mismatch.
    cluster = _SmallBackup(workdir, names=("a", "b"))
    try:
        a = cluster.nodes["a"]
        sid = _create(cluster, "a", b"v1")
        with Client(a.address, timeout_s=30) as c:
            got = c.request(p.Write(sid, 1440, b"v2" + b"x" * 2000))
        assert isinstance(got, p.Error) and got.code is p.Code.UNAVAILABLE, got
        assert 'backup b refused the copy: "TOO_LARGE ' in got.message, got
        assert "Error(" not in got.message and "outcome is unknown" in got.message, got
        log = a.log()
        assert "event=replication_refused peer=b " in log, log
        assert "set the same max_session_bytes on every node" in log, log
    finally:
        cluster.stop()


def test_a_malformed_handshake_cannot_add_fields_to_the_log_line(workdir: Path) -> None:
    # Anyone who can reach the cluster port sends a line before proving
    # anything: its text must not read as fields of the line that logs it.
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        with socket.create_connection(("127.0.0.1", cluster.ports["b"]), timeout=10) as s:
            assert s.recv(4096).startswith(b"CHALLENGE ")
            s.sendall(b"AUTH x event=peer_dead peer=a level=error msg=forged\n")
            assert s.recv(4096) == b""  # refused: closed
        _wait_for(cluster.nodes["b"].log, "event=peer_auth_failed")
        (line,) = [ln for ln in cluster.nodes["b"].log().splitlines()
                   if "event=peer_auth_failed" in ln]
        assert "event=peer_dead" not in line and "msg=forged" not in line, line
        assert 'detail="malformed AUTH line' in line, line
    finally:
        cluster.stop()
