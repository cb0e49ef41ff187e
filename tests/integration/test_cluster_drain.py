"""Drains of thousands of sessions, which a node hands over many at once
(CLUSTER.md §8), with real daemons on loopback: nothing may be lost or left
with one copy, whatever happens meanwhile."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phpsess import protocol as p
from phpsess.client import Client, ClientError
from tests.integration.test_cluster import Cluster, _acks, _counter, _create, _Nft, _php
from tests.integration.test_cluster import cluster as cluster  # the fixture

pytestmark = pytest.mark.xdist_group("cluster")

_BATCH = 60  # CREATEs at once: max_locks_per_connection is 64


def _value(i: int) -> bytes:
    """A 1 KiB value, different per session."""
    return (b"n|i:%d;blob|s:" % i + b"%07d." % i * 128)[:1024]


def _fill(cluster: Cluster, on: str, count: int) -> dict[str, bytes]:
    """``count`` sessions created and written on ``on`` (their master),
    pipelined as many PHP requests at once would."""
    values: dict[str, bytes] = {}
    with Client(cluster.nodes[on].address, timeout_s=60) as c:
        while len(values) < count:
            created = c.pipeline([p.Create(26, 5)] * min(_BATCH, count - len(values)))
            batch: dict[str, bytes] = {}
            for reply in created:
                assert isinstance(reply, p.Ok), reply
                batch[reply.tokens[0]] = _value(len(values) + len(batch))
            writes = c.pipeline([p.Write(sid, 1440, v) for sid, v in batch.items()])
            assert writes == [p.OK] * len(batch), writes
            values.update(batch)
    return values


def _unreadable(cluster: Cluster, via: str, values: dict[str, bytes]) -> dict[str, p.Reply]:
    """The sessions that do not read back with their value through ``via``."""
    wrong: dict[str, p.Reply] = {}
    sids = list(values)
    with Client(cluster.nodes[via].address, timeout_s=60) as c:
        for start in range(0, len(sids), 500):
            chunk = sids[start:start + 500]
            for sid, reply in zip(chunk, c.pipeline([p.Read(s, lock=False) for s in chunk]),
                                  strict=True):
                if reply != p.Data(values[sid]):
                    wrong[sid] = reply
    return wrong


def _stored(cluster: Cluster, name: str) -> int:
    sessions: int = cluster.stats(name)["sessions"]
    return sessions


def _wait_log(cluster: Cluster, name: str, text: str, limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while text not in cluster.nodes[name].log():
        assert time.monotonic() < deadline, cluster.nodes[name].log()
        time.sleep(0.02)


def test_a_drain_of_thousands_of_sessions_leaves_each_with_two_copies(
    cluster: Cluster,
) -> None:
    values = _fill(cluster, "a", 3000)
    a = cluster.nodes["a"]
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0
    log = a.log()
    assert "event=drained handed_over=3000 " in log, log
    assert "event=drain_incomplete" not in log and "event=handoff_refused" not in log, log
    for name in ("b", "c"):
        assert _unreadable(cluster, name, values) == {}, name
    # Each of the two that remain holds every session: a master and a backup
    # copy of each (only these sessions exist), none lost or left alone.
    assert (_stored(cluster, "b"), _stored(cluster, "c")) == (3000, 3000)


def test_writes_under_a_lock_while_thousands_are_handed_over_are_not_lost(
    cluster: Cluster,
) -> None:
    # PHP requests through b on sessions a masters (forwarded to a) lock,
    # read, write and release them over and over while a drains.  A write's
    # copy to the backup is still unanswered when the lock is free again: the
    # session's HANDOFF must not overtake it (it goes on another connection
    # than the copies, CLUSTER.md §8), or the backup, master by then, refuses
    # the copy as stale, and the write, stored and handed over, is answered
    # UNAVAILABLE (its outcome unknown).  Every read must find the last
    # acknowledged write, and every write must succeed: the draining node
    # keeps its peers' connections (their forwarded locks) open while it
    # lets its own clients finish; closing an idle one raced the next
    # request on it, whose lock was then lost (LOCK_LOST).
    values = _fill(cluster, "a", 2000)
    hot = list(values)[::100]  # 20 sessions written throughout the drain
    acked = dict.fromkeys(hot, 0)
    failed: list[str] = []
    stop = threading.Event()

    def writer(sid: str) -> None:
        expected = values[sid]
        with Client(cluster.nodes["b"].address, timeout_s=30) as c:
            while not stop.is_set():
                got = c.request(p.Read(sid))
                if isinstance(got, p.Error) and got.code is p.Code.UNAVAILABLE:
                    time.sleep(0.01)  # where it is cannot be told yet (§5.5): retry
                    continue
                if got != p.Data(expected):
                    failed.append(f"READ {sid} #{acked[sid]}: {got}")
                    return
                written = c.request(p.Write(sid, 1440, b"n|i:%d;" % (acked[sid] + 1)))
                if written != p.OK:
                    failed.append(f"WRITE {sid} #{acked[sid] + 1}: {written}")
                    return
                acked[sid] += 1
                expected = b"n|i:%d;" % acked[sid]

    threads = [threading.Thread(target=writer, args=(sid,)) for sid in hot]
    for thread in threads:
        thread.start()
    a = cluster.nodes["a"]
    try:
        time.sleep(0.5)
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        time.sleep(0.5)  # writes go on through b, to the new masters
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failed == [], failed
    log = a.log()
    assert "event=drained handed_over=2000 " in log, log
    for sid in hot:
        assert acked[sid] > 0
        values[sid] = b"n|i:%d;" % acked[sid]
    for name in ("b", "c"):
        assert _unreadable(cluster, name, values) == {}, name
    assert (_stored(cluster, "b"), _stored(cluster, "c")) == (2000, 2000)


def test_its_own_clients_writes_under_a_lock_during_a_concurrent_drain_all_succeed(
    workdir: Path,
) -> None:
    # Clients of a itself, served through its drain (CLUSTER.md §8 step 2;
    # each holds the lock of one more session, which keeps the drain from
    # ending), lock and write sessions a masters over and over.  When a
    # write releases its lock, its copy to the backup is still on the way:
    # a HANDOFF sent then on a connection of its own could overtake it, the
    # backup (master by then) refuse the copy as stale, and the write,
    # stored and handed over, be answered UNAVAILABLE.  It goes behind the
    # copy instead: every write succeeds.
    cluster = Cluster(workdir)
    try:
        values = _fill(cluster, "a", 2000)
        sids = list(values)
        anchors, hot = sids[:10], sids[10:20]
        acked = dict.fromkeys(hot, 0)
        last = {sid: values[sid] for sid in hot}  # the last write acknowledged
        failed: list[str] = []
        stop = threading.Event()
        clients = [Client(cluster.nodes["a"].address, timeout_s=30) for _ in hot]
        for c, anchor in zip(clients, anchors, strict=True):
            assert c.request(p.Read(anchor)) == p.Data(values[anchor])  # held throughout

        def writer(c: Client, sid: str) -> None:
            # Pipelined cycles: the next READ comes as soon as a WRITE is
            # answered, so the lock is free while the copy is on its way.
            expected = values[sid]
            while not stop.is_set():
                n = acked[sid]
                cycles = [(p.Read(sid), p.Write(sid, 1440, b"n|i:%d;" % (n + k))) for k in
                          range(1, 6)]
                replies = c.pipeline([r for cycle in cycles for r in cycle])
                for (_, write), got, written in zip(cycles, replies[::2], replies[1::2],
                                                    strict=True):
                    if isinstance(got, p.Error) and got.code is p.Code.UNAVAILABLE:
                        # Where it is could not be told yet (§5.5): its WRITE
                        # went without the lock, whatever it says.
                        if written == p.OK:
                            expected = write.data
                        continue
                    if got != p.Data(expected):
                        failed.append(f"READ {sid}: {got}, not {expected!r}")
                        return
                    if written != p.OK:
                        failed.append(f"WRITE {sid} {write.data!r} under the lock: {written}")
                        return
                    expected = write.data
                acked[sid] = n + 5
                last[sid] = expected

        threads = [threading.Thread(target=writer, args=pair) for pair in zip(clients, hot,
                                                                              strict=True)]
        for thread in threads:
            thread.start()
        a = cluster.nodes["a"]
        try:
            time.sleep(0.3)
            a.signal(signal.SIGTERM)
            _wait_log(cluster, "b", "event=peer_draining peer=a")  # its drain begins
            time.sleep(2)  # everything but the anchors is handed over meanwhile
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        for c, anchor in zip(clients, anchors, strict=True):
            assert c.request(p.Write(anchor, 1440, values[anchor])) == p.OK
            c.close()
        assert a.wait(30) == 0
        assert failed == [], failed
        log = a.log()
        assert "event=drained handed_over=2000 " in log, log
        for sid in hot:
            assert acked[sid] > 0
        values.update(last)
        for name in ("b", "c"):
            assert _unreadable(cluster, name, values) == {}, name
        assert (_stored(cluster, "b"), _stored(cluster, "c")) == (2000, 2000)
    finally:
        cluster.stop()


def test_a_peer_killed_in_the_middle_of_a_concurrent_drain_loses_no_session(
    cluster: Cluster,
) -> None:
    # a hands its sessions to b and c, many at once; c is killed while they
    # go.  The HANDOFFs in flight to c fail together (some may have been
    # taken, their answer lost); a must wait for c to be declared dead and
    # hand what is left to b, every session once, none lost: those c took
    # are b's after its takeover, the others come from a.
    values = _fill(cluster, "a", 4000)
    on_b = _stored(cluster, "b")
    a, c = cluster.nodes["a"], cluster.nodes["c"]
    a.signal(signal.SIGTERM)
    # c backs up on b what it was handed: b's count grows as c takes them.
    deadline = time.monotonic() + 15
    while _stored(cluster, "b") < on_b + 100:
        assert time.monotonic() < deadline, a.log()
        time.sleep(0.005)
    c.kill9()
    assert a.wait(30) == 0
    log = a.log()
    # Not all counted as handed over: c may have taken some whose answer
    # was lost; a finds them b's (after its takeover from c) and drops them.
    assert "event=drained handed_over=" in log, log
    assert "event=drain_incomplete" not in log, log
    assert "event=handoff_failed peer=c" in log, "c was killed after the drain: " + log
    _wait_log(cluster, "b", "event=peer_dead peer=c")
    assert _unreadable(cluster, "b", values) == {}
    assert _stored(cluster, "b") == 4000


def test_its_own_clients_new_and_php_alike_are_served_through_its_drain(
    cluster: Cluster,
) -> None:
    # A restart drains first.  Its clients used to be refused (or, with the
    # socket unit, to wait for the next daemon) from the moment it got
    # SIGTERM, for the whole hand-over.  Now they are served on meanwhile,
    # new connections too: the sessions it masters are handed over as they
    # are asked for, and their requests go to the new masters (CLUSTER.md §8).
    values = _fill(cluster, "a", 200)
    held, *others = list(values)
    on_a = _create(cluster, "a", b"n|i:0;")
    on_b = _create(cluster, "b", b"n|i:0;")
    a = cluster.nodes["a"]
    with Client(a.address, timeout_s=30) as holder:
        # A slow request on a session a masters keeps the drain from ending.
        assert holder.request(p.Read(held)) == p.Data(values[held])
        a.signal(signal.SIGTERM)
        _wait_log(cluster, "b", "event=peer_draining peer=a")
        php = [_php(sid, 30, [a.address]) for sid in (on_a, on_b)]
        for sid in others[:20]:
            with Client(a.address, timeout_s=30) as c:  # a new connection each
                assert c.request(p.Read(sid)) == p.Data(values[sid]), a.log()
                values[sid] = b"n|i:%d;" % len(sid)
                assert c.request(p.Write(sid, 1440, values[sid])) == p.OK
        with Client(a.address, timeout_s=30) as c:
            created = c.request(p.Create(26, 5))
            assert isinstance(created, p.Ok), created
            new = created.tokens[0]
            assert c.request(p.Write(new, 1440, b"new")) == p.OK
        for proc in php:
            out, err = proc.communicate(timeout=60)
            assert (out.splitlines(), err) == ([f"ack {n}" for n in range(1, 31)], ""), a.log()
        assert a.proc is not None and a.proc.poll() is None, "the drain waits for the holder"
        assert holder.request(p.Write(held, 1440, b"held")) == p.OK
        values[held] = b"held"
    assert a.wait(30) == 0
    log = a.log()
    assert "event=drained handed_over=201 " in log, log
    assert "event=drain_incomplete" not in log, log
    assert _unreadable(cluster, "b", values) == {}
    assert _unreadable(cluster, "c", {on_a: b"n|i:30;", on_b: b"n|i:30;", new: b"new"}) == {}


def test_a_lock_its_client_holds_through_a_peer_outlasts_the_hand_over(
    cluster: Cluster,
) -> None:
    # A request on a holds the lock of a session b masters (through a's
    # connection to b, CLUSTER.md §5.3) when a is stopped.  a used to count
    # only the locks held on itself: it found the client idle and closed it,
    # the lock on b went with it, and the request's write was lost.
    sid = _create(cluster, "b", b"v1")
    a = cluster.nodes["a"]
    with Client(a.address, timeout_s=30) as c:
        assert c.request(p.Read(sid)) == p.Data(b"v1")
        a.signal(signal.SIGTERM)
        _wait_log(cluster, "a", "event=ending_clients connections=1 ")
        time.sleep(0.5)  # a closes idle clients every 50 ms
        assert c.request(p.Write(sid, 1440, b"v2")) == p.OK
    assert a.wait(30) == 0
    assert _unreadable(cluster, "c", {sid: b"v2"}) == {}


def _all_alive(cluster: Cluster, limit_s: float = 15) -> None:
    """Every node sees every other one alive (a restarted node's log still
    holds its last run's lines: asked, not read from the log)."""
    deadline = time.monotonic() + limit_s
    for name in cluster.nodes:
        while not all(
            peer["state"] == "alive" and not peer["draining"]
            for peer in cluster.stats(name)["cluster"]["peers"].values()
        ):
            assert time.monotonic() < deadline, cluster.nodes[name].log()
            time.sleep(0.05)


def test_a_rolling_restart_under_php_load_loses_no_acknowledged_write(
    cluster: Cluster,
) -> None:
    # The upgrade of DEPLOYMENT.md §5 on every server in turn, while PHP
    # requests spread round-robin over all three (the restarting one too)
    # increment two sessions created on each: each node drains (its
    # sessions move twice over the whole restart), starts again and
    # rejoins.  No write PHP was told succeeded may be lost, and every
    # session ends with its two copies.
    sids = [_create(cluster, name, b"n|i:0;") for name in cluster.nodes for _ in range(2)]
    addresses = [cluster.address(name) for name in cluster.nodes]
    writers = [_php(sid, 100000, addresses, retry=True, offset=i) for i, sid in enumerate(sids)]
    try:
        time.sleep(1)
        for daemon in cluster.nodes.values():
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0, daemon.log()
            log = daemon.log()
            assert "event=drain_incomplete" not in log and "event=leaving" in log, log
            daemon.start()
            _all_alive(cluster)
            time.sleep(0.5)  # PHP requests reach the node again
    finally:
        for w in writers:
            w.terminate()
    outs = [w.communicate(timeout=30)[0] for w in writers]
    for sid, out in zip(sids, outs, strict=True):
        acks = _acks(out)
        assert len(acks) > 20 and acks == list(range(1, len(acks) + 1)), (sid, acks)
        for via in cluster.nodes:
            stored = _counter(cluster, via, sid)
            # The last request may have been stored, its reply cut off.
            assert acks[-1] <= stored <= acks[-1] + 1, (sid, via, acks[-1], stored)
    assert sum(_stored(cluster, name) for name in cluster.nodes) == 2 * len(sids)


def _master_of(sid: str) -> str:
    """The master a session's ID names (``<random>-<master>-<backup>``)."""
    return sid.rsplit("-", 2)[1]


def test_a_session_created_through_a_draining_node_is_made_and_locked_on_a_peer(
    cluster: Cluster,
) -> None:
    # A new visitor on the draining server: its CREATE named another node
    # as master but took the lock on the draining one, where it protected
    # nothing.  A request elsewhere got the same session's lock at once, and
    # the creator's write then failed LOCKED.  Now the CREATE is made on a
    # peer that stays, through a (CLUSTER.md §8), and its lock holds there.
    a = cluster.nodes["a"]
    held = _create(cluster, "a", b"x")
    with Client(a.address, timeout_s=30) as holder:
        assert holder.request(p.Read(held)) == p.Data(b"x")  # the drain goes on
        a.signal(signal.SIGTERM)
        _wait_log(cluster, "b", "event=peer_draining peer=a")
        _wait_log(cluster, "c", "event=peer_draining peer=a")
        with Client(a.address, timeout_s=30) as creator:
            created = creator.request(p.Create(26, 5))
            assert isinstance(created, p.Ok), created
            sid = created.tokens[0]
            assert _master_of(sid) != "a", sid
            for name in ("a", "b", "c"):
                with Client(cluster.nodes[name].address) as c:
                    assert c.request(p.Exists(sid)) == p.Ok(("1",)), name
            got: list[p.Reply] = []
            with Client(cluster.nodes["c"].address, timeout_s=30) as other:
                waiter = threading.Thread(target=lambda: got.append(other.request(p.Read(sid))))
                waiter.start()
                waiter.join(1)
                assert got == [], "another request got the lock the creator holds"
                assert creator.request(p.Write(sid, 1440, b"creator")) == p.OK
                waiter.join(10)
                assert got == [p.Data(b"creator")]
                assert other.request(p.Write(sid, 1440, b"other")) == p.OK
        assert holder.request(p.Write(held, 1440, b"y")) == p.OK
    assert a.wait(30) == 0
    log = a.log()
    assert "event=leaving" in log and "event=shutdown_timeout" not in log, log
    assert _unreadable(cluster, "b", {sid: b"other", held: b"y"}) == {}


def test_a_busy_session_is_handed_over_though_its_own_clients_take_turns_on_its_lock(
    cluster: Cluster,
) -> None:
    # Two clients of the draining node take turns on one session's lock, as
    # concurrent requests of one user do: the lock went from one to the
    # other, the drain never found it free, and another node's request for
    # it got UNAVAILABLE until the drain deadline.  Now new locks wait for
    # the hand-over once the drain has found the session locked.
    a = cluster.nodes["a"]
    sid = _create(cluster, "a", b"0")
    stop = threading.Event()
    failed: list[str] = []

    def take_turns() -> None:
        # Until a ends its clients, once the hand-over is done.
        with contextlib.suppress(ClientError), Client(a.address, timeout_s=30) as c:
            while not stop.is_set():
                got = c.request(p.Read(sid))
                if not isinstance(got, p.Data):
                    failed.append(f"READ: {got}")
                    return
                time.sleep(0.05)
                written = c.request(p.Write(sid, 1440, b"%d" % (int(got.data) + 1)))
                if written != p.OK:
                    failed.append(f"WRITE: {written}")
                    return

    turns = [threading.Thread(target=take_turns) for _ in range(2)]
    for thread in turns:
        thread.start()
    try:
        time.sleep(0.3)
        a.signal(signal.SIGTERM)
        _wait_log(cluster, "b", "event=peer_draining peer=a")
        with Client(cluster.nodes["b"].address, timeout_s=30) as c:
            got = c.request(p.Read(sid))
            assert isinstance(got, p.Data), (got, a.log())
            assert c.request(p.Write(sid, 1440, b"%d" % (int(got.data) + 1))) == p.OK
    finally:
        stop.set()
        for thread in turns:
            thread.join(30)
    assert failed == [], failed
    assert a.wait(30) == 0
    log = a.log()
    assert "event=drained handed_over=1 " in log and "event=drain_incomplete" not in log, log


def test_writes_without_the_lock_during_the_hand_over_are_all_kept(cluster: Cluster) -> None:
    # Clients that do not lock (PROTOCOL.md §4.2; the PHP handler's
    # locking=0) write a's sessions while a hands them over.  A write made
    # while a HANDOFF was in flight was copied to the old backup after the
    # snapshot the new master started from: refused UNAVAILABLE, or
    # acknowledged and then lost.  Now such a change waits for the
    # hand-over and goes to the new master (CLUSTER.md §8).
    values = _fill(cluster, "a", 100)
    sids = list(values)
    a = cluster.nodes["a"]
    written: dict[str, list[tuple[bytes, p.Reply]]] = {sid: [] for sid in sids}
    stop = threading.Event()

    def write_unlocked(mine: list[str]) -> None:
        n = 0
        with contextlib.suppress(ClientError), Client(a.address, timeout_s=30) as c:
            while not stop.is_set():
                for sid in mine:
                    n += 1
                    value = b"v%08d" % n
                    written[sid].append((value, c.request(p.Write(sid, 1440, value))))

    writers = [threading.Thread(target=write_unlocked, args=(sids[i::4],)) for i in range(4)]
    for thread in writers:
        thread.start()
    try:
        time.sleep(0.5)
        a.signal(signal.SIGTERM)
        _wait_log(cluster, "a", "event=ending_clients", 60)
    finally:
        stop.set()
        for thread in writers:
            thread.join(30)
    assert a.wait(30) == 0
    refused = [(sid, reply) for sid in sids for _, reply in written[sid] if reply != p.OK]
    assert refused == [], refused[:5]
    last = {sid: written[sid][-1][0] for sid in sids if written[sid]}
    assert len(last) == len(sids)
    assert _unreadable(cluster, "b", last) == {}


class _ShortDrainCluster(Cluster):
    def args(self, name: str, secret: Path) -> list[str]:
        return [*super().args(name, secret), "--drain-timeout-s", "3",
                "--shutdown-timeout-s", "4"]


def test_a_lock_released_after_the_drain_deadline_within_the_shutdown_timeout_is_handed_over(
    workdir: Path,
) -> None:
    # A request holds a's session past the drain deadline (3 s) and writes
    # within the shutdown timeout (4 s more).  The session is handed over
    # then (the old order waited for such requests before the hand-over
    # began); it used to be left on a, its HANDOFF sent after the deadline
    # and its answer ignored: drain_incomplete, and no leave announced.
    cluster = _ShortDrainCluster(workdir)
    try:
        a = cluster.nodes["a"]
        sid = _create(cluster, "a", b"v1")
        with Client(a.address, timeout_s=30) as holder:
            assert holder.request(p.Read(sid)) == p.Data(b"v1")
            a.signal(signal.SIGTERM)
            _wait_log(cluster, "a", "event=ending_clients")
            time.sleep(1)
            assert holder.request(p.Write(sid, 1440, b"v2")) == p.OK
        assert a.wait(30) == 0
        log = a.log()
        assert "event=drained handed_over=1 " in log and "event=leaving" in log, log
        assert "event=drain_incomplete" not in log, log
        assert _unreadable(cluster, "c", {sid: b"v2"}) == {}
    finally:
        cluster.stop()


def _drain_held_open(cluster: Cluster) -> Client:
    """a drains, kept from ending by a client of its own holding the lock
    of one more session a masters; a has found that one locked (pending).
    The caller closes the returned holder (its lock released unwritten)."""
    a = cluster.nodes["a"]
    keep = _create(cluster, "a", b"k")
    holder = Client(a.address, timeout_s=60)
    assert holder.request(p.Read(keep)) == p.Data(b"k")
    a.signal(signal.SIGTERM)
    _wait_log(cluster, "b", "event=peer_draining peer=a")
    time.sleep(1)  # past the drain's first rounds: the rest is handed over
    return holder


def test_during_the_drain_a_locked_session_refuses_an_unlocked_change_and_times_out_a_lock(
    cluster: Cluster,
) -> None:
    # A client of a holds a session a masters while a drains.  A WRITE or
    # DESTROY without the lock waited for the hand-over, then landed on
    # top of the holder's write (LOCKED at once when a does not drain);
    # a locking READ waited past its wait_ms until the hand-over.
    a = cluster.nodes["a"]
    sid = _create(cluster, "a", b"v0")
    with Client(a.address, timeout_s=60) as holder:
        assert holder.request(p.Read(sid)) == p.Data(b"v0")
        keep = _drain_held_open(cluster)
        with Client(a.address, timeout_s=60) as c:
            for change in (p.Write(sid, 1440, b"unlocked"), p.Destroy(sid)):
                refused = c.request(change)
                assert isinstance(refused, p.Error) and refused.code is p.Code.LOCKED, refused
        # As the PHP handler does, the client gives up on a reply well past
        # its lock wait (its timeout, 5 s by default): a wait until the
        # hand-over lasted until the drain deadline (20 s here).
        with Client(a.address, wait_ms=300, timeout_s=5) as c:
            waited = c.request(p.Read(sid))
            assert isinstance(waited, p.Error) and waited.code is p.Code.LOCK_TIMEOUT, waited
        assert holder.request(p.Write(sid, 1440, b"holder")) == p.OK
    keep.close()
    assert a.wait(30) == 0
    assert _unreadable(cluster, "b", {sid: b"holder"}) == {}


@contextlib.contextmanager
def _lease_run_out_and_handed_over(cluster: Cluster) -> Iterator[tuple[str, Client]]:
    """A client of a locks a session a masters with a 1 s lease and
    overruns it while a drains (held open: :func:`_drain_held_open`) and
    hands the session over.  Yields the session and that client; after
    the block, a must exit 0."""
    a = cluster.nodes["a"]
    sid = _create(cluster, "a", b"v0")
    with Client(a.address, timeout_s=30, lease_ms=1000) as late:
        assert late.request(p.Read(sid)) == p.Data(b"v0")
        keep = _drain_held_open(cluster)
        time.sleep(1)  # past the lease: revoked, then handed over
        yield sid, late
    keep.close()
    assert a.wait(30) == 0


def test_a_lock_lost_to_its_lease_before_the_hand_over_is_still_lost_after_it(
    cluster: Cluster,
) -> None:
    # A client of a overruns its lock's lease on a session a masters; a
    # drains and hands the session over; another request locks and writes
    # it.  The first client's late WRITE went to the new master, which had
    # no lock for anyone by then, and overwrote the other's write.  It gets
    # LOCK_LOST (PROTOCOL.md §6.3), as when a does not drain.
    with _lease_run_out_and_handed_over(cluster) as (sid, late):
        with Client(cluster.nodes["b"].address, timeout_s=30) as other:
            assert other.request(p.Read(sid)) == p.Data(b"v0")
            assert other.request(p.Write(sid, 1440, b"other")) == p.OK
        lost = late.request(p.Write(sid, 1440, b"late"))
        assert isinstance(lost, p.Error) and lost.code is p.Code.LOCK_LOST, lost
    assert _unreadable(cluster, "c", {sid: b"other"}) == {}


def test_a_new_lock_after_one_lost_to_its_lease_holds_through_the_hand_over(
    cluster: Cluster,
) -> None:
    # As above, but the client, without writing, gives the session up
    # (session_abort(): CLOSE) and starts it again: a new lock forgets the
    # lost one (PROTOCOL.md §6.3).  Taken on the new master, it did not:
    # its WRITE got LOCK_LOST from the old one's mark left on a.
    with _lease_run_out_and_handed_over(cluster) as (sid, late):
        assert late.request(p.Close()) == p.OK
        assert late.request(p.Read(sid)) == p.Data(b"v0")
        assert late.request(p.Write(sid, 1440, b"relocked")) == p.OK
    assert _unreadable(cluster, "c", {sid: b"relocked"}) == {}


def test_a_session_destroyed_after_its_hand_over_reads_as_unknown_everywhere(
    cluster: Cluster,
) -> None:
    # Destroyed after a handed it over, during a's drain: a's hint sent
    # requests to the new master, which sent them back to a, the master
    # the ID names, each answering NOT_MASTER, until UNAVAILABLE.  Nobody
    # holds it: it reads as unknown, as any destroyed session.
    a = cluster.nodes["a"]
    sid = _create(cluster, "a", b"v0")
    keep = _drain_held_open(cluster)
    with Client(cluster.nodes["b"].address, timeout_s=30) as c:
        assert c.request(p.Destroy(sid)) == p.OK
    for name in ("a", "b", "c"):
        with Client(cluster.nodes[name].address, wait_ms=1000, timeout_s=30) as c:
            assert c.request(p.Exists(sid)) == p.Ok(("0",)), name
            assert c.request(p.Read(sid)) == p.MISS, name
    keep.close()
    assert a.wait(30) == 0


def test_a_destroyed_id_asked_on_two_nodes_after_a_restart_is_locked_once(
    cluster: Cluster,
) -> None:
    # After the upgrade of DEPLOYMENT.md §5 (a drains, then starts again), a
    # request through a finds S on b, and a keeps b as a hint.  S is then
    # destroyed (a logout).  Its old ID comes back in two parallel requests,
    # on c and on b: a answered NOT_MASTER b by its stale hint, b sent it
    # back to a, the master the ID names, until the failover time; and a
    # shortcut for that let each asker start S itself: two holders of one
    # lock, one's acknowledged write overwritten.  Now a, asked by a hint
    # alone, checks; S exists nowhere; the one node that starts it is the
    # one the ID names (CLUSTER.md §5).
    a = cluster.nodes["a"]
    sid = "y" * 26 + "-a-b"
    with Client(a.address) as c:
        assert c.request(p.Write(sid, 1440, b"v0")) == p.OK
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0
    a.start()
    _all_alive(cluster)
    with Client(a.address, timeout_s=30) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b"v0")  # found on b
    with Client(cluster.nodes["b"].address) as c:
        assert c.request(p.Destroy(sid)) == p.OK
    with Client(cluster.nodes["c"].address, wait_ms=2000, timeout_s=30) as first, \
            Client(cluster.nodes["b"].address, wait_ms=500, timeout_s=30) as second:
        assert first.request(p.Read(sid)) == p.MISS
        waited = second.request(p.Read(sid))
        assert isinstance(waited, p.Error) and waited.code is p.Code.LOCK_TIMEOUT, waited
        assert first.request(p.Write(sid, 1440, b"first")) == p.OK
    for name in ("a", "b", "c"):
        assert _unreadable(cluster, name, {sid: b"first"}) == {}, name
    # And it was acknowledged with two copies: b, holding the destroy's
    # tombstone (epoch 2), took a's new copy (epoch 1) for a late update
    # and answered "OK" without storing it; a kill -9 of a lost the write.
    a.kill9()
    with Client(cluster.nodes["c"].address, timeout_s=30) as c:
        assert c.request(p.Read(sid, lock=False)) == p.Data(b"first")


