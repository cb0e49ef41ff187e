"""A real daemon on a nearly full disk (a small tmpfs): a compaction the
disk has no room for is not started, so the snapshot cannot take the space
the journal needs for the writes PHP is sent replies for.  On a full one,
a single daemon refuses changes, serves reads and keeps what it
acknowledged until space comes back; a cluster's node stops, its backup
taking over; a start says to free space."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phpsess import journal as j
from phpsess import protocol as p
from phpsess.__main__ import main
from phpsess.client import Client
from phpsess.persist import journal_name
from tests.conftest import ROOT, Daemon, free_tcp_port, scrape_metrics

TMPFS_BYTES = 8 << 20


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of its own, unmounted afterwards.  Needs root, as the
    cluster tests' nftables and the durability tests' setpriv do: never
    skipped."""
    mount_point = workdir / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, timeout=30,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run the tests as root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], timeout=30).returncode != 0:
            # Still busy (a daemon that would not stop): detach it anyway.
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True, timeout=30)


def _free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def _wait_for_failure(daemon: Daemon, timeout_s: float = 15) -> str:
    """The daemon's log once a compaction, snapshot or journal failed."""
    deadline = time.monotonic() + timeout_s
    events = ("event=compaction_failed", "event=snapshot_failed", "event=journal_write_failed")
    while not any(event in daemon.log() for event in events):
        assert time.monotonic() < deadline, f"no compaction was due: {daemon.log()}"
        time.sleep(0.02)
    return daemon.log()


def test_a_compaction_the_disk_has_no_room_for_is_not_started_and_writes_go_on(
    small_disk: Path, start_daemon: Any
) -> None:
    data = small_disk / "data"
    port = free_tcp_port()
    daemon: Daemon = start_daemon(
        "--data-dir", str(data), "--compact-min-bytes", "100000",
        "--metrics-listen", f"127.0.0.1:{port}",
    )
    value = os.urandom(10_000)
    with Client(daemon.address) as c:
        # 3 MB of sessions; the journal holds a little less than the store's
        # estimate of a snapshot (64 bytes a record): no compaction yet.
        for i in range(300):
            assert c.request(p.Write(f"s{i}", 600, value)) == p.OK
        # Something else fills the disk, leaving 1 MiB: less than a snapshot.
        # (Once the journal has every write: with --fsync interval the
        # replies do not wait for it.)
        journal = data / journal_name(1)
        written = j.header_size(j.JOURNAL) + sum(
            len(j.encode(j.Op.PUT, f"s{i}", 0.0, 600, value, salt=0)) for i in range(300)
        )
        deadline = time.monotonic() + 15
        while journal.stat().st_size < written:
            assert time.monotonic() < deadline, journal.stat().st_size
            time.sleep(0.01)
        free = _free_bytes(small_disk)
        with open(small_disk / "filler", "wb") as filler:
            filler.write(b"\0" * (free - (1 << 20)))
        # Rewrites shrink the live data and grow the journal past it: a
        # compaction is due.  40 KB in all: the journal has room for them.
        for i in range(40):
            assert c.request(p.Write(f"s{i}", 600, value[:1000])) == p.OK
        log = _wait_for_failure(daemon)
        assert "event=compaction_failed" in log, log
        # Writes are still journaled and acknowledged.
        for i in range(40, 80):
            assert c.request(p.Write(f"s{i}", 600, value[:1000])) == p.OK
        assert c.request(p.Read("s0", lock=False)) == p.Data(value[:1000])
        assert c.request(p.Read("s299", lock=False)) == p.Data(value)
        samples = scrape_metrics(port)
    [line] = [x for x in log.splitlines() if "event=compaction_failed" in x]
    assert f"error=not enough free space in {data} for a snapshot retry_in_s=30 " in line
    found = re.search(r"needed_bytes=(\d+) free_bytes=(\d+) detail=the snapshot \(about "
                      r"[\d.]+ MiB\) and its margin need [\d.]+ MiB free", line)
    assert found, line
    needed, free_then = int(found.group(1)), int(found.group(2))
    assert needed > (4 << 20) + 2_600_000  # about 2.7 MB of sessions then
    assert (1 << 20) - 100_000 < free_then <= 1 << 20
    # The snapshot was never begun: it did not fill the disk, nothing failed.
    log = daemon.log()
    assert "event=snapshot_failed" not in log and "event=journal_write_failed" not in log
    assert sorted(f.name for f in data.iterdir()) == [journal_name(1), "lock"]
    assert samples[("phpsess_compaction_failures_total", ())] == 1
    assert samples[("phpsess_compactions_total", ())] == 0
    assert daemon.proc is not None and daemon.proc.poll() is None
    # Stopped and started again on the full disk: every write is there.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    daemon.start()
    with Client(daemon.address) as c:
        for i in range(300):
            expected = value[:1000] if i < 80 else value
            assert c.request(p.Read(f"s{i}", lock=False)) == p.Data(expected), i


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (a file of its own, to delete)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return filler


