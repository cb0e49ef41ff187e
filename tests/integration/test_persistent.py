"""Persistent connections from a long-lived PHP worker (PHP's built-in web
server: one process, so every request reuses the same phpsess connection):
a reused connection never carries a lock into the next request, whatever the
previous request did (abort, read_and_close, a fatal error)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import PREPEND, free_tcp_port, php_binary, wait_listening

ROUTER = Path(__file__).parent / "php" / "persistent.php"
SID = "persistent0123456789abcdef"


def _get(port: int, op: str) -> tuple[int, str]:
    try:
        url = f"http://127.0.0.1:{port}/{ROUTER.name}?op={op}&sid={SID}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _lock_is_free(daemon: Any) -> bool:
    with Client(daemon.address, wait_ms=0) as c:
        reply = c.request(p.Read(SID))
        c.request(p.Close())
    return not (isinstance(reply, p.Error) and reply.code is p.Code.LOCK_TIMEOUT)


def _php_connections(daemon: Any) -> int:
    with Client(daemon.address) as c:
        reply = c.request(p.Stats())
        assert isinstance(reply, p.Data)
        connections: int = json.loads(reply.data)["connections"]
    return connections - 1  # not counting this one


def _connections_settle_at(daemon: Any, expected: int) -> bool:
    """The daemon notices a closed connection a moment after PHP closes it."""
    deadline = time.monotonic() + 5
    while _php_connections(daemon) != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("query", ["?persistent=1", "", "?persistent=0"])
def test_a_reused_connection_never_carries_a_lock(query: str, daemon: Any) -> None:
    # persistent=1 is the default; with persistent=0 each request has its own.
    kept = 0 if query == "?persistent=0" else 1
    port = free_tcp_port()
    web = subprocess.Popen(
        [php_binary(), "-S", f"127.0.0.1:{port}", "-d", "display_errors=0",
         "-d", f"auto_prepend_file={PREPEND}",
         # Quoted: an unquoted "=" in a -d value is an ini syntax error.
         "-d", f'phpsess.address="{daemon.php_address}{query}"',
         # A document root, not a router script: PHP runs routers without
         # auto_prepend_file.
         "-t", str(ROUTER.parent)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, web, "php -S")
        assert [_get(port, "count") for _ in range(3)] == [(200, "1"), (200, "2"), (200, "3")]
        assert _connections_settle_at(daemon, kept)  # one connection, reused (or none)
        assert _lock_is_free(daemon)

        assert _get(port, "abort") == (200, "aborted")
        assert _lock_is_free(daemon)  # released by close() without a round trip
        assert _get(port, "read_and_close") == (200, "3")
        assert _lock_is_free(daemon)

        status, _ = _get(port, "fatal")
        assert status == 500
        assert _lock_is_free(daemon)
        assert _get(port, "count") == (200, "4")  # abort's 1000 was never written
        assert _connections_settle_at(daemon, kept)
    finally:
        web.terminate()
        web.wait(10)
