"""Per-session replication state (CLUSTER.md §5-§7): routing, the master's
changes, the backup's accept/duplicate/stale rules, takeover, drain, restore."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phpsess.replica import (
    _HINTS_MAX,
    BACKUP,
    MASTER,
    NOBODY,
    Applied,
    Meta,
    Repl,
    Replicas,
    Verdict,
)

NODES = ("a", "b", "c", "d")
SID = "r4nd,om-x-a-b"  # names master a, backup b


def replicas(me: str, metas: dict[str, Meta] | None = None) -> Replicas:
    r = Replicas(me, NODES)
    for sid, m in (metas or {}).items():
        r.meta[sid] = m
    return r


def alive_set(*names: str) -> Callable[[str], bool]:
    up = set(names)
    return lambda n: n in up


def chooser(answer: str | None) -> Callable[[], str | None]:
    return lambda: answer


def no_choice() -> str | None:
    raise AssertionError("choose_backup must not be called")


def meta_of(r: Replicas, sid: str = SID) -> tuple[str, str, str | None, int, int] | None:
    m = r.meta.get(sid)
    if m is None:
        return None
    return m.role, m.master, m.backup, m.epoch, m.version


# -- route (CLUSTER.md §5)


@pytest.mark.parametrize(
    ("me", "meta", "alive", "hint", "expected"),
    [
        # We master it: serve here, whoever is alive.
        ("c", Meta(MASTER, "c", "d", 3, 7), (), None, "c"),
        ("c", Meta(MASTER, "c", None, 3, 7), ("a", "b"), "a", "c"),
        # We back it up: the recorded master while it lives.
        ("c", Meta(BACKUP, "d", "c", 2, 1), ("d",), None, "d"),
        ("c", Meta(BACKUP, "d", "c", 2, 1), ("d", "a"), "a", "d"),
        # ...else a live hint, else the named master, named backup, ourselves.
        ("c", Meta(BACKUP, "d", "c", 2, 1), ("a", "b"), "b", "b"),
        ("c", Meta(BACKUP, "d", "c", 2, 1), ("a", "b"), None, "a"),
        ("c", Meta(BACKUP, "d", "c", 2, 1), ("b",), None, "b"),
        ("c", Meta(BACKUP, "d", "c", 2, 1), (), None, "c"),
        ("b", Meta(BACKUP, "a", "b", 1, 1), (), None, "b"),  # named backup is us
        # Nothing held: hint if alive, else named master, else named backup.
        ("c", None, ("a", "b", "d"), "d", "d"),
        ("c", None, ("a", "b"), "d", "a"),  # a dead hint is ignored
        ("c", None, ("a", "b"), None, "a"),
        ("c", None, ("b",), None, "b"),
        ("c", None, (), None, "c"),  # degraded: serve here
        ("a", None, ("a", "b"), None, "a"),  # the named master itself
        ("b", None, ("b",), None, "b"),
    ],
)
def test_route(
    me: str, meta: Meta | None, alive: tuple[str, ...], hint: str | None, expected: str
) -> None:
    r = replicas(me, {SID: meta} if meta is not None else None)
    if hint is not None:
        r.hint(SID, hint)
    assert r.route(SID, alive_set(me, *alive)) == expected


def test_route_of_an_id_not_made_here_uses_rendezvous() -> None:
    from phpsess.placement import named_nodes

    r = replicas("c")
    master, backup = named_nodes("client-chosen", NODES)
    assert r.route("client-chosen", alive_set(*NODES)) == master
    assert r.route("client-chosen", alive_set(backup)) == backup


def test_hints_are_bounded_and_forgotten() -> None:
    r = replicas("c")
    r.hint("s", "a")
    assert r.route("s", alive_set("a", "b", "c")) == "a"
    r.forget_hint("s")
    r.forget_hint("s")  # twice is fine
    assert r.route("s", alive_set("b", "c")) != "a"
    for i in range(_HINTS_MAX + 5):
        r.hint(f"s{i}", "d")
    assert len(r._hints) == _HINTS_MAX
    assert "s0" not in r._hints and f"s{_HINTS_MAX + 4}" in r._hints


# -- local_change: the master's side (CLUSTER.md §6)


@pytest.mark.parametrize(
    ("me", "sid", "choice", "expected_meta", "expected_repl"),
    [
        # The named backup when we are the named master.
        ("a", SID, no_choice, (MASTER, "a", "b", 1, 1), Repl("b", SID, "a", 1, 1, False)),
        # We are the named backup (serving a new session here): choose one.
        ("b", SID, chooser("c"), (MASTER, "b", "c", 1, 1), Repl("c", SID, "b", 1, 1, False)),
        # Neither (degraded creation by X): the named backup still holds it.
        ("c", SID, no_choice, (MASTER, "c", "b", 1, 1), Repl("b", SID, "c", 1, 1, False)),
        # A single-node ID: choose.
        (
            "a", "r-a-a", chooser("d"),
            (MASTER, "a", "d", 1, 1), Repl("d", "r-a-a", "a", 1, 1, False),
        ),
        # Nobody to choose: degraded, nothing to send.
        ("b", SID, chooser(None), (MASTER, "b", None, 1, 1), None),
    ],
)
def test_local_change_creates_master_meta(
    me: str,
    sid: str,
    choice: Callable[[], str | None],
    expected_meta: tuple[str, str, str | None, int, int],
    expected_repl: Repl | None,
) -> None:
    r = replicas(me)
    assert r.local_change(sid, False, choice) == expected_repl
    assert meta_of(r, sid) == expected_meta


def test_local_change_bumps_the_version_and_keeps_the_backup() -> None:
    r = replicas("a")
    r.mark_unverified([SID])
    r.hint(SID, "c")
    for version in range(1, 6):
        repl = r.local_change(SID, False, no_choice)
        assert repl == Repl("b", SID, "a", 1, version, False)
    assert meta_of(r) == (MASTER, "a", "b", 1, 5)
    assert SID not in r.unverified
    assert SID not in r._hints


def test_local_change_of_an_existing_master_keeps_its_epoch() -> None:
    r = replicas("c", {SID: Meta(MASTER, "c", "d", 4, 9)})
    assert r.local_change(SID, False, no_choice) == Repl("d", SID, "c", 4, 10, False)


def test_local_change_of_a_backup_copy_starts_a_new_epoch() -> None:
    r = replicas("b", {SID: Meta(BACKUP, "a", "b", 3, 9)})
    repl = r.local_change(SID, False, chooser("c"))
    assert repl is not None
    # The new mastership must order after everything the old master sent.
    assert (repl.epoch, repl.version) > (3, 9)
    assert repl.epoch == 4
    assert meta_of(r) == (MASTER, "b", "c", 4, repl.version)


def test_local_change_delete_removes_meta_and_sends_a_delete() -> None:
    r = replicas("a", {SID: Meta(MASTER, "a", "b", 2, 5)})
    assert r.local_change(SID, True, no_choice) == Repl("b", SID, "a", 2, 6, True)
    assert SID not in r.meta
    assert r.where(SID) is None


def test_local_change_delete_when_degraded_returns_none() -> None:
    r = replicas("a", {SID: Meta(MASTER, "a", None, 2, 5)})
    assert r.local_change(SID, True, no_choice) is None
    assert SID not in r.meta


def test_local_change_of_a_degraded_session_takes_a_backup_once_one_is_there() -> None:
    # A peer that was only suspect when the backup died is no event when it
    # answers again: the next write picks it (its REPL is a whole copy).
    r = replicas("b")
    assert r.local_change(SID, False, chooser(None)) is None
    assert r.local_change(SID, False, chooser(None)) is None
    assert r.degraded_sessions() == [SID]
    assert r.local_change(SID, False, chooser("c")) == Repl("c", SID, "b", 1, 3, False)
    assert r.degraded_sessions() == []


def test_backup_failed_gives_a_degraded_session_a_backup() -> None:
    r = replicas("b")
    assert r.local_change(SID, False, chooser(None)) is None
    assert r.backup_failed(SID, chooser("c")) == Repl("c", SID, "b", 1, 1, False)
    assert r.degraded_sessions() == []


# -- backup_failed


@pytest.mark.parametrize(
    ("meta", "choice", "expected"),
    [
        (Meta(MASTER, "a", "b", 2, 3), "c", Repl("c", SID, "a", 2, 3, False)),
        (Meta(MASTER, "a", "b", 2, 3), None, None),
        (Meta(BACKUP, "c", "a", 2, 3), "d", None),  # not ours to re-home
        (None, "d", None),
    ],
)
def test_backup_failed(meta: Meta | None, choice: str | None, expected: Repl | None) -> None:
    r = replicas("a", {SID: meta} if meta else None)
    assert r.backup_failed(SID, chooser(choice)) == expected


# -- apply: the backup's side (CLUSTER.md §6)

ACCEPT = Applied(Verdict.ACCEPT)
DUPLICATE = Applied(Verdict.DUPLICATE)


@pytest.mark.parametrize(
    ("held", "repl", "verdict", "after"),
    [
        # Nothing held: accept, become backup.
        (None, ("a", 1, 1, False), ACCEPT, (BACKUP, "a", "b", 1, 1)),
        (None, ("a", 1, 1, True), ACCEPT, None),
        # Backup copy at (2, 5) from a.
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 6, False), ACCEPT, (BACKUP, "a", "b", 2, 6)),
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 9, False), ACCEPT, (BACKUP, "a", "b", 2, 9)),
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 5, False), DUPLICATE, (BACKUP, "a", "b", 2, 5)),
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 4, False), DUPLICATE, (BACKUP, "a", "b", 2, 5)),
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 4, True), DUPLICATE, (BACKUP, "a", "b", 2, 5)),
        # A delete at the version we hold: the master releasing our copy (§8).
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 5, True), ACCEPT, None),
        (Meta(BACKUP, "a", "b", 2, 5), ("a", 2, 6, True), ACCEPT, None),
        # Older epoch: refused, naming the current master.
        (Meta(BACKUP, "c", "b", 3, 1), ("a", 2, 99, False), Applied(Verdict.STALE, "c", 3),
         (BACKUP, "c", "b", 3, 1)),
        (Meta(BACKUP, "c", "b", 3, 1), ("a", 2, 99, True), Applied(Verdict.STALE, "c", 3),
         (BACKUP, "c", "b", 3, 1)),
        # A newer epoch (a takeover elsewhere): accepted whatever the version.
        (Meta(BACKUP, "a", "b", 2, 5), ("c", 3, 1, False), ACCEPT, (BACKUP, "c", "b", 3, 1)),
        # We master it at epoch 3: another node at epoch <= 3 is an old master.
        (Meta(MASTER, "b", "c", 3, 1), ("a", 3, 50, False), Applied(Verdict.STALE, "b", 3),
         (MASTER, "b", "c", 3, 1)),
        (Meta(MASTER, "b", "c", 3, 1), ("a", 2, 50, False), Applied(Verdict.STALE, "b", 3),
         (MASTER, "b", "c", 3, 1)),
        (Meta(MASTER, "b", "c", 3, 1), ("a", 3, 50, True), Applied(Verdict.STALE, "b", 3),
         (MASTER, "b", "c", 3, 1)),
        # ...but a higher epoch wins: we become its backup.
        (Meta(MASTER, "b", "c", 3, 1), ("a", 4, 1, False), ACCEPT, (BACKUP, "a", "b", 4, 1)),
        (Meta(MASTER, "b", None, 3, 1), ("d", 5, 2, False), ACCEPT, (BACKUP, "d", "b", 5, 2)),
    ],
)
def test_apply(
    held: Meta | None,
    repl: tuple[str, int, int, bool],
    verdict: Applied,
    after: tuple[str, str, str | None, int, int] | None,
) -> None:
    r = replicas("b", {SID: held} if held is not None else None)
    master, epoch, version, deleted = repl
    assert r.apply(SID, master, epoch, version, deleted) == verdict
    assert meta_of(r) == after


def test_apply_accepted_clears_unverified_and_hint() -> None:
    r = replicas("b", {SID: Meta(BACKUP, "a", "b", 1, 1)})
    r.mark_unverified([SID])
    r.hint(SID, "c")
    assert r.apply(SID, "a", 1, 2, False) == ACCEPT
    assert SID not in r.unverified
    assert SID not in r._hints


def test_apply_duplicate_changes_nothing() -> None:
    r = replicas("b", {SID: Meta(BACKUP, "a", "b", 1, 3)})
    r.mark_unverified([SID])
    assert r.apply(SID, "a", 1, 2, False) == DUPLICATE
    assert SID in r.unverified


def test_a_second_master_at_the_same_epoch_is_stale() -> None:
    """Two nodes that each created the session at epoch 1 (cut off from
    each other and its named nodes) chose the same backup: the second one's
    copy used to be answered OK (a duplicate at a version no higher), so it
    acknowledged writes no backup kept.  One master per epoch (§6)."""
    first, second, backup = replicas("c"), replicas("d"), replicas("b")
    for node in (first, second):
        repl = node.local_change(SID, False, chooser("b"))
        assert repl is not None and (repl.to, repl.epoch, repl.version) == ("b", 1, 1)
    assert backup.apply(SID, "c", 1, 1, False) == Applied(Verdict.ACCEPT)
    for version in (1, 2):  # also with a higher version: not c's copy to replace
        assert backup.apply(SID, "d", 1, version, False) == Applied(Verdict.STALE, "c", 1)
    assert backup.apply(SID, "d", 1, 3, True) == Applied(Verdict.STALE, "c", 1)
    assert meta_of(backup) == (BACKUP, "c", "b", 1, 1)
    assert backup.apply(SID, "d", 2, 1, False) == Applied(Verdict.ACCEPT)  # a takeover


def test_a_stale_refusal_names_a_master_the_old_one_can_hint() -> None:
    """The old master gets STALE <master> <epoch> and follows it (§6)."""
    old, backup = replicas("a", {SID: Meta(MASTER, "a", "b", 1, 4)}), replicas("b")
    backup.meta[SID] = Meta(BACKUP, "c", "b", 2, 4)  # c took over meanwhile
    repl = old.local_change(SID, False, no_choice)
    assert repl is not None
    got = backup.apply(SID, repl.master, repl.epoch, repl.version, repl.deleted)
    assert got == Applied(Verdict.STALE, "c", 2)
    old.stale(SID, got.master)
    assert old.route(SID, alive_set("a", "b", "c")) == "c"


# -- node_dead: takeover (CLUSTER.md §7)


def test_node_dead_takes_over_the_dead_masters_sessions() -> None:
    r = replicas(
        "b",
        {
            "s1": Meta(BACKUP, "a", "b", 2, 7),  # a's: we take over
            "s2": Meta(MASTER, "b", "a", 1, 3),  # ours, backed up on a: re-home
            "s3": Meta(MASTER, "b", "c", 5, 1),  # unrelated
            "s4": Meta(BACKUP, "c", "b", 1, 1),  # unrelated
            "s5": Meta(MASTER, "b", None, 1, 1),  # degraded, unrelated
        },
    )
    r.hint("h1", "a")
    r.hint("h2", "c")
    copies = r.node_dead("a", chooser("d"))
    assert sorted(copies, key=lambda c: c.sid) == [
        Repl("d", "s1", "b", 3, 7, False),
        Repl("d", "s2", "b", 1, 3, False),
    ]
    assert meta_of(r, "s1") == (MASTER, "b", "d", 3, 7)
    assert meta_of(r, "s2") == (MASTER, "b", "d", 1, 3)
    assert meta_of(r, "s3") == (MASTER, "b", "c", 5, 1)
    assert meta_of(r, "s4") == (BACKUP, "c", "b", 1, 1)
    assert meta_of(r, "s5") == (MASTER, "b", None, 1, 1)
    assert "h1" not in r._hints and r._hints["h2"] == "c"
    assert r.master_count() == 4


def test_node_dead_with_nobody_to_choose_leaves_us_degraded() -> None:
    r = replicas("b", {"s1": Meta(BACKUP, "a", "b", 2, 7), "s2": Meta(MASTER, "b", "a", 1, 3)})
    assert r.node_dead("a", chooser(None)) == []
    assert meta_of(r, "s1") == (MASTER, "b", None, 3, 7)
    assert meta_of(r, "s2") == (MASTER, "b", None, 1, 3)
    assert sorted(r.degraded_sessions()) == ["s1", "s2"]


def test_node_dead_of_an_unrelated_node_changes_nothing() -> None:
    r = replicas("b", {"s1": Meta(BACKUP, "a", "b", 2, 7)})
    assert r.node_dead("c", no_choice) == []
    assert meta_of(r, "s1") == (BACKUP, "a", "b", 2, 7)


def test_after_takeover_the_old_master_is_refused() -> None:
    """A resumed old master (SIGSTOP) cannot write through its backup (§9)."""
    old = replicas("a", {SID: Meta(MASTER, "a", "b", 1, 4)})
    new = replicas("b", {SID: Meta(BACKUP, "a", "b", 1, 4)})
    new.node_dead("a", chooser("c"))
    repl = old.local_change(SID, False, no_choice)
    assert repl is not None and repl.to == "b"
    assert new.apply(SID, "a", repl.epoch, repl.version, False) == Applied(
        Verdict.STALE, "b", 2
    )
    assert meta_of(new) == (MASTER, "b", "c", 2, 4)


# -- stale, handoff, drop_all, restore, verified


@pytest.mark.parametrize(("master", "hinted"), [("c", "c"), ("", None), ("a", None)])
def test_stale(master: str, hinted: str | None) -> None:
    r = replicas("a", {SID: Meta(MASTER, "a", "b", 1, 4)})
    r.mark_unverified([SID])
    r.stale(SID, master)
    assert SID not in r.meta and SID not in r.unverified
    assert r._hints.get(SID) == hinted


def test_stale_of_an_unknown_session_is_harmless() -> None:
    r = replicas("a")
    r.stale("nothing", "b")
    assert r.meta == {}


@pytest.mark.parametrize("held", [None, Meta(BACKUP, "a", "b", 2, 3)])
def test_handoff(held: Meta | None) -> None:
    r = replicas("b", {SID: held} if held is not None else None)
    r.mark_unverified([SID])
    r.hint(SID, "a")
    r.handoff(SID, 3, 8)
    assert meta_of(r) == (MASTER, "b", None, 3, 8)
    assert SID not in r.unverified and SID not in r._hints
    # The old master, should it come back at epoch 2, is refused.
    assert r.apply(SID, "a", 2, 9, False).verdict is Verdict.STALE


def test_drop_all() -> None:
    r = replicas("b", {"s1": Meta(MASTER, "b", "a", 1, 1), "s2": Meta(BACKUP, "a", "b", 1, 1)})
    r.mark_unverified(["s1"])
    r.hint("s3", "c")
    assert sorted(r.drop_all()) == ["s1", "s2"]
    assert r.meta == {} and r.unverified == set() and r._hints == {}
    assert r.drop_all() == []


@pytest.mark.parametrize(
    ("me", "sid", "expected"),
    [
        ("a", SID, (MASTER, "a", "b", 0, 0)),
        ("b", SID, (BACKUP, "a", "b", 0, 0)),
        ("a", "r-a-a", (MASTER, "a", None, 0, 0)),
    ],
)
def test_adopt_restored(
    me: str, sid: str, expected: tuple[str, str, str | None, int, int]
) -> None:
    r = replicas(me)
    r.adopt_restored(sid)
    assert meta_of(r, sid) == expected
    assert r.unverified == {sid}


def test_adopt_restored_rendezvous_id() -> None:
    from phpsess.placement import named_nodes

    master, backup = named_nodes("client-chosen", NODES)
    r = replicas(master)
    r.adopt_restored("client-chosen")
    assert meta_of(r, "client-chosen") == (MASTER, master, backup, 0, 0)
    assert "client-chosen" in r.unverified


def test_an_adopted_copy_loses_to_any_live_replication() -> None:
    r = replicas("b")
    r.adopt_restored(SID)
    assert r.apply(SID, "a", 1, 1, False) == ACCEPT
    assert SID not in r.unverified


@pytest.mark.parametrize(
    ("held", "seen", "expected"),
    [
        ((2, 5), (1, 9), (2, 9)),
        ((2, 5), (3, 1), (3, 5)),
        ((2, 5), (2, 5), (2, 5)),
        ((0, 0), (4, 4), (4, 4)),
    ],
)
def test_verified(held: tuple[int, int], seen: tuple[int, int], expected: tuple[int, int]) -> None:
    r = replicas("a", {SID: Meta(MASTER, "a", "b", *held)})
    r.mark_unverified([SID, "other"])
    r.verified(SID, *seen)
    assert r.where(SID) == (MASTER, *expected)
    assert r.unverified == {"other"}


def test_verified_without_meta_just_clears_the_mark() -> None:
    r = replicas("a")
    r.mark_unverified(["gone"])
    r.verified("gone", 3, 3)
    assert r.unverified == set() and r.meta == {}


def test_where_and_master_count() -> None:
    r = replicas("b", {"s1": Meta(MASTER, "b", "a", 1, 2), "s2": Meta(BACKUP, "a", "b", 3, 4)})
    assert r.where("s1") == (MASTER, 1, 2)
    assert r.where("s2") == (BACKUP, 3, 4)
    assert r.where("s3") is None
    assert r.master_count() == 1


# -- reordering and duplication (CLUSTER.md §6, §9)


def deliver(backup: Replicas, repls: Iterable[Repl]) -> list[tuple[int, int] | None]:
    """Apply each to the backup; the backup's (epoch, version) after each."""
    seen: list[tuple[int, int] | None] = []
    for repl in repls:
        backup.apply(repl.sid, repl.master, repl.epoch, repl.version, repl.deleted)
        held = backup.where(repl.sid)
        seen.append(None if held is None else held[1:])
    return seen