def _wait_for_log(daemon: Daemon, event: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while event not in daemon.log():
        assert time.monotonic() < deadline, f"no {event}: {daemon.log()}"
        time.sleep(0.02)


@pytest.mark.parametrize("policy", ["interval", "always", "never"])
def test_a_full_disk_refuses_changes_serves_reads_and_loses_no_acknowledged_write(
    policy: str, small_disk: Path, start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon used to exit 0.1 s after the first failed append, losing
    # every write it had acknowledged (interval) and not yet journaled.
    data = small_disk / "data"
    port = free_tcp_port()
    daemon: Daemon = start_daemon(
        "--data-dir", str(data), "--fsync", policy, "--metrics-listen", f"127.0.0.1:{port}",
    )
    acked: dict[str, bytes] = {}
    with Client(daemon.address) as c:
        for i in range(20):
            acked[f"s{i}"] = b"before-%d" % i
            assert c.request(p.Write(f"s{i}", 600, acked[f"s{i}"])) == p.OK
    filler = _fill(small_disk)
    # Writes until the journal refuses one: those acknowledged are kept.
    in_doubt: dict[str, bytes] = {}
    refused = None
    c = Client(daemon.address)
    try:
        for i in range(10_000):
            sid, value = f"w{i}", b"while-full-%d" % i + b"." * 500
            reply = c.request(p.Write(sid, 600, value))
            if reply == p.OK:
                acked[sid] = value
                continue
            assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE, reply
            if "may or may not be stored" in reply.message:
                # Made in memory when its fsync'd append failed (always):
                # the connection is closed after it.
                in_doubt[sid] = value
                c.close()
                c = Client(daemon.address)
                continue
            refused = reply
            break
    finally:
        c.close()
    assert refused is not None
    assert "No space left on device" in refused.message and "not stored" in refused.message
    # Every change waits for the journal with always: the one whose append
    # failed.  With interval, one only if the disk lagged behind; never, none.
    assert (len(in_doubt) == 1) if policy == "always" else (len(in_doubt) <= 1), in_doubt
    _wait_for_log(daemon, "event=journal_write_failed")
    # Past the first retries (JOURNAL_RETRY_S): failing too, they leave the
    # daemon serving (it used to stop 0.1 s after the failure).
    time.sleep(1.5)
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    with Client(daemon.address) as c:
        # Every change is refused (nothing stored), whatever the verb...
        for request in (p.Write("s0", 600, b"refused"), p.Write("new", 600, b"refused"),
                        p.Touch("s1", 60), p.Destroy("s2"), p.Create(26, 5)):
            reply = c.request(request)
            assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE, (
                request, reply)
            assert "No space left on device" in reply.message, reply
        # ... and reads go on, of every write acknowledged.
        for sid, value in {**acked, **in_doubt}.items():
            assert c.request(p.Read(sid, lock=False)) == p.Data(value), sid
        assert c.request(p.Read("new", lock=False)) == p.MISS
        stats = c.request(p.Stats())
    assert isinstance(stats, p.Data)
    info = json.loads(stats.data)
    assert info["journal_failed"] == 1 and "No space left" in info["journal_error"], info
    assert main(["status", "--connect", daemon.address]) == 0
    [shown] = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("journal ")]
    assert "FAILING, changes refused: [Errno 28] No space left on device" in shown, shown
    assert scrape_metrics(port)[("phpsess_journal_failed", ())] == 1
    # Space comes back: the writes kept in memory are journaled, changes taken.
    filler.unlink()
    _wait_for_log(daemon, "event=journal_recovered")
    assert scrape_metrics(port)[("phpsess_journal_failed", ())] == 0
    with Client(daemon.address) as c:
        assert c.request(p.Write("after", 600, b"recovered")) == p.OK
        acked["after"] = b"recovered"
        info = json.loads(c.request(p.Stats()).data)  # type: ignore[union-attr]
        assert info["journal_failed"] == 0 and "journal_error" not in info
    # A restart finds every acknowledged write, and none of the refused ones.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    daemon.start()
    with Client(daemon.address) as c:
        for sid, value in {**acked, **in_doubt}.items():
            assert c.request(p.Read(sid, lock=False)) == p.Data(value), sid
        assert c.request(p.Read("new", lock=False)) == p.MISS
        assert c.request(p.Read("s1", lock=False)) == p.Data(acked["s1"])
    assert "event=journal_unwritten" not in daemon.log()


def test_a_start_on_a_full_disk_says_to_free_space(small_disk: Path) -> None:
    # The advice was to move out "a file that is not phpsess's".
    _fill(small_disk)
    data = small_disk / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--data-dir", str(data),
         "--listen", f"unix:{small_disk.parent}/s.sock"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "No space left on device" in proc.stderr
    assert f"free space on the file system of {data}" in proc.stderr
    assert "move it out" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.xdist_group("cluster")  # times failure detection, as test_cluster's
def test_a_cluster_node_whose_disk_fills_stops_and_its_backup_serves_every_write(
    small_disk: Path, workdir: Path
) -> None:
    # In a cluster the backups hold every write a node acknowledged: the node
    # stops (as before), and they take over, instead of refusing changes.
    from tests.integration.test_cluster import Cluster

    (workdir / "a").mkdir()
    (small_disk / "data").mkdir()
    (workdir / "a" / "data").symlink_to(small_disk / "data")  # a's journal: the small disk
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        a = cluster.nodes["a"]
        acked: dict[str, bytes] = {}
        with Client(a.address) as c:
            created = c.request(p.Create(26, 5))
            assert isinstance(created, p.Ok), created
            sid = created.tokens[0]  # mastered by a, backed up by b
            assert c.request(p.Write(sid, 600, b"v0")) == p.OK
            acked[sid] = b"v0"
        _fill(small_disk)
        in_doubt = None
        with Client(a.address) as c:
            for i in range(1, 10_000):
                value = b"v%d" % i + b"." * 500
                reply = c.request(p.Write(sid, 600, value))
                if reply != p.OK:
                    assert isinstance(reply, p.Error) and reply.code is p.Code.UNAVAILABLE
                    if "may or may not be stored" in reply.message:
                        in_doubt = value  # made, and backed up, before its append failed
                    break
                acked[sid] = value
        assert isinstance(reply, p.Error) and "the daemon is stopping" in reply.message, reply
        assert a.wait(30) == 1
        assert "event=journal_write_failed" in a.log()
        # b took over a's sessions: the last write a acknowledged is there
        # (or the one after it, whose reply said it might be).
        deadline = time.monotonic() + 15
        with Client(cluster.nodes["b"].address) as c:
            while (
                isinstance(reply := c.request(p.Read(sid, lock=False)), p.Error)
                and reply.code is p.Code.UNAVAILABLE  # until b declares a dead
            ):
                assert time.monotonic() < deadline, reply
                time.sleep(0.1)
        assert reply in (p.Data(acked[sid]), p.Data(in_doubt or b"")), reply
    finally:
        cluster.stop()
