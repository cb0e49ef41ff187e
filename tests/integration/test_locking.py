"""Session locking proven with real php processes (issue: locking)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import PREPEND, fresh_table, php_binary

HOLD = Path(__file__).parent / "php" / "hold.php"
SID = "concurrent0123456789abcdef"


@pytest.fixture
def daemon(any_daemon: Any) -> Any:
    """Every test here runs against memory + journal and against SQL storage."""
    return any_daemon


def _php(handler_ini: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [php_binary(), "-d", "display_errors=stderr", "-d", "session.use_cookies=0",
         "-d", "session.cache_limiter=", *handler_ini, str(HOLD), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _phpsess_ini(daemon: Any) -> list[str]:
    return ["-d", f"auto_prepend_file={PREPEND}", "-d", f"phpsess.address={daemon.php_address}"]


def _concurrent_increments(ini: list[str], n: int, hold_ms: int) -> list[tuple[int, str, str]]:
    procs = [_php(ini, SID, str(hold_ms)) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out, err))
    return results


def _stats(daemon: Any) -> dict[str, Any]:
    with Client(daemon.address) as c:
        reply = c.request(p.Stats())
        assert isinstance(reply, p.Data)
        stats: dict[str, Any] = json.loads(reply.data)
        return stats


def test_50_concurrent_requests_holding_20ms_end_at_plus_50(daemon: Any, tmp_path: Path) -> None:
    # Start from a known value so "+50" is measured, not assumed.
    with Client(daemon.address) as c:
        assert c.request(p.Write(SID, 1440, b"n|i:7;")) == p.OK
    results = _concurrent_increments(_phpsess_ini(daemon), 50, 20)
    failed = [r for r in results if r[0] != 0 or r[2]]
    assert failed == []
    seen = sorted(int(out.split("n=")[1]) for _, out, _ in results)
    assert seen == list(range(8, 58))  # every request saw its predecessor's write
    with Client(daemon.address) as c:
        assert c.request(p.Read(SID, lock=False)) == p.Data(b"n|i:57;")
    assert _stats(daemon)["lock_waits_total"] > 0  # they really contended

    # PHP's files handler does the same in the same situation.
    files = tmp_path / "files"
    files.mkdir()
    (files / f"sess_{SID}").write_bytes(b"n|i:7;")
    ini = ["-d", "session.save_handler=files", "-d", f"session.save_path={files}"]
    results = _concurrent_increments(ini, 50, 20)
    assert [r for r in results if r[0] != 0 or r[2]] == []
    assert (files / f"sess_{SID}").read_bytes() == b"n|i:57;"


def test_kill_9_of_the_lock_holder_frees_the_session_at_once(daemon: Any) -> None:
    ini = _phpsess_ini(daemon)
    holder = _php(ini, SID, "0", "hang")
    assert holder.stdout is not None
    assert holder.stdout.readline() == "LOCKED\n"
    waiter = _php(ini, SID, "0")
    deadline = time.monotonic() + 10
    while _stats(daemon)["locks_waiting"] != 1:
        assert time.monotonic() < deadline, "the second request never queued for the lock"
        time.sleep(0.01)
    killed_at = time.time()
    holder.send_signal(signal.SIGKILL)
    out, err = waiter.communicate(timeout=30)
    holder.wait(10)
    holder.stdout.close()
    assert holder.stderr is not None
    holder.stderr.close()
    assert waiter.returncode == 0 and err == "", err
    started = float(out.split("started=")[1].split()[0])
    latency_ms = (started - killed_at) * 1000
    print(f"lock handed on {latency_ms:.1f} ms after kill -9 of its holder")
    # Released by the connection closing, not by the 30 s wait or 300 s lease:
    # the target is 100 ms; a loaded CI machine gets headroom here.
    assert latency_ms < 1000
    assert "n=1" in out


def test_one_connection_holds_at_most_max_locks_per_connection(
    backend: str, start_daemon: Any, request: pytest.FixtureRequest
) -> None:
    # A client that locks session after session (a bug or an attack) gets
    # TOO_MANY_LOCKS past the limit instead of filling the daemon's memory
    # (or the database's named locks); everyone else goes on being served.
    args: tuple[str, ...] = ("--max-locks-per-connection", "3")
    if backend == "mariadb":
        args = (*request.getfixturevalue("mariadb").daemon_args(fresh_table()), *args)
    daemon = start_daemon(*args)
    with Client(daemon.address) as hog, Client(daemon.address) as other:
        hog.send_raw(b"".join(f"READ hog{i:022d} LOCK\n".encode() for i in range(5)))
        replies = [hog.read_reply() for _ in range(5)]
        assert replies[:3] == [p.MISS] * 3, replies
        for reply in replies[3:]:
            assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_MANY_LOCKS, reply
            assert "max_locks_per_connection" in reply.message
        created = hog.request(p.Create())
        assert isinstance(created, p.Error) and created.code is p.Code.TOO_MANY_LOCKS
        assert _stats(daemon)["locks_held"] == 3
        # Still usable: re-entry, a lock-free create, and room after a release.
        assert hog.request(p.Read(f"hog{0:022d}")) == p.MISS
        assert isinstance(hog.request(p.Create(lock=False)), p.Ok)
        assert hog.request(p.Write(f"hog{0:022d}", 60, b"x")) == p.OK
        assert hog.request(p.Read(f"hog{3:022d}")) == p.MISS
        # The refused session was never locked: another client takes it.
        assert other.request(p.Read(f"hog{4:022d}")) == p.MISS
        assert other.request(p.Write(f"hog{4:022d}", 60, b"y")) == p.OK