def test_a_named_master_cut_off_from_its_hint_passes_the_hint_on(workdir: Path) -> None:
    # Four nodes.  S (named a-b) went to b in a's drain; a, restarted, found
    # it there and keeps b as a hint.  Then the link a-b alone is cut (the
    # others hear both: nobody is declared dead).  d holds no copy and asks
    # a, the named master.  Checking its hint, a got no answer from b and
    # a backup's copy from c: it waited the failover time and answered
    # UNAVAILABLE, on every request while the cut lasted, where d could
    # reach b itself.  a now passes the hint on when b does not answer.
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4", "d": "127.0.0.5"}
    cluster = Cluster(workdir, names=tuple(hosts), hosts=hosts)
    nft: _Nft | None = None
    try:
        a = cluster.nodes["a"]
        sid = "y" * 26 + "-a-b"
        with Client(a.address) as c:
            assert c.request(p.Write(sid, 1440, b"v0")) == p.OK
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        a.start()
        _all_alive(cluster)
        with Client(a.address, timeout_s=30) as c:
            assert c.request(p.Read(sid, lock=False)) == p.Data(b"v0")  # found on b
        asker = next(n for n in ("c", "d") if _stored(cluster, n) == 0)
        nft = _Nft()
        nft.cut(hosts["a"], hosts["b"])
        deadline = time.monotonic() + 15
        while cluster.stats("b")["cluster"]["peers"]["a"]["state"] != "suspect":
            assert time.monotonic() < deadline, cluster.nodes["b"].log()
            time.sleep(0.1)
        for n in range(1, 4):
            with Client(cluster.nodes[asker].address, wait_ms=1000, timeout_s=60) as c:
                assert c.request(p.Read(sid)) == p.Data(b"v%d" % (n - 1)), n
                assert c.request(p.Write(sid, 1440, b"v%d" % n)) == p.OK
    finally:
        if nft is not None:
            nft.close()
        cluster.stop()
