"""The README's first command, ``scripts/demo``: the daemon on its embedded
defaults (here in a directory of the test's, PHPSESS_DEMO_DIR) and PHP's
built-in web server with the demo page."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_tcp_port

DEMO = ROOT / "scripts" / "demo"


def _demo(directory: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(DEMO)], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PORT": str(port), "PHPSESS_DEMO_DIR": str(directory)},
        start_new_session=True,  # its daemon and web server go with its group
    )


@pytest.fixture
def demos() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the demo stops both
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _visits(port: int, cookie: str | None) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        reply = conn.getresponse()
        body = reply.read().decode()
        assert reply.status == 200, body
        set_cookie = reply.getheader("Set-Cookie")
    finally:
        conn.close()
    found = re.search(r"visited this page <strong>(\d+)</strong>", body)
    assert found, body
    return int(found.group(1)), (set_cookie.split(";")[0] if set_cookie else cookie)


def _wait_serving(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the demo's web server did not listen"
            time.sleep(0.1)


def test_the_demo_counts_visits_in_phpsess(
    tmp_path: Path, demos: list[subprocess.Popen[str]]
) -> None:
    port = free_tcp_port()
    demos.append(demo := _demo(tmp_path, port))
    _wait_serving(port, demo)
    cookie = None
    for expected in (1, 2, 3):
        count, cookie = _visits(port, cookie)
        assert count == expected
    assert (tmp_path / "data").is_dir()  # the daemon's, in the demo's directory


def test_a_second_demo_on_the_same_directory_stops_at_once_and_says_why(
    tmp_path: Path, demos: list[subprocess.Popen[str]]
) -> None:
    # It announced "open http://..." on the first demo's daemon, then its
    # own daemon failed (the data directory locked), and the demo stopped.
    port = free_tcp_port()
    demos.append(first := _demo(tmp_path, port))
    _wait_serving(port, first)
    second = _demo(tmp_path, free_tcp_port())
    demos.append(second)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 1
    assert (f"demo: a daemon already listens on {tmp_path}/phpsess.sock; stop it, or give "
            "this demo its own directory (PHPSESS_DEMO_DIR=DIR)") in out
    assert "open http" not in out
    assert _visits(port, None)[0] == 1  # the first one is unharmed
