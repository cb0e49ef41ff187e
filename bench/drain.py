"""Drain benchmark: how fast a cluster node hands its sessions over.

    .venv/bin/python bench/drain.py [--sessions 20000,100000] [--nodes 2,3]

For each cluster size and session count: start the daemons on loopback
(heartbeats every 250 ms, dead after 1.5 s, as the integration tests do;
data directories in a temporary directory, ``--fsync interval``), create
the sessions on node ``a`` (``CREATE`` then a 1 KiB ``WRITE``, pipelined,
as PHP would), so that ``a`` masters every one of them, then ``SIGTERM``
``a`` and wait for it to exit.  The drain time is read from ``a``'s log:
from ``event=stopping`` to ``event=drained handed_over=N`` (the drain's
first ``heartbeat_ms``, which lets the peers see it draining, included).
Afterwards every session is read back through the remaining node(s) and
compared with what was written, and the sessions stored on them are
counted (each session should have two copies with 3 nodes, one with 2).

``--drain-timeout-s`` (default 300) is raised above the daemon's 30 s so
that a slow drain is measured to its end instead of being cut short.

Prints a Markdown table; progress goes to stderr.  Everything listens on
127.0.0.1 and unix sockets in a temporary directory under /tmp and is
stopped by PID when done.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phpsess import protocol as p
from phpsess.client import Client

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("a", "b", "c")
BATCH = 250  # requests per pipelined batch while filling and checking


def free_port() -> int:
    """A port free for TCP and UDP alike (a node listens on both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Node:
    def __init__(self, workdir: Path, name: str, ports: dict[str, int], secret: Path,
                 drain_timeout_s: float) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        self.sock = str(self.dir / "s.sock")
        self.log_path = self.dir / "daemon.log"
        self.args = [
            "--node", name, "--cluster-listen", f"127.0.0.1:{ports[name]}",
            "--cluster-secret-file", str(secret), "--heartbeat-ms", "250",
            "--dead-after-ms", "1500", "--drain-timeout-s", str(drain_timeout_s),
        ]
        for other, port in ports.items():
            if other != name:
                self.args += ["--peer", f"{other}=127.0.0.1:{port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["timeout", "1800", sys.executable, "-m", "phpsess", "serve",
                 "--listen", f"unix:{self.sock}", "--data-dir", str(self.dir / "data"),
                 *self.args],
                cwd=ROOT, stderr=log, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.sock)
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"{self.name} did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(_daemon_pid(self), signal.SIGKILL)  # the daemon, then timeout(1)
            self.proc.wait(30)


def _daemon_pid(node: Node) -> int:
    """The daemon's PID under timeout(1): its only child."""
    assert node.proc is not None
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()
    return int(children[0]) if children else node.proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_cluster(workdir: Path, names: tuple[str, ...], drain_timeout_s: float) -> list[Node]:
    secret = workdir / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    ports = {n: free_port() for n in names}
    nodes = [Node(workdir, n, ports, secret, drain_timeout_s) for n in names]
    for node in nodes:
        node.start()
    deadline = time.monotonic() + 20
    for node in nodes:
        for other in names:
            while other != node.name and f"event=peer_alive peer={other}" not in node.log():
                if time.monotonic() > deadline:
                    raise SystemExit(f"the cluster did not form: {node.log()}")
                time.sleep(0.05)
    return nodes