@given(changes=st.integers(min_value=1, max_value=30), data=st.data())
def test_reordered_duplicated_replication_never_goes_back(
    changes: int, data: st.DataObject
) -> None:
    master, backup = replicas("a"), replicas("b")
    sent: list[Repl] = []
    for _ in range(changes):
        repl = master.local_change(SID, False, no_choice)
        assert repl is not None
        sent.append(repl)
    # Each update delivered at least once, some several times, in any order.
    extra = data.draw(st.lists(st.sampled_from(sent), max_size=30))
    order = data.draw(st.permutations(sent + extra))
    seen = deliver(backup, order)
    versions = [v for v in seen if v is not None]
    assert versions == sorted(versions), "the backup applied an older version after a newer one"
    latest = master.where(SID)
    assert latest is not None
    assert backup.where(SID) == (BACKUP, *latest[1:])


@given(data=st.data())
def test_reordered_replication_across_a_takeover(data: st.DataObject) -> None:
    """Updates from the old master (epoch 1) and the new (epoch 2) mixed:
    the backup ends at the new master's latest and never goes back."""
    a, b, c = replicas("a"), replicas("b"), replicas("c")
    old = [a.local_change(SID, False, no_choice) for _ in range(data.draw(st.integers(1, 10)))]
    for repl in old:
        assert repl is not None
        b.apply(SID, repl.master, repl.epoch, repl.version, False)
    (takeover_copy,) = b.node_dead("a", chooser("c"))
    assert (takeover_copy.to, takeover_copy.epoch) == ("c", 2)
    new = [b.local_change(SID, False, no_choice) for _ in range(data.draw(st.integers(0, 10)))]
    mixed = [r for r in old if r is not None] + [r for r in new if r is not None]
    order = data.draw(st.permutations([takeover_copy, *mixed]))
    seen = deliver(c, order)
    versions = [v for v in seen if v is not None]
    assert versions == sorted(versions)
    latest = b.where(SID)
    assert latest is not None
    assert c.where(SID) == (BACKUP, *latest[1:])


