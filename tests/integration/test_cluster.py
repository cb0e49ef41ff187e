"""Session clustering with 3 real daemon processes on loopback and real php
clients spread round-robin over them (no stickiness): CLUSTER.md §9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client, ClientError
from phpsess.membership import Heartbeat
from phpsess.peerauth import encode_heartbeat
from tests.conftest import (
    Daemon,
    free_port,
    free_tcp_port,
    php_binary,
    read_counter,
    scrape_metrics,
)

ROUNDROBIN = Path(__file__).parent / "php" / "roundrobin.php"
NAMES = ("a", "b", "c")

# Their daemons time failure detection: one worker runs them one after
# another (scripts/test runs the rest on two).
pytestmark = pytest.mark.xdist_group("cluster")
DEAD_AFTER_MS = 1500


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free for both the cluster's TCP and UDP on ``host``."""
    return free_port(host, udp=True)


class Cluster:
    def __init__(
        self, workdir: Path, names: tuple[str, ...] = NAMES, hosts: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.secret = workdir / "secret"
        self.secret.write_bytes(os.urandom(32).hex().encode())
        # Each node's cluster address (distinct loopback addresses let a test
        # cut the link between two nodes alone).
        self.hosts = hosts or dict.fromkeys(names, "127.0.0.1")
        self.ports = {name: _free_port(self.hosts[name]) for name in names}
        self.nodes: dict[str, Daemon] = {}
        for name in names:
            self.nodes[name] = self._daemon(name, self.secret)
        self.wait_formed()

    def args(self, name: str, secret: Path) -> list[str]:
        args = [
            "--node", name, "--cluster-listen", f"{self.hosts[name]}:{self.ports[name]}",
            "--cluster-secret-file", str(secret), "--dead-after-ms", str(DEAD_AFTER_MS),
            "--heartbeat-ms", "250", "--drain-timeout-s", "20",
        ]
        for other, port in self.ports.items():
            if other != name:
                args += ["--peer", f"{other}={self.hosts[other]}:{port}"]
        return args

    def _daemon(self, name: str, secret: Path) -> Daemon:
        d = self.workdir / name
        d.mkdir(exist_ok=True)
        return Daemon(d, *self.args(name, secret))

    def wait_formed(self, names: tuple[str, ...] | None = None) -> None:
        """Every named node sees every other as alive: asked (STATS), not
        read from the logs, which a restarted node's last run left
        ``event=peer_alive`` lines in."""
        names = names or tuple(self.nodes)
        deadline = time.monotonic() + 15
        for name in names:
            others = [n for n in names if n != name]
            while True:
                try:
                    peers = self.stats(name)["cluster"]["peers"]
                except ClientError:  # still starting
                    peers = {}
                if all(o in peers and peers[o]["state"] == "alive" for o in others):
                    break
                assert time.monotonic() < deadline, self.nodes[name].log()
                time.sleep(0.05)

    def address(self, name: str) -> str:
        return self.nodes[name].php_address

    def stats(self, name: str) -> dict[str, Any]:
        with Client(self.nodes[name].address) as c:
            reply = c.request(p.Stats())
            assert isinstance(reply, p.Data)
            stats: dict[str, Any] = json.loads(reply.data)
            return stats

    def stop(self) -> None:
        for daemon in self.nodes.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


@pytest.fixture
def cluster(workdir: Path) -> Iterator[Cluster]:
    c = Cluster(workdir)
    yield c
    c.stop()


def _create(cluster: Cluster, on: str, value: bytes) -> str:
    with Client(cluster.nodes[on].address) as c:
        created = c.request(p.Create(26, 5))
        assert isinstance(created, p.Ok), created
        sid = created.tokens[0]
        assert c.request(p.Write(sid, 1440, value)) == p.OK
    return sid


def _php(sid: str, count: int, addresses: list[str], hold_ms: int = 0,
         retry: bool = False, offset: int = 0) -> subprocess.Popen[str]:
    env = {**os.environ, "PHPSESS_OFFSET": str(offset), "PHPSESS_RETRY": "1" if retry else "0"}
    return subprocess.Popen(
        [php_binary(), "-d", "display_errors=stderr", "-d", "session.use_cookies=0",
         "-d", "session.cache_limiter=", str(ROUNDROBIN), sid, str(count),
         ",".join(addresses), str(hold_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _acks(out: str) -> list[int]:
    # Only whole lines: a writer stopped with SIGTERM may be cut off mid-line.
    lines = out.split("\n")[:-1]
    return [int(line.split()[1]) for line in lines if line.startswith("ack ")]


def _counter(cluster: Cluster, via: str, sid: str) -> int:
    return read_counter(cluster.nodes[via].address, sid)


def _local_sessions(cluster: Cluster, name: str) -> int:
    sessions: int = cluster.stats(name)["sessions"]
    return sessions


def test_50_concurrent_increments_across_daemons(cluster: Cluster) -> None:
    sid = _create(cluster, "a", b"n|i:0;")
    addresses = [cluster.address(n) for n in NAMES]
    procs = [_php(sid, 1, addresses, hold_ms=20, offset=i) for i in range(50)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [err for _, err in results if err] == []
    assert sorted(a for out, _ in results for a in _acks(out)) == list(range(1, 51))
    for name in NAMES:
        assert _counter(cluster, name, sid) == 50
    # Master and backup hold it; the third node only forwarded.
    assert sorted(_local_sessions(cluster, n) for n in NAMES) == [0, 1, 1]


def test_a_session_being_started_exists_from_every_node(cluster: Cluster) -> None:
    # PROTOCOL.md §4.4: strict mode's validateId() through any daemon finds
    # a new session whose lock its master holds, before the first write.
    with Client(cluster.nodes["a"].address) as starter:
        created = starter.request(p.Create(26, 5))
        assert isinstance(created, p.Ok), created
        sid = created.tokens[0]
        for name in NAMES:
            with Client(cluster.nodes[name].address) as c:
                assert c.request(p.Exists(sid)) == p.Ok(("1",)), name
        assert starter.request(p.Close()) == p.OK
        for name in NAMES:  # released unwritten: no session
            with Client(cluster.nodes[name].address) as c:
                assert c.request(p.Exists(sid)) == p.Ok(("0",)), name


def test_a_later_hello_applies_to_masters_reached_after_it(cluster: Cluster) -> None:
    # A client's requests for another master's sessions go over a link that
    # says the client's HELLO.  Links opened after a second HELLO used to say
    # the first one: its wait_ms=0 made a wait the client asked for (3 s)
    # fail at once with LOCK_TIMEOUT (PROTOCOL.md §3.2: each HELLO applies).
    on_b = _create(cluster, "b", b"n|i:1;")
    on_c = _create(cluster, "c", b"n|i:2;")
    with Client(cluster.nodes["c"].address) as holder, \
            Client(cluster.nodes["a"].address, wait_ms=0) as client:
        assert isinstance(holder.request(p.Read(on_c)), p.Data)  # c's lock held
        assert client.request(p.Read(on_b, lock=False)) == p.Data(b"n|i:1;")  # a link to b
        assert client.request(p.Hello(p.PROTOCOL_VERSION, 3000, None)) == p.Ok(("1",))
        release = threading.Timer(0.5, lambda: holder.request(p.Close()))
        release.start()
        try:
            assert client.request(p.Read(on_c)) == p.Data(b"n|i:2;")  # a new link to c
        finally:
            release.join()


def test_kill_9_of_a_master_loses_no_acknowledged_write(cluster: Cluster) -> None:
    sids = [_create(cluster, "a", b"n|i:0;") for _ in range(4)]
    addresses = [cluster.address(n) for n in NAMES]
    writers = [_php(sid, 100000, addresses, retry=True, offset=i) for i, sid in enumerate(sids)]
    time.sleep(1.5)
    killed_at = time.monotonic()
    cluster.nodes["a"].kill9()
    time.sleep(2.5)
    for w in writers:
        w.terminate()
    outs = [w.communicate(timeout=30)[0] for w in writers]
    for sid, out in zip(sids, outs, strict=True):
        acks = _acks(out)
        assert acks, "the writer never got a write through"
        stored = _counter(cluster, "b", sid)
        # Nothing acknowledged is lost; at most the write in flight when the
        # writer was stopped is there unacknowledged.
        assert acks[-1] <= stored <= acks[-1] + 1, (sid, acks[-1], stored)
        assert _counter(cluster, "c", sid) == stored
        # The counter carried on across the failover.  A write in flight to
        # the killed master may have been made and still be reported failed
        # (CLUSTER.md §7: it is never sent again); PHP then starts over and
        # its next write acknowledges one more, so a value may be skipped,
        # never repeated or lost, and only around the failover.
        assert acks == sorted(set(acks)) and acks[0] == 1, acks
        assert acks[-1] - len(acks) <= 2, acks
    # Two copies again: on the new master b and the new backup c.
    assert _local_sessions(cluster, "b") == 4
    assert _local_sessions(cluster, "c") == 4
    log = cluster.nodes["b"].log()
    assert "event=peer_dead peer=a" in log and "event=takeover peer=a" in log
    print(f"failover test: b declared a dead; test ran {time.monotonic() - killed_at:.1f} s")


def test_sigstop_no_two_masters_and_no_acknowledged_write_lost(cluster: Cluster) -> None:
    sid = _create(cluster, "a", b"n|i:0;")
    a = cluster.nodes["a"]
    # A request on a takes the lock and is still thinking when a hangs.
    slow = _php(sid, 1, [cluster.address("a")], hold_ms=DEAD_AFTER_MS * 3)
    time.sleep(0.5)
    a.signal(signal.SIGSTOP)
    try:
        time.sleep(DEAD_AFTER_MS / 1000 + 1.5)  # well past detection
        writer = _php(sid, 20, [cluster.address("b"), cluster.address("c")])
        out, err = writer.communicate(timeout=60)
        assert err == "", err
        acks = _acks(out)
        assert acks and acks[-1] == len(acks)  # b took over: every write went through
    finally:
        a.signal(signal.SIGCONT)
    slow_out, _ = slow.communicate(timeout=60)
    # The old master's late write was refused: it is no master any more.
    assert _acks(slow_out) == []
    time.sleep(1)
    for name in NAMES:
        assert _counter(cluster, name, sid) == acks[-1]
    assert "event=write_refused_stale" in a.log() or "event=declared_dead_by_peers" in a.log()


def test_restarted_daemon_rejoins_and_serves_correct_data(cluster: Cluster) -> None:
    sid = _create(cluster, "a", b"n|i:0;")
    addresses = [cluster.address(n) for n in NAMES]
    first = _php(sid, 5, addresses)
    assert _acks(first.communicate(timeout=60)[0]) == [1, 2, 3, 4, 5]
    cluster.nodes["a"].kill9()
    later = _php(sid, 5, [cluster.address("b"), cluster.address("c")])
    assert _acks(later.communicate(timeout=60)[0]) == [6, 7, 8, 9, 10]
    cluster.nodes["a"].start()  # with its data directory: a stale copy at 5
    cluster.wait_formed()
    assert _counter(cluster, "a", sid) == 10  # never the stale 5
    after = _php(sid, 6, addresses)
    assert _acks(after.communicate(timeout=60)[0]) == [11, 12, 13, 14, 15, 16]
    # New sessions are placed on the rejoined daemon too.
    fresh = _create(cluster, "a", b"n|i:0;")
    assert fresh.endswith(("-a-b", "-a-c"))
    assert _counter(cluster, "b", fresh) == 0


def test_drain_under_load_loses_nothing(cluster: Cluster) -> None:
    sids = [_create(cluster, "a", b"n|i:0;") for _ in range(3)]
    sids += [_create(cluster, "b", b"n|i:0;") for _ in range(3)]  # a backs some up
    others = [cluster.address("b"), cluster.address("c")]
    writers = [_php(sid, 100000, others, retry=True, offset=i) for i, sid in enumerate(sids)]
    time.sleep(1)
    a = cluster.nodes["a"]
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0
    time.sleep(1)
    for w in writers:
        w.terminate()
    outs = [w.communicate(timeout=30)[0] for w in writers]
    for sid, out in zip(sids, outs, strict=True):
        acks = _acks(out)
        assert acks
        stored = _counter(cluster, "b", sid)
        assert acks[-1] <= stored <= acks[-1] + 1, (sid, acks[-1], stored)
    # Every session has its two copies on the daemons that remain.
    assert _local_sessions(cluster, "b") == 6 and _local_sessions(cluster, "c") == 6
    assert "event=drained" in a.log()


def test_a_drained_daemon_restarted_finds_the_sessions_it_handed_over(cluster: Cluster) -> None:
    # The upgrade of DEPLOYMENT.md: systemctl restart = drain, then start.
    # The restarted node is still named in its sessions' IDs but holds no
    # copy: it must find them on the peers, not serve them empty (a user
    # logged out) and lock them on itself (two holders of one lock).
    sids = [_create(cluster, "a", b"n|i:%d;" % (10 + i)) for i in range(5)]
    a = cluster.nodes["a"]
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0 and "event=drained" in a.log()
    a.start()
    cluster.wait_formed()
    for i, sid in enumerate(sids):
        assert _counter(cluster, "a", sid) == 10 + i
    addresses = [cluster.address(n) for n in NAMES]
    php = _php(sids[0], 3, addresses)
    assert _acks(php.communicate(timeout=60)[0]) == [11, 12, 13]
    # New sessions still start on it, empty.
    fresh = _create(cluster, "a", b"n|i:7;")
    assert _counter(cluster, "a", fresh) == 7


def test_metrics_count_peer_and_forwarded_requests_by_their_verb(workdir: Path) -> None:
    # A backup's REPLs and a forwarded READ are requests too: counted under
    # their verbs, in the counter as in the latency histogram (they were
    # missing from the one and labelled INVALID in the other).
    ports: dict[str, int] = {}

    class Metered(Cluster):
        def args(self, name: str, secret: Path) -> list[str]:
            port = ports.setdefault(name, free_tcp_port())
            return [*super().args(name, secret), "--metrics-listen", f"127.0.0.1:{port}"]

    pair = Metered(workdir, ("a", "b"))
    try:
        sid = _create(pair, "a", b"n|i:1;")  # mastered by a, its backup on b
        with Client(pair.nodes["a"].address) as c:
            for n in range(2, 5):
                assert c.request(p.Write(sid, 60, b"n|i:%d;" % n)) == p.OK
        with Client(pair.nodes["b"].address) as c:  # forwarded to a
            assert c.request(p.Read(sid, lock=False)) == p.Data(b"n|i:4;")
        b = scrape_metrics(ports["b"])

        def both(verb: str) -> tuple[float, float]:
            labels = (("verb", verb),)
            return (b.get(("phpsess_requests_total", labels), 0.0),
                    b.get(("phpsess_request_seconds_count", labels), 0.0))

        assert both("REPL") == (4.0, 4.0)
        assert both("READ") == (1.0, 1.0)
        assert not any(dict(labels).get("verb") == "INVALID" for _, labels in b)
    finally:
        pair.stop()


def _read(cluster: Cluster, via: str, sid: str) -> p.Reply:
    with Client(cluster.nodes[via].address) as c:
        return c.request(p.Read(sid, lock=False))


def _wait_alive(cluster: Cluster, name: str, peers: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 15
    while any(cluster.stats(name)["cluster"]["peers"][n]["state"] != "alive" for n in peers):
        assert time.monotonic() < deadline, cluster.nodes[name].log()
        time.sleep(0.05)


def test_a_node_that_learns_of_a_death_first_waits_for_the_takeover(cluster: Cluster) -> None:
    # a names itself master of X-a-b but handed X to b (a drain, then a
    # restart), b backed up by c.  b is killed: a learns it first (its
    # connection is refused) and, holding no copy, found no master, only
    # c's backup copy: it served X as new (MISS), and a write there was
    # acknowledged, then lost once c took over (CLUSTER.md §5.5).
    sids: list[str] = []
    while len(sids) < 3:
        sid = _create(cluster, "a", b"v1")
        if sid.endswith("-a-b"):
            sids.append(sid)
    a = cluster.nodes["a"]
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0
    a.start()
    _wait_alive(cluster, "a", ("b", "c"))
    _wait_alive(cluster, "b", ("a", "c"))
    for sid in sids:
        assert _read(cluster, "a", sid) == p.Data(b"v1")
    cluster.nodes["b"].kill9()
    for sid in sids:
        assert _read(cluster, "a", sid) == p.Data(b"v1"), a.log()


class _FsyncAlways(Cluster):
    """Every acknowledged write on disk: a kill -9 right after one keeps it
    (with the default interval policy the last few ms may be lost, README
    Durability, which a test about routing must not depend on)."""

    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--fsync", "always"]


@pytest.fixture
def cluster_fsync_always(workdir: Path) -> Iterator[Cluster]:
    c = _FsyncAlways(workdir)
    yield c
    c.stop()


def test_a_staggered_whole_cluster_restart_serves_no_session_as_new(
    cluster_fsync_always: Cluster,
) -> None:
    # Every daemon killed; c starts alone, a and b later than the detection
    # time.  c declared them absent (their ports refused) and read their
    # sessions as missing: a write on c was acknowledged, and one of the two
    # copies lost when a came back with its journaled master copy (§3, §5.5).
    cluster = cluster_fsync_always
    sid = _create(cluster, "a", b"v1")
    for name in NAMES:
        cluster.nodes[name].kill9()
    c = cluster.nodes["c"]
    c.start()
    deadline = time.monotonic() + 15  # it declares a and b absent once their ports refuse
    while not all(f"event=peer_absent peer={n}" in c.log() for n in "ab"):
        assert time.monotonic() < deadline, c.log()
        time.sleep(0.05)
    with Client(c.address) as client:
        for request in (p.Read(sid, lock=False), p.Write(sid, 1440, b"v2")):
            reply = client.request(request)
            assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE, reply
            assert "not heard since this node started" in reply.message, reply
    for name in ("a", "b"):
        cluster.nodes[name].start()
    _wait_alive(cluster, "c", ("a", "b"))
    assert _read(cluster, "c", sid) == p.Data(b"v1")
    assert _read(cluster, "a", sid) == p.Data(b"v1")


def test_double_failure_is_reported_missing(cluster: Cluster) -> None:
    sid = _create(cluster, "a", b"n|i:7;")
    assert sid.endswith("-a-b") or sid.endswith("-a-c")
    backup = sid.rsplit("-", 1)[1]
    survivor = next(n for n in NAMES if n not in ("a", backup))
    cluster.nodes["a"].kill9()
    cluster.nodes[backup].kill9()
    deadline = time.monotonic() + 15
    while True:
        with Client(cluster.nodes[survivor].address) as c:
            reply = c.request(p.Read(sid, lock=False))
        if reply == p.MISS:
            break
        assert isinstance(reply, p.Error), reply  # never the stale data
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "event=session_missing" in cluster.nodes[survivor].log()


def test_wrong_secret_cannot_read_or_write(cluster: Cluster, workdir: Path) -> None:
    sid = _create(cluster, "a", b"secret-data")
    wrong = workdir / "wrong-secret"
    wrong.write_bytes(os.urandom(32).hex().encode())
    # An intruder that knows the addresses and pretends to be node c.
    intruder_dir = workdir / "intruder"
    intruder_dir.mkdir()
    args = cluster.args("c", wrong)
    port = _free_port()
    args[args.index("--cluster-listen") + 1] = f"127.0.0.1:{port}"
    intruder = Daemon(intruder_dir, *args)
    try:
        time.sleep(1)
        with Client(intruder.address) as c:
            reply = c.request(p.Read(sid, lock=False))
            assert reply != p.Data(b"secret-data")
            c.request(p.Write(sid, 60, b"forged"))
        assert _counter_raw(cluster, "b", sid) == b"secret-data"
        logs = cluster.nodes["a"].log() + cluster.nodes["b"].log()
        assert "event=heartbeat_rejected" in logs
        assert "event=peer_auth_failed" in logs
    finally:
        intruder.stop()


def test_a_replayed_heartbeat_does_not_hide_a_death(workdir: Path) -> None:
    # Peer d is this test: it signs d's heartbeats with the secret, as d's
    # daemon would, then "dies" and an attacker on the wire replays d's last
    # heartbeat over and over.  Without the replay guard every copy passed
    # (its timestamp stays within the 30 s window) and kept d alive.
    secret = workdir / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    a_port, d_port = _free_port(), _free_port()
    d_alive = threading.Event()
    d_alive.set()
    last: list[bytes] = []
    stop = threading.Event()

    def peer_d() -> None:
        hb = Heartbeat("d", 7, 0, 0, False, ())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            while not stop.wait(0.1):
                if d_alive.is_set():
                    last[:] = [encode_heartbeat(hb, secret.read_bytes().strip(), time.time())]
                if last:
                    udp.sendto(last[0], ("127.0.0.1", a_port))

    sender = threading.Thread(target=peer_d, daemon=True)
    sender.start()
    (workdir / "a").mkdir()
    a = Daemon(
        workdir / "a", "--node", "a", "--cluster-listen", f"127.0.0.1:{a_port}",
        "--peer", f"d=127.0.0.1:{d_port}", "--cluster-secret-file", str(secret),
        "--dead-after-ms", str(DEAD_AFTER_MS), "--heartbeat-ms", "250",
    )
    try:
        deadline = time.monotonic() + 15
        while "event=peer_alive peer=d" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        # A node holding the secret under a name a does not know (a --node
        # typo) used to be ignored without a trace.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            typo = Heartbeat("dd", 8, 0, 0, False, ())
            udp.sendto(encode_heartbeat(typo, secret.read_bytes().strip(), time.time()),
                       ("127.0.0.1", a_port))
        while "heartbeat from 'dd', which is not a configured peer" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        d_alive.clear()  # d dies; its last heartbeat goes on arriving
        deadline = time.monotonic() + 4 * DEAD_AFTER_MS / 1000
        while "event=peer_dead peer=d" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        assert "not newer than the last one heard: replayed" in a.log()
    finally:
        stop.set()
        sender.join(5)
        a.stop()


def _counter_raw(cluster: Cluster, via: str, sid: str) -> bytes:
    with Client(cluster.nodes[via].address) as c:
        reply = c.request(p.Read(sid, lock=False))
    assert isinstance(reply, p.Data), reply
    return reply.data


def test_whole_cluster_power_loss_after_a_takeover_keeps_every_session(
    cluster: Cluster,
) -> None:
    sid = _create(cluster, "a", b"n|i:0;")
    addresses = [cluster.address(n) for n in NAMES]
    assert _acks(_php(sid, 5, addresses).communicate(timeout=60)[0]) == [1, 2, 3, 4, 5]
    cluster.nodes["a"].kill9()  # the named master dies; its backup takes over
    survivors = [cluster.address("b"), cluster.address("c")]
    assert _acks(_php(sid, 5, survivors).communicate(timeout=60)[0]) == [6, 7, 8, 9, 10]
    # Then the power goes out everywhere, after --fsync interval's window
    # (the last 200 ms may be lost: README, Durability).
    time.sleep(0.5)
    for name in ("b", "c"):
        cluster.nodes[name].kill9()
    for daemon in cluster.nodes.values():
        daemon.start()
    cluster.wait_formed()
    for name in NAMES:
        assert _counter(cluster, name, sid) == 10  # neither lost nor stale
    assert _acks(_php(sid, 3, addresses).communicate(timeout=60)[0]) == [11, 12, 13]
    # And it has two copies again.
    assert sorted(_local_sessions(cluster, n) for n in NAMES) == [0, 1, 1]


def test_status_shows_the_cluster_members(cluster: Cluster,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from phpsess.__main__ import main

    assert main(["status", "--connect", cluster.nodes["a"].address]) == 0
    out = capsys.readouterr().out
    assert "cluster node" in out and "peer b" in out and "peer c" in out
    assert out.count("alive") == 2
    # Rows for people, as the others: no raw STATS keys.
    assert "cluster takeovers " in out and "_total" not in out
    cluster.nodes["c"].kill9()
    deadline = time.monotonic() + 15
    while cluster.stats("a")["cluster"]["peers"]["c"]["state"] != "dead":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert main(["status", "--json", "--connect", cluster.nodes["a"].address]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cluster"]["peers"]["c"]["state"] == "dead"
    assert stats["cluster"]["peers"]["b"]["state"] == "alive"


def test_sighup_adds_a_peer_to_a_running_cluster(workdir: Path) -> None:
    secret = workdir / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    ports = {name: _free_port() for name in NAMES}

    def write_config(name: str, peers: tuple[str, ...]) -> Path:
        path = workdir / f"{name}.toml"
        lines = [
            "[cluster]", f'node = "{name}"', f'listen = "127.0.0.1:{ports[name]}"',
            f'secret_file = "{secret}"', "heartbeat_ms = 250", f"dead_after_ms = {DEAD_AFTER_MS}",
            "[cluster.peers]",
        ]
        lines += [f'{peer} = "127.0.0.1:{ports[peer]}"' for peer in peers]
        path.write_text("\n".join(lines) + "\n")
        return path

    daemons: dict[str, Daemon] = {}
    try:
        for name, peers in (("a", ("b",)), ("b", ("a",)), ("c", ("a", "b"))):
            (workdir / name).mkdir()
            daemons[name] = Daemon(workdir / name, "--config", str(write_config(name, peers)))
        sid = _create_on(daemons["a"], b"n|i:1;")
        # c has heard neither holder (a and b ignore it until they reload):
        # either may hold the session, so c neither reads it as missing nor
        # starts a second, empty master copy of it (CLUSTER.md §5.5).
        with Client(daemons["c"].address) as c:
            for request in (p.Read(sid, lock=False), p.Write(sid, 1440, b"n|i:99;")):
                reply = c.request(request)
                assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE, reply
                assert "not heard since this node started" in reply.message, reply
        with Client(daemons["c"].address) as c:
            stats = c.request(p.Stats())
            assert isinstance(stats, p.Data) and json.loads(stats.data)["sessions"] == 0
        for name, peers in (("a", ("b", "c")), ("b", ("a", "c"))):
            write_config(name, peers)
            daemons[name].signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        for name in ("a", "b"):
            while "event=peer_alive peer=c" not in daemons[name].log():
                assert time.monotonic() < deadline, daemons[name].log()
                time.sleep(0.05)
            assert "event=peers_reloaded added=c" in daemons[name].log()
        # ... and c hears them (a and b ignored c until they reloaded): until
        # then c knows no holder of a's sessions alive.  Not waiting for it
        # failed 3 runs in 40 under CPU load.
        while not all(f"event=peer_alive peer={n}" in daemons["c"].log() for n in ("a", "b")):
            assert time.monotonic() < deadline, daemons["c"].log()
            time.sleep(0.05)
        with Client(daemons["c"].address) as c:  # c now serves a's sessions
            assert c.request(p.Read(sid, lock=False)) == p.Data(b"n|i:1;")
    finally:
        for daemon in daemons.values():
            daemon.stop()


def _create_on(daemon: Daemon, value: bytes) -> str:
    with Client(daemon.address) as c:
        created = c.request(p.Create(26, 5))
        assert isinstance(created, p.Ok), created
        sid = created.tokens[0]
        assert c.request(p.Write(sid, 1440, value)) == p.OK
    return sid


class _Nft:
    """A private nftables table that drops packets between pairs of
    addresses: a real network partition on loopback (needs root and nft,
    which scripts/bootstrap installs)."""

    def __init__(self) -> None:
        self.table = f"phpsess_test_{os.getpid()}"
        self._nft(f"add table inet {self.table}")
        self._nft(
            f"add chain inet {self.table} out "
            "{ type filter hook output priority 0 ; policy accept ; }"
        )

    def _nft(self, command: str) -> None:
        done = subprocess.run(["nft", command], capture_output=True, text=True)
        assert done.returncode == 0, f"nft {command}: {done.stderr} (root and nftables needed)"

    def cut(self, one: str, other: str) -> None:
        for src, dst in ((one, other), (other, one)):
            self._nft(f"add rule inet {self.table} out ip saddr {src} ip daddr {dst} drop")

    def drop_udp_from(self, src: str) -> None:
        self._nft(f"add rule inet {self.table} out ip saddr {src} meta l4proto udp drop")

    def close(self) -> None:
        subprocess.run(["nft", f"delete table inet {self.table}"], capture_output=True)


def test_a_peer_whose_heartbeats_are_lost_answers_the_probe_and_stays_alive(
    workdir: Path,
) -> None:
    # CLUSTER.md §3: "slow but alive peer: the TCP probe answers".  With no
    # witness (two nodes) only the probe can tell.  It sent PING before
    # HELLO and took the refusal for silence: a peer whose heartbeats were
    # lost was declared dead, a second master made.
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3"}
    cluster = Cluster(workdir, names=("a", "b"), hosts=hosts)
    nft = _Nft()
    try:
        sid = _create(cluster, "a", b"n|i:0;")
        nft.drop_udp_from(hosts["b"])
        deadline = time.monotonic() + 4 * DEAD_AFTER_MS / 1000
        a = cluster.nodes["a"]
        while "event=peer_probe peer=b answered=True" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.1)
        time.sleep(DEAD_AFTER_MS / 1000)  # and again, heartbeats still lost
        for name in ("a", "b"):
            log = cluster.nodes[name].log()
            assert "event=peer_dead" not in log, (name, log)
            assert "event=takeover" not in log, (name, log)
        with Client(a.address) as c:  # replicated to b: two copies
            assert c.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
        assert sorted(_local_sessions(cluster, n) for n in ("a", "b")) == [1, 1]
    finally:
        nft.close()
        cluster.stop()


def test_a_lock_held_through_a_node_that_froze_goes_when_it_is_declared_dead(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §7: locks held through a dead node vanish with it.  A PHP
    # request on c holds the lock of a session mastered on a; c's host
    # freezes (SIGSTOP: no FIN).  The lock used to stay held on a for the
    # whole lease (300 s): every request for the session timed out.
    sid = _create(cluster, "a", b"n|i:0;")
    holder = Client(cluster.nodes["c"].address)
    try:
        assert holder.request(p.Read(sid)) == p.Data(b"n|i:0;")  # forwarded to a
        cluster.nodes["c"].signal(signal.SIGSTOP)
        a = cluster.nodes["a"]
        deadline = time.monotonic() + 4 * DEAD_AFTER_MS / 1000
        while "event=peer_dead peer=c" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.05)
        with Client(a.address, hello=False, timeout_s=30) as c:
            assert c.request(p.Hello(1, wait_ms=5000)) == p.Ok(("1",))
            assert c.request(p.Read(sid)) == p.Data(b"n|i:0;")  # the lock is free
            assert c.request(p.Write(sid, 1440, b"n|i:1;")) == p.OK
    finally:
        cluster.nodes["c"].signal(signal.SIGCONT)
        holder.close()


def test_a_link_cut_between_master_and_backup_alone_makes_no_second_master(
    workdir: Path,
) -> None:
    # CLUSTER.md §3 (witnesses), §10: a and its backup lose each other, the
    # third node still hears both.  Neither may declare the other dead.
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
    cluster = Cluster(workdir, hosts=hosts)
    nft = _Nft()
    try:
        sid = _create(cluster, "a", b"n|i:0;")
        addresses = [cluster.address(n) for n in NAMES]
        assert _acks(_php(sid, 3, addresses).communicate(timeout=60)[0]) == [1, 2, 3]
        backup = next(n for n in ("b", "c") if _local_sessions(cluster, n) == 1)
        nft.cut(hosts["a"], hosts[backup])
        # Longer than detection and probe, several times over.
        deadline = time.monotonic() + 4 * DEAD_AFTER_MS / 1000
        while "event=peer_unreachable peer=a" not in cluster.nodes[backup].log():
            assert time.monotonic() < deadline, cluster.nodes[backup].log()
            time.sleep(0.1)
        time.sleep(2 * DEAD_AFTER_MS / 1000)
        for name in NAMES:
            log = cluster.nodes[name].log()
            assert "event=peer_dead" not in log, (name, log)
            assert "event=takeover" not in log, (name, log)
        assert f"event=peer_unreachable peer={backup}" in cluster.nodes["a"].log()
        # A write that needs the cut link fails cleanly; nothing else serves it.
        # (Like any failed write its outcome is unknown to the writer: the
        # master may keep it, unacknowledged, as its newest version.)
        with Client(cluster.nodes["a"].address, timeout_s=30) as c:
            assert c.request(p.Read(sid)) == p.Data(b"n|i:3;")
            refused = c.request(p.Write(sid, 1440, b"n|i:99;"))
            assert isinstance(refused, p.Error) and refused.code is p.Code.UNAVAILABLE, refused
        nft.close()
        # Healed: one master, the count carries on, from every node.
        now = _counter(cluster, "a", sid)
        assert now in (3, 99)
        acks = _acks(_php(sid, 3, addresses, retry=True).communicate(timeout=60)[0])
        assert acks == [now + 1, now + 2, now + 3]
        for name in NAMES:
            assert _counter(cluster, name, sid) == now + 3
    finally:
        nft.close()
        cluster.stop()


def _assert_served(cluster: Cluster, via: str, values: dict[str, bytes]) -> None:
    """Node ``via`` serves every session of ``values`` with its value."""
    with Client(cluster.nodes[via].address, timeout_s=30) as c:
        for sid, value in values.items():
            assert c.request(p.Read(sid, lock=False)) == p.Data(value), sid


def test_a_backup_drained_right_after_its_master_crashed_hands_over_what_it_took_over(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §8 step 4: b backs up a's sessions, a is killed -9 and b
    # drained at once.  b had nothing to hand over, waited for its backup
    # copies to be re-homed, then declared a dead and took them over itself:
    # the copies became masters, the wait ended, and b exited mastering them
    # (their copies to c cancelled half-way): sessions lost.
    values: dict[str, bytes] = {}
    while len(values) < 12:
        value = b"v%d" % len(values)
        sid = _create(cluster, "a", value)
        if sid.endswith("-a-b"):
            values[sid] = value
    time.sleep(0.3)
    b = cluster.nodes["b"]
    cluster.nodes["a"].kill9()
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0
    log = b.log()
    assert "event=takeover peer=a" in log, log
    assert f"event=drained handed_over={len(values)}" in log, log
    assert "event=drain_incomplete" not in log, log
    _assert_served(cluster, "c", values)


def _start_all_together(cluster: Cluster) -> None:
    """Start every (stopped) node at once and wait until each hears the others."""
    starts = [threading.Thread(target=d.start) for d in cluster.nodes.values()]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join(30)
    for name in NAMES:
        _wait_alive(cluster, name, tuple(n for n in NAMES if n != name))


def test_a_whole_cluster_restart_recopies_every_session_before_it_is_read(
    cluster: Cluster,
) -> None:
    # CLUSTER.md §7: after a power loss every node drops its backup copies
    # and keeps its journaled master copies.  They were re-copied only when
    # next read or written: the cluster looked healthy, and the death of one
    # node then lost every session it mastered that nobody had read since.
    values = {_create(cluster, "a", b"n|i:%d;" % i): b"n|i:%d;" % i for i in range(10)}
    time.sleep(0.5)  # past the --fsync interval window (README, Durability)
    for daemon in cluster.nodes.values():
        daemon.kill9()
    _start_all_together(cluster)
    deadline = time.monotonic() + 8
    while _local_sessions(cluster, "b") + _local_sessions(cluster, "c") < len(values):
        assert time.monotonic() < deadline, cluster.nodes["a"].log()
        time.sleep(0.1)
    cluster.nodes["a"].kill9()
    _assert_served(cluster, "b", values)


def test_a_whole_cluster_stopped_at_once_does_not_wait_out_the_drain_deadline(
    cluster: Cluster,
) -> None:
    # Every node drains at once (systemctl stop on every server): each kept
    # retrying to hand its sessions to peers that were draining too, until
    # the drain deadline (20 s here, 30 s by default), then logged them as
    # "lost" though they stay in its data directory.
    values = {_create(cluster, n, b"w|i:%d;" % i): b"w|i:%d;" % i
              for i, n in enumerate(NAMES * 3)}
    time.sleep(0.5)  # past the --fsync interval window (README, Durability)
    for daemon in cluster.nodes.values():
        daemon.signal(signal.SIGTERM)
    for name, daemon in cluster.nodes.items():
        # The deadline is --drain-timeout-s 20: stopping within 15 s shows
        # the drain ended because nobody stays, not because time ran out.
        assert daemon.wait(15) == 0, daemon.log()
        log = daemon.log()
        assert "event=drain_incomplete" not in log, (name, log)
        assert "event=drain_timeout" not in log, (name, log)
    _start_all_together(cluster)
    _assert_served(cluster, "a", values)


def test_a_node_its_running_peer_does_not_take_creates_no_single_copy_sessions(
    workdir: Path,
) -> None:
    # web4 started before web1-3 were told of it (or with another secret):
    # it heard nobody and created sessions alone, whose IDs the others took
    # for client-chosen ones and served as new: two masters, never
    # reconciled, acknowledged writes lost (DEPLOYMENT.md, section 4).
    secret = workdir / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    ports = {name: _free_port() for name in ("a", "b", "z")}
    common = ["--cluster-secret-file", str(secret), "--dead-after-ms", str(DEAD_AFTER_MS),
              "--heartbeat-ms", "250"]
    dirs = {name: workdir / name for name in ("a", "b")}
    for d in dirs.values():
        d.mkdir()
    # b's peer list lacks a (z is nobody, so that b is a cluster node).
    b = Daemon(dirs["b"], "--node", "b", "--cluster-listen", f"127.0.0.1:{ports['b']}",
               "--peer", f"z=127.0.0.1:{ports['z']}", *common)
    a = Daemon(dirs["a"], "--node", "a", "--cluster-listen", f"127.0.0.1:{ports['a']}",
               "--peer", f"b=127.0.0.1:{ports['b']}", *common)
    try:
        deadline = time.monotonic() + 20
        while "event=peer_refuses_this_node peer=b" not in a.log():
            assert time.monotonic() < deadline, a.log()
            time.sleep(0.1)
        with Client(a.address) as c:
            reply = c.request(p.Create())
            assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE, reply
            assert "b refuse" in reply.message and "[cluster.peers]" in reply.message
        assert b.proc is not None and b.proc.poll() is None
    finally:
        for daemon in (a, b):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


class _QuickIdle(Cluster):
    """Connections silent for 1 s are idle."""

    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--idle-timeout-s", "1"]


@pytest.fixture
def quick_idle_pair(workdir: Path) -> Iterator[Cluster]:
    pair = _QuickIdle(workdir, ("a", "b"))
    yield pair
    pair.stop()


def test_a_silent_request_holding_a_lock_through_another_node_keeps_its_connection(
    quick_idle_pair: Cluster,
) -> None:
    # The idle timeout spares a connection holding a lock: it looked only
    # at the locks held on the client's own node, so a long request on a
    # session mastered elsewhere (§5.3) was cut off and lost its write.
    pair = quick_idle_pair
    sid = _create(pair, "a", b"n|i:1;")  # mastered by a
    with Client(pair.nodes["b"].address) as c:  # its lock taken on a, through b
        assert c.request(p.Read(sid)) == p.Data(b"n|i:1;")
        time.sleep(2.5)  # silent past the idle timeout, holding the lock
        assert c.request(p.Write(sid, 60, b"n|i:2;")) == p.OK
    assert _counter(pair, "a", sid) == 2


def test_a_silent_client_whose_lock_went_with_its_master_is_idle_closed(
    quick_idle_pair: Cluster,
) -> None:
    # Sparing connections that hold a lock through another node must not
    # spare one whose lock is gone with its master: a hung worker would
    # keep its connection, and its slot, for ever.
    pair = quick_idle_pair
    sid = _create(pair, "a", b"n|i:1;")  # mastered by a
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(pair.nodes["b"].sock_path)
        raw.settimeout(30)
        raw.sendall(b"HELLO 1\nREAD " + sid.encode() + b" LOCK\n")
        got = b""
        while not got.endswith(b"n|i:1;"):
            chunk = raw.recv(4096)
            assert chunk, got
            got += chunk
        pair.nodes["a"].kill9()
        assert raw.recv(4096) == b""  # closed once idle: the lock is gone