def payload(i: int, size: int) -> bytes:
    """A PHP-session-like value of ``size`` bytes, different per session."""
    head = b"n|i:%d;blob|s:" % i
    return (head + b"%08d" % i * (size // 8 + 1))[:size]


def fill(address: str, count: int, size: int) -> list[str]:
    sids: list[str] = []
    with Client(address, timeout_s=60) as c:
        while len(sids) < count:
            n = min(60, count - len(sids))  # max_locks_per_connection is 64
            created = c.pipeline([p.Create(26, 5)] * n)
            batch = []
            for reply in created:
                assert isinstance(reply, p.Ok), reply
                batch.append(reply.tokens[0])
            first = len(sids)
            writes = c.pipeline(
                [p.Write(sid, 3600, payload(first + k, size)) for k, sid in enumerate(batch)]
            )
            assert all(w == p.OK for w in writes), [w for w in writes if w != p.OK][:3]
            sids += batch
    return sids


def check(address: str, sids: list[str], size: int) -> int:
    """Sessions that do not read back with their data (0 is right)."""
    bad = 0
    with Client(address, timeout_s=60) as c:
        for start in range(0, len(sids), BATCH):
            chunk = sids[start:start + BATCH]
            replies = c.pipeline([p.Read(sid, lock=False) for sid in chunk])
            for k, reply in enumerate(replies):
                if reply != p.Data(payload(start + k, size)):
                    bad += 1
    return bad


_STAMP = re.compile(r"^(\S+)Z level=\w+ (.*)$")


def _when(log: str, event: str) -> tuple[float, str]:
    for line in log.splitlines():
        m = _STAMP.match(line)
        if m and m.group(2).startswith(event):
            stamp = datetime.datetime.fromisoformat(m.group(1) + "+00:00")
            return stamp.timestamp(), m.group(2)
    raise SystemExit(f"no {event} in the log:\n{log[-3000:]}")


def drain_round(workdir: Path, names: tuple[str, ...], count: int, size: int,
                drain_timeout_s: float) -> dict[str, float]:
    nodes = start_cluster(workdir, names, drain_timeout_s)
    try:
        t0 = time.monotonic()
        sids = fill(f"unix:{nodes[0].sock}", count, size)
        fill_s = time.monotonic() - t0
        print(f"  {len(names)} nodes, {count} sessions: filled in {fill_s:.1f} s",
              file=sys.stderr)
        time.sleep(0.5)
        a = nodes[0]
        assert a.proc is not None
        pids = [_daemon_pid(node) for node in nodes]
        before = [cpu_seconds(pid) for pid in pids]
        cpu = list(before)
        signalled = time.monotonic()
        os.kill(pids[0], signal.SIGTERM)
        while a.proc.poll() is None:  # a's CPU time until it exits
            if time.monotonic() - signalled > drain_timeout_s + 120:
                raise SystemExit("the drained node did not exit")
            with contextlib.suppress(OSError, IndexError):
                cpu[0] = cpu_seconds(pids[0])
            time.sleep(0.05)
        rc = a.proc.returncode
        exited_s = time.monotonic() - signalled
        cpu[1:] = [cpu_seconds(pid) for pid in pids[1:]]
        cpu_s = sum(cpu) - sum(before)
        log = a.log()
        started, _ = _when(log, "event=stopping")
        ended, line = _when(log, "event=drained")
        handed = int(line.split("handed_over=")[1].split()[0])
        drain_s = ended - started
        bad = 0
        for node in nodes[1:]:
            bad += check(f"unix:{node.sock}", sids, size)
        stored = 0
        for node in nodes[1:]:
            with Client(f"unix:{node.sock}") as c:
                stats = c.request(p.Stats())
                assert isinstance(stats, p.Data)
                stored += int(json.loads(stats.data)["sessions"])
        incomplete = "event=drain_incomplete" in log
        print(f"  drain: {handed} handed over in {drain_s:.2f} s ({handed / drain_s:,.0f}/s), "
              f"exit {rc} after {exited_s:.2f} s, unreadable {bad}, copies {stored}"
              f", daemons' CPU {cpu_s:.1f} s{', INCOMPLETE' if incomplete else ''}",
              file=sys.stderr)
        return {"handed": handed, "drain_s": drain_s, "exited_s": exited_s, "bad": bad,
                "copies": stored, "fill_s": fill_s, "cpu_s": cpu_s, "incomplete": float(incomplete)}
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="20000,100000",
                        help="comma-separated session counts (default: 20000,100000)")
    parser.add_argument("--nodes", default="2,3", help="cluster sizes (default: 2,3)")
    parser.add_argument("--payload", type=int, default=1024, help="bytes per session")
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    rows = []
    for size in (int(n) for n in args.nodes.split(",")):
        for count in (int(n) for n in args.sessions.split(",")):
            d = Path(tempfile.mkdtemp(prefix="phpsess-drain-", dir="/tmp"))
            try:
                result = drain_round(d, NAMES[:size], count, args.payload,
                                     args.drain_timeout_s)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            rows.append((size, count, result))
    print()
    print("| nodes | sessions | drain | sessions/s | SIGTERM to exit | daemons' CPU | "
          "unreadable after | copies left (expected) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, count, r in rows:
        expected = count * min(2, size - 1)
        print(f"| {size} | {count:,} | {r['drain_s']:.2f} s | {r['handed'] / r['drain_s']:,.0f} "
              f"| {r['exited_s']:.2f} s | {r['cpu_s']:.1f} s | {int(r['bad'])} "
              f"| {int(r['copies']):,} ({expected:,}){' INCOMPLETE' if r['incomplete'] else ''} |")


if __name__ == "__main__":
    main()