# -- deletes under reordering: bugs (see the review report)


def test_a_late_update_does_not_resurrect_a_deleted_copy() -> None:
    """DESTROY replicated as REPL-DEL (1, 3); a retried or delayed REPL (1, 2)
    arriving afterwards (another pooled link) must not bring the session
    back on the backup, which would serve it after a takeover."""
    master, backup = replicas("a"), replicas("b")
    first = master.local_change(SID, False, no_choice)
    second = master.local_change(SID, False, no_choice)
    delete = master.local_change(SID, True, no_choice)
    assert first is not None and second is not None
    assert delete is not None and delete.deleted
    deliver(backup, [first, delete, second])
    assert backup.where(SID) is None


def test_a_session_recreated_after_delete_is_not_taken_for_a_duplicate() -> None:
    """DESTROY then a new WRITE of the same ID (two client connections): the
    master restarts at (1, 1).  If the new REPL overtakes the REPL-DEL on
    another pooled link, the backup (still at (1, 5)) calls it a DUPLICATE
    and acknowledges without storing it; the REPL-DEL then deletes the copy:
    an acknowledged write exists only on the master."""
    master, backup = replicas("a"), replicas("b")
    puts = [master.local_change(SID, False, no_choice) for _ in range(5)]
    deliver(backup, [r for r in puts if r is not None])
    delete = master.local_change(SID, True, no_choice)
    recreate = master.local_change(SID, False, no_choice)
    assert delete is not None and recreate is not None
    assert backup.apply(SID, "a", recreate.epoch, recreate.version, False).verdict is (
        Verdict.ACCEPT
    ), "an acknowledged write was not stored on the backup"


