"""Replay every protocol vector against a real daemon process."""

from __future__ import annotations

import json
from pathlib import Path
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


def test_the_example_vector_in_the_spec_passes(start_daemon: Any) -> None:
    # PROTOCOL.md §11 shows the format with a vector: a client author copies
    # it, so it must pass like the files in protocol/vectors/.
    spec = (Path(__file__).parents[2] / "protocol" / "PROTOCOL.md").read_text()
    section = spec[spec.index("## 11. Test vectors"):]
    example = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    assert "daemon" in example and len(example["steps"]) >= 5
    daemon = start_daemon(*daemon_args(example))
    replay(example, daemon.sock_path)
