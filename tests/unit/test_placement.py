"""Where a session lives (CLUSTER.md §2): IDs naming master and backup,
rendezvous hashing for IDs that do not, node names, suffix()."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phpsess.placement import MAX_SUFFIX, check_node_name, named_nodes, suffix

NODES = ("a", "b", "c", "web01", "web02")
SID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,-"


@pytest.mark.parametrize(
    ("sid", "expected"),
    [
        ("abc-a-b", ("a", "b")),
        ("abc-b-a", ("b", "a")),
        ("abc-web01-web02", ("web01", "web02")),
        ("abc-a-a", ("a", "a")),  # a node alone names itself twice
        # The random part may itself hold '-' and ',': the last two fields win.
        ("x-y-z-a-b", ("a", "b")),
        ("a-b-c-b-c", ("b", "c")),
        ("ab,cd-ef,gh-c-web01", ("c", "web01")),
        ("--a-b", ("a", "b")),
        (",-a-b", ("a", "b")),
        ("-,-c-a", ("c", "a")),
        ("r" * 200 + "-web02-a", ("web02", "a")),
    ],
)
def test_ids_made_by_a_node_parse_back(sid: str, expected: tuple[str, str]) -> None:
    assert named_nodes(sid, NODES) == expected


def rendezvous(sid: str, nodes: tuple[str, ...]) -> tuple[str, str]:
    """The documented rule (CLUSTER.md §2), as the implementation hashes it."""
    ranked = sorted(
        nodes, key=lambda n: hashlib.sha256(f"{n}\0{sid}".encode()).digest(), reverse=True
    )
    return ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]


@pytest.mark.parametrize(
    "sid",
    [
        "plainsessionid",  # no '-' at all
        "abc-a",  # only one name field
        "abc-a-zz",  # backup not a configured node
        "abc-zz-a",  # master not a configured node
        "abc-A-b",  # names are case-sensitive
        "-a-b",  # empty random part
        "a-b",
        "abc-a-b-",  # trailing '-': last field empty
        "abc-a,b-c",
        "",
    ],
)
def test_ids_naming_unknown_nodes_fall_back_to_rendezvous(sid: str) -> None:
    master, backup = named_nodes(sid, NODES)
    assert (master, backup) == rendezvous(sid, NODES)
    assert master != backup
    assert master in NODES and backup in NODES


@given(st.text(alphabet=SID_CHARS, min_size=0, max_size=64))
def test_rendezvous_is_deterministic_and_order_independent(sid: str) -> None:
    nodes = ("n1", "n2", "n3", "n4")
    parts = sid.rsplit("-", 2)
    if len(parts) == 3 and parts[0] and set(parts[1:]) <= set(nodes):
        return  # a well-formed ID names its own nodes
    answers = {named_nodes(sid, order) for order in itertools.permutations(nodes)}
    answers.add(named_nodes(sid, list(reversed(nodes))))
    answers.add(named_nodes(sid, iter(nodes)))
    assert len(answers) == 1
    (master, backup), = answers
    assert master != backup
    assert (master, backup) == rendezvous(sid, nodes)


def test_rendezvous_spreads_sessions_over_nodes() -> None:
    counts = dict.fromkeys(NODES, 0)
    for i in range(2000):
        master, _ = named_nodes(f"session{i}", NODES)
        counts[master] += 1
    assert all(200 < c < 600 for c in counts.values()), counts


def test_rendezvous_removing_a_node_moves_only_its_sessions() -> None:
    fewer = tuple(n for n in NODES if n != "c")
    for i in range(500):
        sid = f"s{i}"
        master, _ = named_nodes(sid, NODES)
        if master != "c":
            assert named_nodes(sid, fewer)[0] == master


@pytest.mark.parametrize("sid", ["plain", "abc-solo-solo", "abc-x-y", "abc-solo-x", ""])
def test_single_node_cluster_names_itself_twice(sid: str) -> None:
    assert named_nodes(sid, ["solo"]) == ("solo", "solo")


@pytest.mark.parametrize(
    ("master", "backup", "expected"),
    [
        ("a", "b", "-a-b"),
        ("web01", "web02", "-web01-web02"),
        ("a", None, "-a-a"),
        ("a", "", "-a-a"),
    ],
)
def test_suffix(master: str, backup: str | None, expected: str) -> None:
    assert suffix(master, backup) == expected


@pytest.mark.parametrize(("master", "backup"), [("a", "b"), ("c", None), ("web01", "web02")])
def test_suffix_parses_back(master: str, backup: str | None) -> None:
    sid = "Rand,om-part" + suffix(master, backup)
    assert named_nodes(sid, NODES) == (master, backup or master)


def test_suffix_fits_the_room_left() -> None:
    longest = "x" * 16
    assert len(suffix(longest, longest)) == MAX_SUFFIX


@pytest.mark.parametrize("name", ["a", "Z", "0", "web01", "A" * 16])
def test_valid_node_names(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize("name", ["", "a-b", "a,b", "a b", "A" * 17, "é", "a\n", "a_b"])
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(ValueError):
        check_node_name(name)