# -- how a copy is held, for `phpsess ls`


def test_holding_says_the_role_and_the_other_holder() -> None:
    r = replicas("c", {
        "m-x-c-d": Meta(MASTER, "c", "d", 1, 1),
        "alone-x-c-c": Meta(MASTER, "c", None, 1, 1),
        "b-x-a-c": Meta(BACKUP, "a", "c", 2, 5),
    })
    assert r.holding("m-x-c-d") == (MASTER, "d")
    assert r.holding("alone-x-c-c") == (MASTER, None)
    assert r.holding("b-x-a-c") == (BACKUP, "a")
    assert r.holding("none-x-a-b") is None
    # A takeover changes what the ID names: the record, not the ID, says it.
    r.node_dead("a", chooser("d"))
    assert r.holding("b-x-a-c") == (MASTER, "d")


def test_a_copy_from_an_older_epoch_than_a_deletion_is_stale_not_acknowledged() -> None:
    """a mastered the session (epoch 1); b took it over (epoch 2) and it was
    destroyed there; a restarted with its journaled copy and wrote it.  b
    answered that REPL "OK" as a duplicate older than the deletion, without
    storing it: the write was acknowledged with one copy, and a kill -9 of a
    lost it (nemesis review, repro_tombstone_ack.py)."""
    a, b = replicas("a"), replicas("b")
    for repl in (a.local_change(SID, False, no_choice) for _ in range(3)):
        assert repl is not None
        assert b.apply(SID, "a", repl.epoch, repl.version, False).verdict is Verdict.ACCEPT
    b.node_dead("a", chooser(None))  # b masters it at epoch 2, alone
    assert b.local_change(SID, True, no_choice) is None and b.where(SID) is None
    late = a.local_change(SID, False, no_choice)  # a's restored copy, written
    assert late is not None and (late.epoch, late.version) == (1, 4)
    assert b.apply(SID, "a", 1, 4, False) == Applied(Verdict.STALE, NOBODY, 2)
    assert b.where(SID) is None
    # A late delete from the old master changes nothing, and is acknowledged.
    assert b.apply(SID, "a", 1, 9, True).verdict is Verdict.DUPLICATE
    # A client's write makes the session again: above the destroy's epoch.
    assert a.restart_above(SID, 2) and a.where(SID) == (MASTER, 3, 4)
    assert b.apply(SID, "a", 3, 4, False).verdict is Verdict.ACCEPT
    assert b.where(SID) == (BACKUP, 3, 4)


