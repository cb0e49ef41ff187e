"""Durability with real processes: kill -9 under a PHP write load, SIGTERM,
torn and corrupted files, expiry across restarts, the data-dir lock."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phpsess import journal as j
from phpsess import protocol as p
from phpsess.client import Client
from phpsess.persist import journal_name
from tests.conftest import PREPEND, ROOT, Daemon, php_binary, read_counter

WRITER = Path(__file__).parent / "php" / "writer.php"


def _writer(daemon: Daemon, sid: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [php_binary(), "-d", "display_errors=stderr", "-d", "session.use_cookies=0",
         "-d", "session.cache_limiter=", "-d", f"auto_prepend_file={PREPEND}",
         "-d", f"phpsess.address={daemon.php_address}", str(WRITER), sid, str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _stored_counter(daemon: Daemon, sid: str) -> int:
    return read_counter(daemon.address, sid)


# With interval, what a crash may lose: the writes acknowledged in the last
# two --fsync-interval-ms (README, Durability).
INTERVAL_MS = 50


@pytest.mark.parametrize(
    ("policy", "compacting"),
    [("always", False), ("interval", False), ("always", True)],
    ids=["always", "interval", "always-compacting"],
)
def test_kill_9_during_php_write_load_loses_no_acknowledged_write(
    policy: str, compacting: bool, start_daemon: Any
) -> None:
    extra = ["--fsync-interval-ms", str(INTERVAL_MS)] if policy == "interval" else []
    if compacting:
        # A snapshot every few dozen writes: the kills land in compactions,
        # whose snapshots leave out the sessions rewritten meanwhile.
        extra += ["--compact-min-bytes", "2000"]
    daemon: Daemon = start_daemon("--fsync", policy, *extra)
    window = 2 * INTERVAL_MS / 1000 if policy == "interval" else 0.0
    rng = random.Random(policy)
    sids = [f"durable{policy}{i}x0123456789" for i in range(4)]
    acked = dict.fromkeys(sids, 0)
    lost_in_window = 0
    rounds = 20
    for _ in range(rounds):
        writers = {sid: _writer(daemon, sid, 100000) for sid in sids}
        time.sleep(rng.uniform(0.05, 0.4))
        killed_at = time.time()
        daemon.kill9()
        must_have = dict.fromkeys(sids, 0)
        for sid, proc in writers.items():
            out, _ = proc.communicate(timeout=30)
            for line in out.splitlines():
                if line.startswith("ack "):
                    _, n, at = line.split()
                    acked[sid] = int(n)
                    # PHP prints the time after the write was acknowledged.
                    if float(at) < killed_at - window:
                        must_have[sid] = int(n)
        daemon.start()
        for sid in sids:
            stored = _stored_counter(daemon, sid)
            # Every write acknowledged before the window is there; at most the
            # one write in flight at the kill may be there too, unacknowledged.
            assert must_have[sid] <= stored <= acked[sid] + 1, (sid, must_have[sid], stored)
            if policy == "always":
                assert stored >= acked[sid], (sid, acked[sid], stored)
            lost_in_window += max(0, acked[sid] - stored)
            acked[sid] = stored  # the next round's writers carry on from it
    print(f"acknowledged increments after {rounds} kill -9 rounds: {acked}; "
          f"acknowledged in the last {window * 1000:.0f} ms and lost: {lost_in_window}")
    assert sum(acked.values()) > rounds  # the load really wrote
    assert daemon.log().count("event=restored") == rounds + 1
    if compacting:
        assert daemon.log().count("event=compacted") > rounds


def test_locks_held_at_the_crash_are_free_and_expired_sessions_stay_gone(
    start_daemon: Any,
) -> None:
    # always: the kill comes right after the writes, inside interval's window.
    daemon: Daemon = start_daemon("--fsync", "always")
    with Client(daemon.address) as c:
        assert c.request(p.Write("short", 1, b"bye")) == p.OK
        assert c.request(p.Write("long", 3600, b"stays")) == p.OK
        assert c.request(p.Read("long")) == p.Data(b"stays")  # held at the crash
        daemon.kill9()
    time.sleep(1.2)  # "short" expires while the daemon is down
    daemon.start()
    with Client(daemon.address, wait_ms=0) as c:
        assert c.request(p.Read("long")) == p.Data(b"stays")  # not locked any more
        assert c.request(p.Read("short", lock=False)) == p.MISS
        got = c.request(p.Get("long"))
        assert isinstance(got, p.Data)
        assert 3_590_000 < int(got.tokens[0]) <= 3_600_000  # remaining lifetime kept
    assert "expired_while_down=1" in daemon.log()


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_sigterm_then_restart_loses_nothing(policy: str, start_daemon: Any) -> None:
    daemon: Daemon = start_daemon("--fsync", policy)
    with Client(daemon.address) as c:
        for i in range(300):
            assert c.request(p.Write(f"s{i}", 600, os.urandom(i))) == p.OK
        for i in range(0, 300, 3):
            assert c.request(p.Destroy(f"s{i}")) == p.OK
        assert c.request(p.Touch("s1", 60)) == p.OK
    expected = {f"s{i}": None for i in range(300) if i % 3}
    with Client(daemon.address) as c:
        for sid in expected:
            reply = c.request(p.Read(sid, lock=False))
            assert isinstance(reply, p.Data)
            expected[sid] = reply.data  # type: ignore[assignment]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    daemon.start()
    with Client(daemon.address) as c:
        for i in range(300):
            reply = c.request(p.Read(f"s{i}", lock=False))
            if f"s{i}" in expected:
                assert reply == p.Data(expected[f"s{i}"]), i  # type: ignore[arg-type]
            else:
                assert reply == p.MISS, i
        got = c.request(p.Get("s1"))
        assert isinstance(got, p.Data) and int(got.tokens[0]) <= 60_000


def _journal(daemon: Daemon) -> Path:
    journals = sorted(daemon.data_dir.glob("journal-*.pjnl"))
    return journals[-1]


def _damage_journal(
    daemon: Daemon, prefix: str, count: int, damage: Callable[[bytearray], None]
) -> Path:
    """Write ``count`` sessions ``<prefix><i>`` = ``value-<i>``, stop the
    daemon, and apply ``damage`` to its journal's bytes; the journal."""
    with Client(daemon.address) as c:
        for i in range(count):
            assert c.request(p.Write(f"{prefix}{i}", 600, b"value-%d" % i)) == p.OK
    daemon.stop()
    journal = _journal(daemon)
    raw = bytearray(journal.read_bytes())
    damage(raw)
    journal.write_bytes(bytes(raw))
    return journal


