"""The Prometheus endpoint of a real daemon, scraped and parsed; and what
the daemon prints when it cannot serve it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import ROOT, MariaDB, free_tcp_port, fresh_table, scrape_metrics


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
        with socket.socket(socket.AF_UNIX) as bad:  # a malformed frame: fatal
            bad.connect(daemon.sock_path)
            bad.sendall(b"\x00\n")
            assert bad.recv(4096).startswith(b"ERR BAD_FRAME")
            assert bad.recv(4096) == b""  # closed
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
    assert samples[("phpsess_outgoing_bytes", ())] == 0  # every reply was read
    assert samples[("phpsess_outgoing_closes_total", ())] == 0
    assert samples[("phpsess_fd_refusals_total", ())] == 0
    assert samples[("phpsess_protocol_errors_total", ())] == 1
    for reason in ("handshake", "idle", "send"):
        assert samples[("phpsess_timeout_closes_total", (("reason", reason),))] == 0
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


def _exchange(port: int, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """One raw HTTP exchange: the status line, the headers (lower-case
    names) and everything the daemon sent after them until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status.encode(), headers, body


def test_connections_closed_by_a_timeout_are_counted(start_daemon: Any) -> None:
    # Their log lines are a few a second at most: STATS and the metrics
    # count every one.
    port = free_tcp_port()
    daemon = start_daemon("--memory-only", "--idle-timeout-s", "1",
                          "--metrics-listen", f"127.0.0.1:{port}")
    with Client(daemon.address) as c:
        assert c.request(p.Ping()) == p.OK
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(daemon.sock_path)
            raw.sendall(b"HELLO 1\n")
            assert raw.recv(4096) == b"OK 1\n"
            raw.settimeout(30)
            assert raw.recv(4096) == b""  # closed for being silent
    samples = scrape_metrics(port)
    assert samples[("phpsess_timeout_closes_total", (("reason", "idle"),))] >= 1
    with Client(daemon.address) as c:
        reply = c.request(p.Stats())
    assert isinstance(reply, p.Data)
    stats = json.loads(reply.data)
    assert stats["timeout_closes"]["idle"] >= 1 and stats["protocol_errors_total"] == 0


@pytest.fixture
def metrics_port(start_daemon: Any) -> int:
    """The metrics port of a running daemon (memory only)."""
    port = free_tcp_port()
    start_daemon("--memory-only", "--metrics-listen", f"127.0.0.1:{port}")
    return port


def test_a_query_string_on_metrics_is_ignored(metrics_port: int) -> None:
    # Prometheus sends a scrape config's `params` as a query string.
    url = f"http://127.0.0.1:{metrics_port}/metrics?module=phpsess&target=x"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        families = {f.name for f in text_string_to_metric_families(r.read().decode())}
    assert "phpsess_requests" in families and "process_start_time_seconds" in families


def test_head_of_metrics_gets_the_headers_only(metrics_port: int) -> None:
    port = metrics_port
    status, headers, body = _exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status == b"HTTP/1.0 200 OK" and len(body) == int(headers["content-length"])
    for target in (b"/metrics", b"/metrics?foo=bar"):
        status, headers, body = _exchange(port, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
        assert status == b"HTTP/1.0 200 OK", (target, status)
        assert headers["content-type"] == "text/plain; version=0.0.4"
        assert int(headers["content-length"]) > 1000  # what GET would send
        assert body == b"", target  # but not sent
    # Not found either way; a reply to HEAD has no body.
    status, headers, body = _exchange(port, b"HEAD /nope HTTP/1.0\r\n\r\n")
    assert status == b"HTTP/1.0 404 Not Found" and body == b""
    assert int(headers["content-length"]) == len(b"not found: try GET /metrics\n")


def test_other_requests_are_still_not_found(metrics_port: int) -> None:
    port = metrics_port
    for request in (b"GET /nope HTTP/1.0", b"GET /nope?x=/metrics HTTP/1.0",
                    b"GET /metricsx?a=b HTTP/1.0", b"POST /metrics HTTP/1.0",
                    b"PUT /metrics?a=b HTTP/1.0", b"GET /metrics"):
        status, _, body = _exchange(port, request + b"\r\n\r\n")
        assert status == b"HTTP/1.0 404 Not Found", request
        assert body == b"not found: try GET /metrics\n", request


def _serve_with_metrics_port_taken(workdir: Path, *, to_journal: bool) -> str:
    """The line ``phpsess serve`` prints when its metrics port is taken,
    checking that it says so once; ``to_journal``: with stderr as systemd
    connects it to the journal."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        stderr_path = workdir / f"stderr-{port}"
        stderr_path.touch()
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if to_journal:
            info = os.stat(stderr_path)
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        with open(stderr_path, "wb") as err:
            proc = subprocess.run(
                [sys.executable, "-m", "phpsess", "serve", "--memory-only",
                 "--listen", f"unix:{workdir}/s.sock", "--metrics-listen", f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stderr=err, cwd=ROOT, timeout=30, env=env,
            )
    text = stderr_path.read_text()
    assert proc.returncode == 1, text
    message = f"cannot serve metrics on tcp:127.0.0.1:{port}: Address already in use"
    # Once: it was also logged as event=startup_failed on the same stderr.
    assert text.count(message) == 1, text
    assert "Traceback" not in text, text
    [line] = [line for line in text.splitlines() if message in line]
    return line


def test_a_startup_failure_is_printed_once(workdir: Path) -> None:
    line = _serve_with_metrics_port_taken(workdir, to_journal=False)
    assert line.startswith("phpsess: cannot serve metrics on "), line
    # To the journal: once too, with the error priority (sd-daemon(3)).
    line = _serve_with_metrics_port_taken(workdir, to_journal=True)
    assert line.startswith("<3>phpsess: cannot serve metrics on "), line


def test_metrics_on_port_0_log_the_port_bound(start_daemon: Any) -> None:
    daemon = start_daemon("--memory-only", "--metrics-listen", "127.0.0.1:0")
    deadline = time.monotonic() + 10
    while "event=metrics_listening" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    found = re.search(r"event=metrics_listening address=tcp:127\.0\.0\.1:(\d+)\n", daemon.log())
    assert found, daemon.log()
    port = int(found.group(1))
    assert port != 0
    assert ("phpsess_sessions", ()) in scrape_metrics(port)
