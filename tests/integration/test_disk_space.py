"""A real daemon on a nearly full disk (a small tmpfs): a compaction the
disk has no room for is not started, so the snapshot cannot take the space
the journal needs for the writes PHP is sent replies for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phpsess import journal as j
from phpsess import protocol as p
from phpsess.client import Client
from phpsess.persist import journal_name
from tests.conftest import Daemon, free_tcp_port, scrape_metrics

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
        written = len(j.JOURNAL_MAGIC) + sum(
            len(j.encode(j.Op.PUT, f"s{i}", 0.0, 600, value)) for i in range(300)
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