@pytest.mark.parametrize("tail", [b"\x40\x00\x00\x00\x12\x34", b"\x00" * 100, b"half"])
def test_torn_journal_tail_is_truncated_and_logged(tail: bytes, daemon: Daemon) -> None:
    with Client(daemon.address) as c:
        assert c.request(p.Write("kept", 600, b"intact")) == p.OK
    daemon.stop()
    journal = _journal(daemon)
    size = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(tail)  # a crash in the middle of an append
    daemon.start()
    assert "event=journal_torn_tail" in daemon.log()
    assert journal.stat().st_size == size
    with Client(daemon.address) as c:
        assert c.request(p.Read("kept", lock=False)) == p.Data(b"intact")
        assert c.request(p.Write("after", 600, b"ok")) == p.OK
    daemon.stop()
    daemon.start()
    with Client(daemon.address) as c:
        assert c.request(p.Read("after", lock=False)) == p.Data(b"ok")


def _start_fails(daemon: Daemon) -> str:
    with pytest.raises(RuntimeError) as info:
        daemon.start()
    assert daemon.proc is not None and daemon.proc.returncode == 1
    return str(info.value)


def _repair(daemon: Daemon) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "repair", "--data-dir", str(daemon.data_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_corruption_inside_the_journal_stops_the_start_and_repair_keeps_the_rest(
    daemon: Daemon,
) -> None:
    def flip(raw: bytearray) -> None:
        raw[raw.index(b"value-4")] ^= 0xFF

    journal = _damage_journal(daemon, "j", 10, flip)
    message = _start_fails(daemon)
    assert str(journal) in message and "damaged at offset" in message
    assert "phpsess repair" in message
    report = _repair(daemon)
    assert "kept 9 intact records" in report
    assert "may come back as they were before it" in report  # what repair cannot know
    daemon.start()
    with Client(daemon.address) as c:
        for i in range(10):
            reply = c.request(p.Read(f"j{i}", lock=False))
            assert reply == (p.MISS if i == 4 else p.Data(b"value-%d" % i))


def test_an_unreadable_data_dir_entry_stops_the_start_with_a_message_not_a_traceback(
    daemon: Daemon,
) -> None:
    with Client(daemon.address) as c:
        assert c.request(p.Write("kept", 600, b"intact")) == p.OK
    daemon.stop()
    newest = max(int(f.name[8:14]) for f in daemon.data_dir.glob("journal-*.pjnl"))
    stray = daemon.data_dir / f"journal-{newest + 1:06d}.pjnl"
    stray.mkdir()  # a directory with a journal's name: open() fails on it
    message = _start_fails(daemon)
    assert str(stray) in message and "move it out" in message
    assert "Traceback" not in daemon.log()
    # repair cannot use it either, and says so without a traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "repair", "--data-dir", str(daemon.data_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode != 0
    assert "repair of" in proc.stderr and str(stray) in proc.stderr
    assert "Traceback" not in proc.stderr
    stray.rmdir()
    daemon.start()
    with Client(daemon.address) as c:
        assert c.request(p.Read("kept", lock=False)) == p.Data(b"intact")


def test_a_data_dir_where_no_file_can_be_made_stops_the_start_not_the_first_compaction(
    tmp_path: Path,
) -> None:
    # The lock file and the journal are writable, the directory is not: the
    # daemon used to start, then exit at its first compaction (a new journal).
    # Root ignores a directory's mode: the daemon runs without the
    # capabilities that let it (util-linux's setpriv).
    data = tmp_path / "data"
    data.mkdir()
    (data / "lock").write_bytes(b"")
    (data / journal_name(1)).write_bytes(j.header(j.JOURNAL, 1))
    data.chmod(0o555)
    try:
        proc = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--",
             sys.executable, "-m", "phpsess", "serve", "--data-dir", str(data),
             "--listen", f"unix:{tmp_path}/s.sock"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
    finally:
        data.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot create files in data directory {data}" in proc.stderr
    assert "Permission denied" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.sock").exists()
    assert sorted(f.name for f in data.iterdir()) == ["journal-000001.pjnl", "lock"]


def test_a_journal_that_cannot_grow_refuses_changes_and_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    # A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG) is a
    # disk that fills up for good, without a mount.  With --fsync always,
    # every write acknowledged before the failure must be there after a
    # restart; the daemon serves reads until it is stopped.
    data, sock = tmp_path / "data", tmp_path / "s.sock"
    serve = [sys.executable, "-m", "phpsess", "serve", "--data-dir", str(data),
             "--listen", f"unix:{sock}", "--fsync", "always"]
    proc = subprocess.Popen(["prlimit", "--fsize=200000", "--", *serve],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    journal = data / journal_name(1)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        acked: list[str] = []
        in_doubt = None
        with Client(f"unix:{sock}") as c:
            for i in range(100):  # 100 x 10 KiB: past the limit
                reply = c.request(p.Write(f"full{i}", 600, bytes([i]) * 10000))
                if reply != p.OK:
                    in_doubt = reply
                    break
                acked.append(f"full{i}")
        # The write the journal could not take (made in memory, its append
        # failed): an error saying so, not OK, and the connection closes.
        assert isinstance(in_doubt, p.Error) and in_doubt.code is p.Code.UNAVAILABLE, in_doubt
        assert in_doubt.message.startswith(
            f"the journal write failed ([Errno 27] File too large: '{journal}'): this change "
            "may or may not be stored"
        ), in_doubt.message
        assert 5 < len(acked) < 20
        with Client(f"unix:{sock}") as c:
            # Changes are refused before they are made; reads go on.
            refused = c.request(p.Write("late", 600, b"late"))
            assert isinstance(refused, p.Error) and refused.code is p.Code.UNAVAILABLE
            assert refused.message.startswith(
                f"the journal cannot be written ([Errno 27] File too large: '{journal}'); "
                "not stored"
            ), refused.message
            for i, sid in enumerate(acked):
                assert c.request(p.Read(sid, lock=False)) == p.Data(bytes([i]) * 10000)
        assert proc.poll() is None
        # Stopped while it still fails: the last try fails too, and says what
        # is lost (with always: only the change whose reply said so).
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 1, err
    assert "event=journal_write_failed" in err and "event=journal_unwritten" in err
    assert f"the journal could not be written ([Errno 27] File too large: '{journal}')" in err
    assert "Traceback" not in err
    # Restarted with room again: no repair needed, every acknowledged write there.
    restarted = subprocess.Popen(serve, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert restarted.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with Client(f"unix:{sock}") as c:
            for i, sid in enumerate(acked):
                assert c.request(p.Read(sid, lock=False)) == p.Data(bytes([i]) * 10000)
            assert c.request(p.Read("late", lock=False)) == p.MISS
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0


def test_compaction_bounds_disk_and_a_corrupted_snapshot_byte_stops_the_start(
    start_daemon: Any,
) -> None:
    daemon: Daemon = start_daemon("--compact-min-bytes", "200000")
    value = os.urandom(1000)
    with Client(daemon.address) as c:
        for rnd in range(30):  # 30 x 100 sessions x 1 KB: 3 MB of journal
            for i in range(100):
                assert c.request(p.Write(f"c{i}", 600, value + bytes([rnd]))) == p.OK
    # At rest: compactions have stopped (one that a stop interrupts leaves
    # both journals, which the next start reads, until the next compaction).
    deadline = time.monotonic() + 20
    compactions = -1
    while compactions <= 0 or daemon.log().count("event=compacted") != compactions:
        assert time.monotonic() < deadline, daemon.log()
        compactions = daemon.log().count("event=compacted")
        time.sleep(0.3)
    daemon.stop()
    files = list(daemon.data_dir.glob("*.p*"))
    disk = sum(f.stat().st_size for f in files)
    live = 100 * 1001
    assert disk < 2 * live + 200_000 + 50_000, (disk, [f.name for f in files])
    daemon.start()
    with Client(daemon.address) as c:
        for i in range(100):
            assert c.request(p.Read(f"c{i}", lock=False)) == p.Data(value + bytes([29]))
    daemon.stop()
    snapshot = sorted(daemon.data_dir.glob("snapshot-*.psnap"))[-1]
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    snapshot.write_bytes(bytes(raw))
    message = _start_fails(daemon)
    assert str(snapshot) in message and "damaged at offset" in message
    _repair(daemon)
    daemon.start()
    with Client(daemon.address) as c:
        found = sum(
            c.request(p.Read(f"c{i}", lock=False)) == p.Data(value + bytes([29]))
            for i in range(100)
        )
    assert found >= 99  # only the session in the damaged record is lost


def test_a_second_daemon_cannot_use_the_same_data_dir(daemon: Daemon, start_daemon: Any) -> None:
    other: Daemon | None = None
    with pytest.raises(RuntimeError) as info:
        other = start_daemon("--data-dir", str(daemon.data_dir))
    assert other is None
    assert "in use by another phpsess daemon" in str(info.value)
    with Client(daemon.address) as c:
        assert c.request(p.Ping()) == p.OK


NOBODY = 65534


def _serve_as_nobody(data: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    """A daemon running as uid/gid 65534 (standing in for the phpsess user)
    on ``data``; returns once it listens, or once it has exited."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             sys.executable, "-m", "phpsess", "serve", "--listen", f"unix:{sock}",
             "--data-dir", str(data), "--fsync", "always"],
            stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
    deadline = time.monotonic() + 30
    while not sock.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc


def test_repair_run_as_root_leaves_files_the_daemons_user_can_use() -> None:
    # DEPLOYMENT.md §7: the daemon runs as its own user; root runs repair on
    # its data directory.  Repair wrote the journal as root:root 0644 and a
    # damaged-*/ of root's: the daemon's next start failed with "Permission
    # denied ... move it out", and that advice threw every session away.
    base = Path(tempfile.mkdtemp(prefix="phpsess-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base.chmod(0o755)
        data, run, log = base / "data", base / "run", base / "daemon.log"
        sock = run / "s.sock"
        for directory in (data, run):
            directory.mkdir(mode=0o700)
            os.chown(directory, NOBODY, NOBODY)
        procs.append(daemon := _serve_as_nobody(data, sock, log))
        assert daemon.poll() is None, log.read_text()
        with Client(f"unix:{sock}") as c:
            for i in range(10):
                assert c.request(p.Write(f"r{i}", 600, b"value-%d" % i)) == p.OK
        daemon.kill()
        daemon.wait(15)
        journal = data / journal_name(1)
        assert journal.stat().st_uid == NOBODY
        raw = bytearray(journal.read_bytes())
        raw[raw.index(b"value-4")] ^= 0xFF
        journal.write_bytes(bytes(raw))
        sock.unlink(missing_ok=True)

        procs.append(daemon := _serve_as_nobody(data, sock, log))
        assert daemon.wait(15) == 1
        user = pwd.getpwuid(NOBODY).pw_name
        assert f"run `runuser -u {user} -- phpsess repair --data-dir {data}`" in log.read_text()

        # A copy restored without its lock file: the repair command makes one.
        (data / "lock").unlink()
        repaired = subprocess.run(  # as root
            [sys.executable, "-m", "phpsess", "repair", "--data-dir", str(data)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert repaired.returncode == 0, repaired.stderr
        assert "kept 9 intact records" in repaired.stdout
        (kept,) = data.glob("damaged-*")
        for path in [data, journal, kept, *kept.iterdir(), data / "lock"]:
            info = path.lstat()
            assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY), path
        assert journal.stat().st_mode & 0o7777 == 0o600
        assert (data / "lock").stat().st_mode & 0o7777 == 0o600
        assert kept.stat().st_mode & 0o7777 == 0o700  # the data directory's
        assert sorted(f.name for f in data.iterdir()) == [kept.name, journal.name, "lock"]

        procs.append(daemon := _serve_as_nobody(data, sock, log))
        assert daemon.poll() is None, log.read_text()
        with Client(f"unix:{sock}") as c:
            for i in range(10):
                reply = c.request(p.Read(f"r{i}", lock=False))
                assert reply == (p.MISS if i == 4 else p.Data(b"value-%d" % i)), i
            assert c.request(p.Write("after", 600, b"ok")) == p.OK
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert "Permission denied" not in log.read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
