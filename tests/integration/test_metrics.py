"""The Prometheus endpoint of a real daemon, scraped and parsed."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import MariaDB, free_tcp_port, fresh_table, scrape_metrics


def _start_time(pid: int) -> float:
    """When process ``pid`` started, in seconds since the epoch (proc(5))."""
    with open(f"/proc/{pid}/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as system:
        [boot] = [int(line.split()[1]) for line in system if line.startswith("btime")]
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_metrics_endpoint_is_scraped_and_parsed(
    backend: str, request: pytest.FixtureRequest, start_daemon: Any
) -> None:
    # The same metrics from the memory + journal storage and the SQL one.
    port = free_tcp_port()
    storage: tuple[str, ...] = ()
    if backend == "mariadb":
        db: MariaDB = request.getfixturevalue("mariadb")
        storage = db.daemon_args(fresh_table())
    daemon = start_daemon("--metrics-listen", f"127.0.0.1:{port}", *storage)
    with Client(daemon.address, wait_ms=0) as c, Client(daemon.address, wait_ms=0) as other:
        assert c.request(p.Write("m1", 60, b"x" * 100)) == p.OK
        assert c.request(p.Read("m1")) == p.Data(b"x" * 100)
        reply = other.request(p.Read("m1"))  # locked: times out at once
        assert isinstance(reply, p.Error)
        samples = scrape_metrics(port)
    assert samples[("phpsess_requests_total", (("verb", "WRITE"),))] == 1
    assert samples[("phpsess_requests_total", (("verb", "READ"),))] == 2
    assert samples[("phpsess_sessions", ())] == 1
    assert samples[("phpsess_session_bytes", ())] == 100
    assert samples[("phpsess_lock_timeouts_total", ())] == 1
    assert samples[("phpsess_request_errors_total", ())] >= 1
    assert samples[("phpsess_request_seconds_count", (("verb", "WRITE"),))] == 1
    assert samples[("phpsess_locks_held", ())] == 1
    assert samples[("phpsess_incoming_bytes", ())] == 0  # nothing half received
    # The standard process_* metrics describe the daemon, not the test.
    started = _start_time(daemon.pid)
    assert abs(samples[("process_start_time_seconds", ())] - started) < 1.0
    with open(f"/proc/{daemon.pid}/limits") as limits:
        [soft] = [line.split()[3] for line in limits if line.startswith("Max open files")]
    assert samples[("process_max_fds", ())] == int(soft)
    assert 0 < samples[("process_open_fds", ())] < int(soft)
    assert samples[("process_resident_memory_bytes", ())] > 10 * 2**20
    if backend == "journal":
        assert ("phpsess_fsyncs_total", ()) in samples  # persistence is on
    else:
        assert samples[("phpsess_storage_up", ())] == 1
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert info.value.code == 404
    info.value.close()