def test_a_session_destroyed_by_another_master_and_made_again_is_not_a_duplicate() -> None:
    """After a drain a's session S went to b (epoch 2), and was destroyed
    there.  Asked for S again, a (the master its ID names) made it anew at
    (1, 1); b took that copy for a late update older than the destroy and
    answered "OK" without storing it (test_cluster_drain.py's destroyed-ID
    test).  Also at the destroy's own epoch: another master's copy is no
    late update of the one that destroyed it."""
    b = replicas("b")
    b.handoff(SID, 2, 5)
    b.local_change(SID, True, chooser(None))  # destroyed at (2, 6), alone
    assert b.apply(SID, "a", 1, 1, False) == Applied(Verdict.STALE, NOBODY, 2)
    assert b.apply(SID, "c", 2, 9, False) == Applied(Verdict.STALE, NOBODY, 2)
    # Its own master's late update is older than the destroy: a duplicate.
    c = replicas("c")
    puts = [b.local_change("s2", False, chooser("c")) for _ in range(2)]
    delete = b.local_change("s2", True, chooser("c"))
    assert delete is not None
    for repl in (puts[0], delete, puts[1]):
        assert repl is not None
        c.apply("s2", "b", repl.epoch, repl.version, repl.deleted)
    assert c.apply("s2", "b", 1, 1, False).verdict is Verdict.DUPLICATE
    assert c.where("s2") is None


def test_a_master_refused_by_a_destroy_drops_its_copy_and_starts_above_it() -> None:
    """A whole copy sent in the background (not a client's change) refused
    STALE naming nobody: the copy is dropped, not revived; made again later,
    the session starts above the destroy's epoch."""
    a = replicas("a")
    assert a.local_change(SID, False, no_choice) is not None
    a.stale(SID, NOBODY, 2)
    assert a.where(SID) is None and a.hinted(SID) is None
    again = a.local_change(SID, False, no_choice)
    assert again is not None and (again.epoch, again.version) == (3, 1)
    # Refused again for a change sent before it moved up (two changes at
    # once): it masters the session above that epoch already, and sends the
    # copy again as it is (second nemesis review, repro_stale_race.py).
    assert a.restart_above(SID, 2) and a.where(SID) == (MASTER, 3, 1)
    assert a.restart_above(SID, 5) and a.where(SID) == (MASTER, 6, 1)
    assert not replicas("c").restart_above(SID, 2)  # not ours: dropped
