"""Membership and failure detection (CLUSTER.md §3): states, probes, stalls,
incarnations, backup choice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import phpsess
from phpsess.membership import (
    MAX_PEERS,
    Alive,
    Dead,
    Event,
    Heartbeat,
    Left,
    Membership,
    SelfDeclaredDead,
    Suspect,
    Unreachable,
)

HB = 0.5
DEAD_AFTER = 3.0
INC = {"a": 11, "b": 22, "c": 33, "d": 44}


def hb(
    name: str,
    incarnation: int | None = None,
    sessions: int = 0,
    sockets: int = 0,
    draining: bool = False,
    dead: tuple[tuple[str, int], ...] = (),
    hears: tuple[str, ...] = (),
) -> Heartbeat:
    inc = INC[name] if incarnation is None else incarnation
    return Heartbeat(name, inc, sessions, sockets, draining, dead, hears)


def cluster(now: float = 0.0, peers: str = "bcd") -> Membership:
    """We are ``a``; ``b``, ``c``, ``d`` (or ``peers``) are peers.  A peer
    never heard is suspected after ``DEAD_AFTER`` too: tests about one peer
    configure only the peers they hear."""
    return Membership(
        "a", ["a", *peers], INC["a"], now, heartbeat_s=HB, dead_after_s=DEAD_AFTER
    )


def run(
    m: Membership, until: float, step: float = 0.25, heard: tuple[str, ...] = ()
) -> list[Event]:
    """Tick from the last time up to ``until``, the peers in ``heard`` sending
    a heartbeat every step.  Returns every event."""
    events: list[Event] = []
    t = m._last_tick
    while t < until:
        t = min(t + step, until)
        for name in heard:
            events += m.receive(hb(name), t)
        events += m.tick(t)
    return events


def kill(m: Membership, name: str, t: float) -> list[Event]:
    """Silence ``name`` (the others keep talking) until it is suspect, then fail its probe."""
    others = tuple(p for p in m.alive_peers() if p != name)
    events = run(m, t, heard=others)
    assert Suspect(name) in events
    return events + m.probe_result(name, answered=False, now=t)


# -- lifecycle


def test_unknown_until_first_heartbeat() -> None:
    m = cluster()
    assert m.peers() == ["b", "c", "d"]  # ourselves dropped from the configured list
    assert m.state("b") == "unknown"
    assert not m.is_alive("b")
    assert m.alive_peers() == []
    assert m.is_alive("a") and m.state("a") == "alive"
    assert m.receive(hb("b"), 0.1) == [Alive("b", 22, rejoined=False)]
    assert m.state("b") == "alive"
    assert m.incarnation_of("b") == 22
    assert m.receive(hb("b"), 0.2) == []  # only the first one is news
    assert m.alive_peers() == ["b"]


def test_a_peer_never_heard_is_probed_after_dead_after_and_dead_if_its_port_refuses() -> None:
    # A node restarted while a peer is down: before, that peer stayed
    # unknown for ever, and every write to a session it backed up waited
    # for it and failed (UNAVAILABLE) instead of going on degraded.
    m = cluster()
    assert run(m, DEAD_AFTER - 0.25, heard=("b",)) == [Alive("b", 22, rejoined=False)]
    assert m.state("c") == "unknown"
    assert sorted(map(str, run(m, DEAD_AFTER, heard=("b",)))) == [
        str(Suspect("c")), str(Suspect("d"))
    ]
    # Being probed, it is not alive: nothing is routed to it meanwhile.
    assert m.state("c") == "suspect" and not m.is_alive("c") and m.alive_peers() == ["b"]
    assert m.probe_result("c", answered=False, now=DEAD_AFTER, refused=True) == [Dead("c", 0)]
    assert m.state("c") == "dead"
    # No incarnation to report: heartbeats carry no dead entry for it.
    assert m.dead_list() == {} and m.heartbeat(DEAD_AFTER).dead == ()
    # Its first heartbeat, whatever the incarnation, makes it alive: it joins late.
    assert m.receive(hb("c", 5), DEAD_AFTER + 1) == [Alive("c", 5, rejoined=False)]
    assert m.state("c") == "alive" and m.is_alive("c")
    # A heartbeat during its probe ends the suspicion the same way.
    assert m.receive(hb("d"), DEAD_AFTER + 1) == [Alive("d", 44, rejoined=False)]
    assert m.probe_result("d", answered=False, now=DEAD_AFTER + 1.1) == []
    assert m.state("d") == "alive"


def test_a_peer_never_heard_that_answers_its_probe_stays_unknown_and_is_probed_again() -> None:
    m = Membership("a", ["b"], 1, 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    assert run(m, DEAD_AFTER) == [Suspect("b")]
    assert m.probe_result("b", answered=True, now=DEAD_AFTER) == []
    assert m.state("b") == "unknown" and m.incarnation_of("b") is None
    assert run(m, 2 * DEAD_AFTER - 0.25) == []
    assert run(m, 2 * DEAD_AFTER) == [Suspect("b")]


def test_a_peer_never_heard_whose_probe_times_out_stays_unknown() -> None:
    # Maybe paused or cut off, holding copies of what we master: declared
    # dead it could never learn it (it has no incarnation for our dead list).
    m = Membership("a", ["b"], 1, 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    assert run(m, DEAD_AFTER) == [Suspect("b")]
    assert m.probe_result("b", answered=False, now=DEAD_AFTER) == []
    assert m.state("b") == "unknown" and not m.is_alive("b")
    assert run(m, 2 * DEAD_AFTER) == [Suspect("b")]  # probed again
    assert m.probe_result("b", answered=False, now=2 * DEAD_AFTER, refused=True) == [
        Dead("b", 0)
    ]


def test_a_peer_added_by_a_reload_gets_dead_after_from_then() -> None:
    m = Membership("a", ["b"], 1, 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    run(m, 10.0, heard=("b",))
    m.set_peers(["b", "c"])
    assert run(m, 10.0 + DEAD_AFTER - 0.25, heard=("b",)) == []
    assert run(m, 10.0 + DEAD_AFTER, heard=("b",)) == [Suspect("c")]


def test_unconfigured_sender_and_self_are_ignored() -> None:
    m = cluster()
    assert m.receive(Heartbeat("zed", 5, 0, 0, False, ()), 0.1) == []
    assert m.receive(Heartbeat("a", 99, 0, 0, False, ()), 0.1) == []
    assert m.state("zed") == "unknown"
    assert not m.is_alive("zed")
    assert m.load("zed") == (0, 0, False)
    assert m.incarnation_of("zed") is None


def test_silence_suspect_probe_fails_dead_then_rejoin() -> None:
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    m.receive(hb("c"), 0.0)
    events = run(m, 2.75, heard=("c",))
    assert events == []
    assert m.state("b") == "alive"
    events = run(m, 3.0, heard=("c",))
    assert events == [Suspect("b")]
    assert m.state("b") == "suspect"
    assert m.is_alive("b") and m.alive_peers() == ["b", "c"]  # not dead yet
    assert run(m, 10.0, heard=("c",)) == []  # Suspect once per episode
    assert m.probe_result("b", answered=False, now=10.0) == [Dead("b", 22)]
    assert m.state("b") == "dead"
    assert not m.is_alive("b")
    assert m.alive_peers() == ["c"]
    assert m.heartbeat().dead == (("b", 22),)
    # Its old incarnation is ignored, even its load.
    assert m.receive(hb("b", sessions=7), 10.1) == []
    assert m.state("b") == "dead"
    assert m.load("b") == (0, 0, False)
    # A restart: new incarnation.
    assert m.receive(hb("b", incarnation=23, sessions=1), 10.2) == [Alive("b", 23, True)]
    assert m.state("b") == "alive"
    assert m.load("b") == (1, 0, False)
    assert m.heartbeat().dead == (("b", 22),)  # still reported
    # The old incarnation's late datagrams are still ignored.
    assert m.receive(hb("b", incarnation=22), 10.3) == []
    assert m.incarnation_of("b") == 23


def test_dead_list_keeps_latest_incarnation_per_node() -> None:
    m = cluster()
    t = 0.0
    for inc in (100, 200, 300):
        m.receive(hb("b", incarnation=inc), t)
        m.receive(hb("c"), t)
        t += DEAD_AFTER
        events = kill(m, "b", t)
        assert Dead("b", inc) in events
        assert m.heartbeat().dead == (("b", inc),)
    assert m.dead_list() == {"b": 300}


def test_slow_peer_whose_probe_answers_stays_alive() -> None:
    m = cluster(peers="b")
    m.receive(hb("b"), 0.0)
    assert run(m, 3.0) == [Suspect("b")]
    assert m.probe_result("b", answered=True, now=3.2) == []
    assert m.state("b") == "alive"
    assert m.heartbeat().dead == ()
    # Its silence timer restarted at the probe answer.
    assert run(m, 6.0) == []
    assert run(m, 6.25) == [Suspect("b")]  # 3.2 + 3.0 = 6.2


def test_heartbeat_while_suspect_makes_it_alive_and_late_probe_failure_is_ignored() -> None:
    m = cluster(peers="b")
    m.receive(hb("b"), 0.0)
    assert run(m, 3.0) == [Suspect("b")]
    assert m.receive(hb("b"), 3.1) == []
    assert m.state("b") == "alive"
    assert m.probe_result("b", answered=False, now=3.5) == []
    assert m.state("b") == "alive"


def test_probe_result_for_non_suspect_is_ignored() -> None:
    m = cluster()
    assert m.probe_result("b", answered=False, now=0.1) == []  # unknown
    assert m.probe_result("zed", answered=False, now=0.1) == []
    m.receive(hb("b"), 0.1)
    assert m.probe_result("b", answered=False, now=0.2) == []  # alive
    assert m.state("b") == "alive"


def test_a_connection_from_a_new_incarnation_declares_the_old_one_dead() -> None:
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    assert m.connected("b", 22, 0.1) == []  # the incarnation we know
    assert m.connected("c", 5, 0.1) == []  # never heard: its heartbeat will say
    assert m.connected("zed", 5, 0.1) == []
    # b restarted before we noticed, and its heartbeats have not come yet:
    # the old incarnation is dead, the new one alive.
    assert m.connected("b", 23, 0.2) == [Dead("b", 22), Alive("b", 23, True)]
    assert m.state("b") == "alive" and m.heartbeat().dead == (("b", 22),)
    assert m.connected("b", 23, 0.3) == []  # once
    assert m.connected("b", 22, 0.3) == []  # a late connection of the dead one
    assert m.state("b") == "alive"
    assert m.receive(hb("b", 23), 0.5) == []  # already alive
    assert m.connected("b", 22, 0.6) == []  # a dead incarnation changes nothing


def test_a_connection_from_a_new_incarnation_of_a_dead_peer_is_its_rejoin() -> None:
    # A node resumed from a pause longer than detection learns it was
    # declared dead, rejoins as a new incarnation and masters new sessions
    # at once: its copy of one reaches its backup before its first
    # heartbeat does.  While the backup took the sender for dead, it took
    # the copy for a dead master's and served the session itself: two
    # masters, and locked reads that missed acknowledged writes (nemesis
    # review, repro_resume_create.py).
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    assert run(m, 10.0, heard=("c",)) == [Alive("c", INC["c"], False), Suspect("b")]
    assert m.probe_result("b", answered=False, now=10.0) == [Dead("b", 22)]
    assert not m.is_alive("b")
    assert m.connected("b", 22, 10.1) == []  # the dead incarnation
    assert not m.is_alive("b")
    assert m.connected("b", 23, 10.2) == [Alive("b", 23, True)]
    assert m.is_alive("b") and m.choose_backup() in ("b", "c")
    assert m.receive(hb("b", 23), 10.5) == []
    assert m.state("b") == "alive"


def test_restart_before_detection_declares_old_incarnation_dead() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    assert m.receive(hb("b", incarnation=999), 1.0) == [Dead("b", 22), Alive("b", 999, True)]
    assert m.state("b") == "alive"
    assert m.heartbeat().dead == (("b", 22),)
    assert m.receive(hb("b"), 1.1) == []


# -- stalls


def test_stall_prevents_false_deaths() -> None:
    m = cluster()
    for name in "bcd":
        m.receive(hb(name), 0.0)
    assert run(m, 1.0, heard=tuple("bcd")) == []
    # SIGSTOP for 10 s: nobody was heard, but the silence was ours.
    assert m.tick(11.0) == []
    assert m.stalls_total == 1
    assert [m.state(n) for n in "bcd"] == ["alive"] * 3
    # They talk again after the resume: nothing happens.
    assert run(m, 20.0, heard=tuple("bcd")) == []
    assert m.stalls_total == 1


def test_after_a_stall_a_really_dead_peer_is_still_detected() -> None:
    m = cluster(peers="bc")
    for name in "bc":
        m.receive(hb(name), 0.0)
    assert m.tick(11.0) == []  # stall
    events = run(m, 14.0, heard=("c",))
    assert events == [Suspect("b")]  # dead_after_s after the resume
    assert m.probe_result("b", answered=False, now=14.5) == [Dead("b", 22)]


def test_probe_failing_because_of_our_own_stall_does_not_kill() -> None:
    m = cluster(peers="b")
    m.receive(hb("b"), 0.0)
    assert run(m, 3.0) == [Suspect("b")]
    # We are stopped while the probe is out; its timeout fires on resume,
    # before the tick that would notice the stall.
    assert m.probe_result("b", answered=False, now=20.0) == []
    assert m.state("b") == "alive"
    assert m.stalls_total == 1
    assert m.tick(20.1) == []


def test_no_deaths_within_grace_after_a_stall() -> None:
    m = cluster(peers="b")
    m.receive(hb("b"), 0.0)
    assert run(m, 3.0) == [Suspect("b")]
    assert m.tick(20.0) == []  # the stall is noticed first
    assert m.state("b") == "suspect"
    assert m.probe_result("b", answered=False, now=20.3) == []  # within dead_after_s
    assert m.state("b") == "alive"
    assert run(m, 23.3) == [Suspect("b")]
    assert m.probe_result("b", answered=False, now=23.5) == [Dead("b", 22)]


def test_ticks_on_schedule_never_look_like_stalls() -> None:
    m = Membership("a", ["b"], 1, 0.0, heartbeat_s=5.0, dead_after_s=3.0)
    m.receive(hb("b"), 0.0)
    t = 0.0
    for _ in range(100):
        if m.heartbeat_due(t):
            m.sent_heartbeat(t)
        t = m.next_deadline()
        m.receive(hb("b"), t)
        assert m.tick(t) == []
    assert m.stalls_total == 0


# -- self declared dead


def test_self_declared_dead() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    assert m.receive(hb("b", dead=(("a", 12),)), 0.1) == []  # another incarnation of us
    assert m.receive(hb("b", dead=(("a", 11),)), 0.2) == [SelfDeclaredDead(by="b")]
    assert m.receive(hb("b", dead=(("a", 11),)), 0.3) == []  # once per sender incarnation
    # c also declared b dead: evidence, so we suspect b (our probe decides).
    assert m.receive(hb("c", dead=(("a", 11), ("b", 22))), 0.3) == [
        SelfDeclaredDead(by="c"),
        Alive("c", 33, False),
        Suspect("b"),
    ]
    # A restarted b says it again.
    assert m.receive(hb("b", incarnation=5, dead=(("a", 11),)), 0.4) == [
        SelfDeclaredDead(by="b"),
        Dead("b", 22),
        Alive("b", 5, True),
    ]


def test_self_declared_dead_even_from_a_peer_we_hold_dead() -> None:
    """After a partition heals both sides may hold the other dead."""
    m = cluster()
    m.receive(hb("b"), 0.0)
    kill(m, "b", 3.0)
    assert m.receive(hb("b", dead=(("a", 11),)), 3.5) == [SelfDeclaredDead(by="b")]
    assert m.state("b") == "dead"


# -- load and backup choice


def test_load_and_set_load() -> None:
    m = cluster()
    m.set_load(5, 2, False)
    assert m.load("a") == (5, 2, False)
    assert m.heartbeat() == Heartbeat("a", 11, 5, 2, False, ())
    m.receive(hb("b", sessions=3, sockets=4, draining=True), 0.0)
    assert m.load("b") == (3, 4, True)
    assert m.load("c") == (0, 0, False)
    with pytest.raises(ValueError):
        m.set_load(-1, 0, False)


@pytest.mark.parametrize(
    ("loads", "exclude", "expected"),
    [
        ({}, (), None),
        ({"b": (5, 0, False), "c": (1, 1, False), "d": (9, 9, False)}, (), "c"),
        ({"b": (1, 1, False), "c": (2, 0, False), "d": (0, 2, False)}, (), "b"),  # ties by name
        ({"b": (1, 1, False), "c": (2, 0, False)}, ("b",), "c"),
        ({"b": (0, 0, True), "c": (9, 0, False)}, (), "c"),  # draining is never chosen
        ({"b": (0, 0, True)}, (), None),
        ({"b": (0, 0, False)}, ("b",), None),
        ({"b": (0, 0, False)}, ("a",), "b"),
    ],
)
def test_choose_backup(
    loads: dict[str, tuple[int, int, bool]], exclude: tuple[str, ...], expected: str | None
) -> None:
    m = cluster()
    m.set_load(0, 0, False)  # we are the least loaded, and never chosen
    for name, (sessions, sockets, draining) in loads.items():
        m.receive(hb(name, sessions=sessions, sockets=sockets, draining=draining), 0.0)
    assert m.choose_backup(exclude) == expected
    assert m.degraded == (m.choose_backup() is None)


def test_choose_backup_skips_suspect_and_dead() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    m.receive(hb("c", sessions=5), 0.0)
    m.receive(hb("d", sessions=9), 0.0)
    assert m.choose_backup() == "b"
    run(m, 3.0, heard=("c", "d"))
    assert m.state("b") == "suspect"
    assert m.choose_backup() == "c"
    run(m, 6.0, heard=("d",))
    m.probe_result("c", answered=False, now=6.0)
    assert m.state("c") == "dead"
    assert m.choose_backup() == "d"
    assert not m.degraded


def test_degraded() -> None:
    m = cluster(peers="bc")
    assert m.degraded  # nobody heard from yet
    m.receive(hb("b", draining=True), 0.0)
    assert m.degraded
    m.receive(hb("c"), 0.0)
    assert not m.degraded
    m.receive(hb("c", draining=True), 0.1)
    assert m.degraded
    m.receive(hb("c", draining=False), 0.2)
    assert not m.degraded
    assert run(m, 3.2) == [Suspect("b"), Suspect("c")]
    assert m.degraded  # a suspect is not chosen as a backup
    assert m.probe_result("c", answered=False, now=3.3) == [Dead("c", 33)]
    assert m.probe_result("b", answered=True, now=3.3) == []
    assert m.degraded  # b is alive but draining


# -- pacing and deadlines


def test_heartbeat_pacing() -> None:
    m = cluster(now=100.0)
    assert m.heartbeat_due(100.0)
    m.sent_heartbeat(100.0)
    assert not m.heartbeat_due(100.4)
    assert m.heartbeat_due(100.5)
    assert m.next_deadline() == 100.5


def test_next_deadline() -> None:
    m = cluster()
    assert m.next_deadline() == 0.0  # the first heartbeat is due at once
    m.sent_heartbeat(0.0)
    assert m.next_deadline() == 0.5
    m = Membership("a", ["b", "c"], 1, 0.0, heartbeat_s=10.0, dead_after_s=DEAD_AFTER)
    m.sent_heartbeat(0.0)
    assert m.next_deadline() == DEAD_AFTER / 4  # ticks often enough to see stalls
    m.receive(hb("b"), 0.1)
    m.receive(hb("c"), 0.0)
    m.tick(0.5)
    assert m.next_deadline() == 0.5 + DEAD_AFTER / 4
    m.tick(0.6)
    m.tick(1.35)
    m.tick(2.1)
    m.tick(2.85)
    assert m.next_deadline() == 3.0  # c's suspicion time
    assert m.tick(3.0) == [Suspect("c")]
    assert m.next_deadline() == 3.1  # b's; suspects wait for the probe
    assert m.tick(3.1) == [Suspect("b")]
    assert m.next_deadline() == 3.1 + DEAD_AFTER / 4


# -- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a-b"},
        {"name": ""},
        {"name": "x" * 17},
        {"name": "é"},
        {"incarnation": 0},
        {"incarnation": 2**63},
        {"incarnation": True},
        {"sessions": -1},
        {"sockets": 2**63},
        {"sessions": 1.0},
        {"draining": 1},
        {"dead": (("b", 1), ("a", 1))},  # unsorted
        {"dead": (("b", 1), ("b", 2))},  # one per node
        {"dead": (("b", 0),)},
        {"dead": (("b-", 1),)},
        {"dead": (("b", 1, 2),)},
        {"dead": [("b", 1)]},
        {"dead": tuple((f"n{i}", 1) for i in range(MAX_PEERS + 1))},
    ],
)
def test_heartbeat_validation(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "name": "a",
        "incarnation": 1,
        "sessions": 0,
        "sockets": 0,
        "draining": False,
        "dead": (),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError):
        Heartbeat(**fields)  # type: ignore[arg-type]


def test_membership_validation() -> None:
    with pytest.raises(ValueError):
        Membership("a-1", [], 1, 0.0)
    with pytest.raises(ValueError):
        Membership("a", ["b c"], 1, 0.0)
    with pytest.raises(ValueError):
        Membership("a", ["b"], 0, 0.0)
    with pytest.raises(ValueError):
        Membership("a", ["b"], 1, 0.0, dead_after_s=0.0)
    with pytest.raises(ValueError):
        Membership("a", [f"n{i}" for i in range(MAX_PEERS + 1)], 1, 0.0)
    Membership("a", [f"n{i}" for i in range(MAX_PEERS)], 1, 0.0)


# -- witnesses (asymmetric partitions)


def test_heartbeat_lists_the_peers_heard_within_the_witness_time() -> None:
    m = cluster()
    assert m.witness_s == 2.5 * HB
    m.receive(hb("b"), 0.0)
    m.receive(hb("c"), 1.0)
    assert m.heartbeat(1.0).hears == ("b", "c")
    assert m.heartbeat(1.0 + m.witness_s).hears == ("c",)  # b silent for too long
    assert m.heartbeat().hears == ()  # no time, no claims


def test_a_peer_another_still_hears_is_not_declared_dead_on_a_timed_out_probe() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    # b went silent for us only: c keeps hearing it and says so.
    events = []
    t = 0.0
    while Suspect("b") not in events:
        t += 0.25
        events = m.receive(hb("c", hears=("a", "b")), t) + m.tick(t)
    assert m.probe_result("b", answered=False, now=t) == [Unreachable("b", "c")]
    assert m.state("b") == "alive" and m.dead_list() == {}
    # Suspected and probed again soon; reported unreachable only once.
    events = []
    while Suspect("b") not in events:
        t += 0.25
        events = m.receive(hb("c", hears=("a", "b")), t) + m.tick(t)
    assert t <= 3.0 + 2 * m.witness_s
    assert m.probe_result("b", answered=False, now=t) == []
    assert m.state("b") == "alive"
    # Once c stops hearing b too, the next failed probe declares it dead.
    while Suspect("b") not in events:
        t += 0.25
        events = m.receive(hb("c", hears=("a",)), t) + m.tick(t)
    events = []
    while Suspect("b") not in events:
        t += 0.25
        events = m.receive(hb("c", hears=("a",)), t) + m.tick(t)
    assert m.probe_result("b", answered=False, now=t) == [Dead("b", 22)]


def test_a_refused_probe_needs_no_witness() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    m.receive(hb("c", hears=("a", "b")), 0.0)
    assert m.suspect("b") == [Suspect("b")]
    assert m.probe_result("b", answered=False, now=0.1, refused=True) == [Dead("b", 22)]


def test_a_stale_witness_does_not_count() -> None:
    m = cluster()
    m.receive(hb("b"), 0.0)
    m.receive(hb("c", hears=("a", "b")), 0.0)
    t = 0.0
    events: list[Event] = []
    while Suspect("b") not in events:
        t += 0.25
        events = m.tick(t)  # c's heartbeat saying it hears b is now old
    assert m.probe_result("b", answered=False, now=t) == [Dead("b", 22)]


# -- properties


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tick", "hb", "hb_new", "hb_leave", "probe_ok", "probe_fail"]),
            st.sampled_from(["b", "c"]),
            st.floats(min_value=0.0, max_value=2.0),
        ),
        max_size=60,
    )
)
def test_invariants_under_arbitrary_schedules(ops: list[tuple[str, str, float]]) -> None:
    m = Membership("a", ["b", "c"], 1, 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    t = 0.0
    incarnations = {"b": 1, "c": 1}
    for op, name, dt in ops:
        t += dt
        before = m.state(name)
        if op == "tick":
            events = m.tick(t)
            assert all(isinstance(e, Suspect) for e in events)
        elif op in ("hb", "hb_new"):
            if op == "hb_new":
                incarnations[name] += 1
            events = m.receive(hb(name, incarnation=incarnations[name]), t)
            if events and isinstance(events[-1], Alive):
                assert m.state(name) == "alive"
        elif op == "hb_leave":
            inc = incarnations[name]
            events = m.receive(hb(name, incarnation=inc, dead=((name, inc),)), t)
            assert m.state(name) in ("left", "dead")
            assert events in ([], [Left(name, inc)], [Dead(name, inc - 1), Left(name, inc)])
        else:
            events = m.probe_result(name, op == "probe_ok", t)
            if before != "suspect":
                assert events == []
            if events:
                # A peer never heard has no incarnation: it dies as 0.
                assert events == [Dead(name, m.incarnation_of(name) or 0)]
        heartbeat = m.heartbeat(t)  # always valid
        assert len(heartbeat.dead) <= 2
        assert m.degraded == (m.choose_backup() is None)
        assert set(m.alive_peers()) == {
            n for n in "bc" if m.state(n) == "alive"
            or (m.state(n) == "suspect" and m.incarnation_of(n) is not None)
        }
        assert all(inc >= 1 for _, inc in heartbeat.dead)
        assert m.next_deadline() <= t + max(DEAD_AFTER, HB)


# -- purity (STYLE.md §1)

FORBIDDEN = {"trio", "socket", "time", "logging", "os", "asyncio", "selectors", "threading"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("__import__")
    return names


@pytest.mark.parametrize("module", ["membership", "peerauth"])
def test_module_is_pure(module: str) -> None:
    path = Path(phpsess.__file__).parent / f"{module}.py"
    imports = _imports(path)
    assert "attrs" in imports or "hmac" in imports, imports  # the scan works
    bad = imports & (FORBIDDEN | {"__import__", "importlib", "subprocess"})
    assert not bad, f"phpsess.{module} imports {sorted(bad)}"


def test_direct_evidence_suspects_a_peer_at_once() -> None:
    m = Membership("a", ["b"], 1, 0.0, dead_after_s=3.0)
    m.receive(Heartbeat("b", 7, 0, 0, False, ()), 0.0)
    assert m.suspect("b") == [Suspect("b")]
    assert m.suspect("b") == []  # once
    assert [type(e) for e in m.probe_result("b", False, 0.5)] == [Dead]
    assert m.suspect("b") == []  # dead stays dead


def test_reincarnate_after_being_declared_dead_makes_peers_take_us_back() -> None:
    a = Membership("a", ["b"], 11, 0.0, dead_after_s=3.0)
    b = Membership("b", ["a"], 22, 0.0, dead_after_s=3.0)
    b.receive(a.heartbeat(), 0.0)
    for now in (1.0, 2.0, 3.0):
        b.tick(now)
    assert [type(e) for e in b.probe_result("a", False, 3.1)] == [Dead]
    assert b.receive(a.heartbeat(), 3.2) == []  # the dead incarnation is ignored
    assert a.receive(b.heartbeat(), 3.2) == [SelfDeclaredDead(by="b"), Alive("b", 22, False)]
    a.reincarnate(12)
    assert b.receive(a.heartbeat(), 3.3) == [Alive("a", 12, True)]
    assert b.state("a") == "alive"


def test_set_peers_adds_and_removes() -> None:
    m = Membership("a", ["b", "c"], 1, 0.0)
    m.receive(Heartbeat("b", 2, 0, 0, False, ()), 0.0)
    assert m.set_peers(["a", "b", "d"]) == (["d"], ["c"])
    assert m.state("b") == "alive"  # kept as it was
    assert m.state("d") == "unknown"
    assert m.state("c") == "unknown" and "c" not in m.alive_peers()
    assert m.receive(Heartbeat("c", 3, 0, 0, False, ()), 0.1) == []  # no longer a peer
    assert m.receive(Heartbeat("d", 4, 0, 0, False, ()), 0.1) == [Alive("d", 4, False)]


# -- leaving after a completed drain (CLUSTER.md §3, §8)


def test_a_leave_announcement_makes_a_peer_left_not_dead() -> None:
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    m.receive(hb("c"), 0.0)
    m.receive(hb("b", draining=True), 0.5)
    assert m.state("b") == "alive"  # draining is still alive
    leaving = hb("b", draining=True, dead=(("b", 22),))
    assert leaving.leaving and not hb("b").leaving
    assert m.receive(leaving, 1.0) == [Left("b", 22)]
    assert m.state("b") == "left"
    assert m.gone("b") and not m.is_alive("b")
    assert m.alive_peers() == ["c"]
    assert m.choose_backup() == "c"
    # Repeats of the announcement, and late datagrams of that incarnation,
    # change nothing.
    assert m.receive(leaving, 1.1) == []
    assert m.receive(hb("b", draining=True), 1.2) == []
    # Not in our dead list: it was not declared dead.
    assert m.heartbeat().dead == ()
    # Silence never makes it suspect, nor dead: no probe, no takeover.
    assert run(m, 30.0, heard=("c",)) == []
    assert m.state("b") == "left"
    assert m.probe_result("b", answered=False, now=30.0, refused=True) == []
    assert m.suspect("b") == []
    assert m.connected("b", 22, 30.0) == []
    assert m.state("b") == "left"
    # A new incarnation rejoins, as its heartbeat would make it.
    assert m.connected("b", 23, 30.1) == [Alive("b", 23, True)]
    assert m.state("b") == "alive"
    assert m.next_deadline() <= 30.0 + DEAD_AFTER


def test_a_peer_that_stops_without_announcing_is_still_dead() -> None:
    """Killed during its drain: the draining flag alone is no announcement."""
    m = cluster(peers="bc")
    m.receive(hb("b", draining=True), 0.0)
    m.receive(hb("c"), 0.0)
    events = kill(m, "b", 3.0)
    assert events[-1] == Dead("b", 22)
    assert m.state("b") == "dead" and m.gone("b")
    assert m.heartbeat().dead == (("b", 22),)


def test_a_left_peer_that_starts_again_rejoins() -> None:
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    m.receive(hb("b", dead=(("b", 22),)), 0.5)
    assert m.state("b") == "left"
    assert m.receive(hb("b", incarnation=23, sessions=2), 5.0) == [Alive("b", 23, True)]
    assert m.state("b") == "alive" and m.incarnation_of("b") == 23
    assert m.load("b") == (2, 0, False)
    assert m.choose_backup() == "b"
    # The left incarnation stays finished.
    assert m.receive(hb("b", dead=(("b", 22),)), 5.1) == []
    assert m.state("b") == "alive"


def test_a_leave_announcement_from_a_peer_never_heard_or_declared_dead() -> None:
    m = cluster(peers="bc")
    assert m.receive(hb("b", dead=(("b", 22),)), 0.0) == [Left("b", 22)]
    assert m.state("b") == "left"
    # A dead incarnation's announcement is ignored: it stays dead.
    m.receive(hb("c"), 0.0)
    kill(m, "c", 3.0)
    assert m.receive(hb("c", dead=(("c", 33),)), 3.5) == []
    assert m.state("c") == "dead"


def test_a_leave_from_a_new_incarnation_declares_the_old_one_dead() -> None:
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    assert m.receive(hb("b", incarnation=23, dead=(("b", 23),)), 0.5) == [
        Dead("b", 22), Left("b", 23)
    ]
    assert m.state("b") == "left"
    assert m.heartbeat().dead == (("b", 22),)


def test_leave_announces_our_own_incarnation_in_our_heartbeats() -> None:
    b = Membership("b", ["a", "b", "c"], INC["b"], 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    b.receive(hb("c"), 0.0)
    kill(b, "c", 3.0)
    assert not b.heartbeat().leaving
    b.leave()
    beat = b.heartbeat(3.0)
    assert beat.leaving and beat.draining
    assert beat.dead == (("b", 22), ("c", 33))  # sorted, others kept
    a = cluster(peers="bc")
    a.receive(hb("b"), 0.0)
    assert a.receive(beat, 3.1) == [Left("b", 22)]
    # A new incarnation (declared dead, say) has announced nothing.
    b.reincarnate(99)
    assert not b.heartbeat().leaving


def test_a_leave_announcement_fits_a_full_dead_list() -> None:
    names = [f"p{i}" for i in range(MAX_PEERS)]
    me = Membership("me", ["me", *names], 5, 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    t = 0.0
    for i, name in enumerate(names):
        me.receive(Heartbeat(name, 100 + i, 0, 0, False, ()), t)
    t = DEAD_AFTER
    assert len(run(me, t)) == MAX_PEERS  # each suspected
    for name in names:
        me.probe_result(name, answered=False, now=t, refused=True)
    assert len(me.heartbeat().dead) == MAX_PEERS
    me.leave()
    beat = me.heartbeat()  # valid: within MAX_DEAD_ENTRIES
    assert beat.leaving and len(beat.dead) == MAX_PEERS


def test_an_old_peer_takes_a_leave_announcement_for_a_suspicion_only() -> None:
    """What a peer of the previous version does with it: the sender's own
    entry in the dead list makes it suspect the sender (then probe it), as
    any dead-list entry of a node it takes for alive does.  Emulated here by
    the third-party rule: ``c`` relays the announcement's dead entry."""
    m = cluster(peers="bc")
    m.receive(hb("b"), 0.0)
    m.receive(hb("c"), 0.0)
    assert m.receive(hb("c", dead=(("b", 22),)), 0.5) == [Suspect("b")]
    assert m.state("b") == "suspect"


def test_a_leave_announcement_keeps_the_datagram_format() -> None:
    """The unchanged decoder (the previous version's) accepts it whole."""
    from phpsess.peerauth import decode_heartbeat, encode_heartbeat

    b = Membership("b", ["a", "b"], INC["b"], 0.0, heartbeat_s=HB, dead_after_s=DEAD_AFTER)
    b.leave()
    key = b"0123456789abcdef0123456789abcdef"
    decoded = decode_heartbeat(encode_heartbeat(b.heartbeat(), key, 1.7e9), key, 1.7e9)
    assert decoded == b.heartbeat() and decoded.leaving
    assert cluster(peers="b").receive(decoded, 0.0) == [Left("b", 22)]
