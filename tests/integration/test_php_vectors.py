"""The PHP replay of protocol/vectors (php-ext-shim/tests/replay_vectors.php)
against a real daemon: both languages read the spec's transcripts the same way."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT, php_binary
from tests.vectors import VECTOR_DIR, daemon_args, load_vectors

VECTORS = load_vectors()
REPLAY = ROOT / "php-ext-shim" / "tests" / "replay_vectors.php"


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_php_replays_vector(vector: dict[str, Any], start_daemon: Any) -> None:
    daemon = start_daemon(*daemon_args(vector))
    proc = subprocess.run(
        [php_binary(), str(REPLAY), daemon.php_address, str(VECTOR_DIR / f"{vector['name']}.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"ok {vector['name']}"


def test_php_replay_detects_a_wrong_expectation(tmp_path: Any, daemon: Any) -> None:
    # The replayer must be able to fail: a vector with a wrong reply.
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "bad", "doc": "", "steps": ['
                   '{"conn": "a", "send": "HELLO 1\\\\n", "expect": "OK 2\\\\n"}]}')
    proc = subprocess.run([php_binary(), str(REPLAY), daemon.php_address, str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "FAIL bad" in proc.stdout
