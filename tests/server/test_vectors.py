"""Replay every protocol vector against a real daemon process."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vectors import daemon_args, load_vectors, replay

VECTORS = load_vectors()


def test_there_are_vectors() -> None:
    assert len(VECTORS) >= 10


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any], start_daemon: Any) -> None:
    daemon = start_daemon(*daemon_args(vector))
    replay(vector, daemon.sock_path)


def test_replay_detects_a_wrong_expectation(daemon: Any) -> None:
    bad = {"name": "bad", "steps": [{"conn": "a", "send": "HELLO 1\\n", "expect": "OK 2\\n"}]}
    with pytest.raises(AssertionError):
        replay(bad, daemon.sock_path)


def test_replay_detects_an_unexpected_reply(daemon: Any) -> None:
    bad = {"name": "bad", "steps": [{"conn": "a", "send": "HELLO 1\\n", "expect": None}]}
    with pytest.raises(AssertionError):
        replay(bad, daemon.sock_path)
