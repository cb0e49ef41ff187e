"""Cluster benchmark: failover time and the cost of replication.

    .venv/bin/python bench/cluster.py [--rounds 5] [--seconds 5]

1. Failover: 3 daemons; a client on node b reads-with-lock and writes a
   session mastered by node a in a tight loop; a is killed (``kill -9``) or
   hung (``SIGSTOP``); the time from the fault to the next successful request
   for that session is the failover time.  Goal: under 3 s.
2. Replication: ``bench/loadgen.c`` (built with gcc), 32 connections of
   PHP's request pattern (HELLO + READ LOCK, then WRITE of 1 KiB) on one
   daemon alone, then on a 2-daemon cluster where every write is also
   acknowledged by the backup.  The master (or lone daemon) is pinned to
   CPU 0; the load generator and the backup share CPU 1, as if the backup
   ran on another server.  Goal: replication costs at most 10 %.  The
   master's own CPU time per cycle is reported too.

Prints Markdown tables.  Everything listens on loopback and unix sockets in a
temporary directory and is stopped when done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import build_loadgen, process_cpu_seconds  # bench/daemon.py

from phpsess import protocol as p
from phpsess.client import Client, ClientError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Node:
    def __init__(self, workdir: Path, name: str, ports: dict[str, int], secret: Path) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(exist_ok=True)
        self.sock = str(self.dir / "s.sock")
        args = ["--node", name, "--cluster-listen", f"127.0.0.1:{ports[name]}",
                "--cluster-secret-file", str(secret)]
        for other, port in ports.items():
            if other != name:
                args += ["--peer", f"{other}=127.0.0.1:{port}"]
        self.args = args if len(ports) > 1 else []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phpsess", "serve", "--listen", f"unix:{self.sock}",
                 "--data-dir", str(self.dir / "data"), *self.args],
                cwd=ROOT, stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.sock)
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"{self.name} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cluster(workdir: Path, names: list[str]) -> list[Node]:
    secret = workdir / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    ports = {n: free_port() for n in names}
    nodes = [Node(workdir, n, ports, secret) for n in names]
    for node in nodes:
        node.start()
    time.sleep(1.5)  # let heartbeats form the cluster
    return nodes


def failover_round(workdir: Path, fault: str) -> float:
    nodes = cluster(workdir, ["a", "b", "c"])
    try:
        with Client(f"unix:{nodes[0].sock}") as c:
            created = c.request(p.Create(26, 5))
            assert isinstance(created, p.Ok)
            sid = created.tokens[0]
            assert c.request(p.Write(sid, 1440, b"n|i:0;")) == p.OK
        client = Client(f"unix:{nodes[1].sock}", timeout_s=30)
        for _ in range(20):
            client.request(p.Read(sid))
            client.request(p.Write(sid, 1440, b"n|i:1;"))
        assert nodes[0].proc is not None
        faulted = time.monotonic()
        if fault == "kill -9":
            nodes[0].proc.kill()
        else:
            nodes[0].proc.send_signal(signal.SIGSTOP)
        while True:
            try:
                read = client.request(p.Read(sid))
                if isinstance(read, p.Data) and client.request(
                    p.Write(sid, 1440, b"n|i:2;")
                ) == p.OK:
                    break
            except ClientError:
                client = Client(f"unix:{nodes[1].sock}", timeout_s=30)
            if time.monotonic() - faulted > 30:
                raise SystemExit("no failover within 30 s")
        elapsed = time.monotonic() - faulted
        client.close()
        if fault != "kill -9":
            nodes[0].proc.send_signal(signal.SIGCONT)
        return elapsed
    finally:
        for node in nodes:
            node.stop()


def replication_rate(workdir: Path, names: list[str], seconds: float,
                     loadgen: Path) -> tuple[float, float]:
    """(cycles per second, the master daemon's CPU microseconds per cycle).

    The master (node a, or the lone daemon) is pinned to CPU 0; the load
    generator and the backup share CPU 1, as if the backup ran on another
    server.  32 connections of PHP's request pattern (HELLO + READ LOCK,
    then WRITE of 1 KiB) on 32,000 sessions whose IDs name a as master and
    b as backup."""
    nodes = cluster(workdir, names)
    try:
        for node, cpu in zip(nodes, ("0", "1"), strict=False):
            assert node.proc is not None
            subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(node.proc.pid)],
                           check=True, capture_output=True)
        base = [str(loadgen), "-c", "32", "-k", "32000", "--sid-suffix", "-a-b", "-m", "rw"]
        address = f"unix:{nodes[0].sock}"
        subprocess.run([*base, "-d", "0", "--prefill", address], check=True,
                       capture_output=True, timeout=120)
        assert nodes[0].proc is not None
        cpu_before = process_cpu_seconds(nodes[0].proc.pid)
        out = subprocess.run(
            ["taskset", "-c", "1", *base, "-H", "1", "--exist", "-d", str(seconds), address],
            check=True, capture_output=True, text=True, timeout=seconds + 120,
        ).stdout
        result = json.loads(out)
        if result["errors"]:
            raise SystemExit(f"loadgen saw {result['errors']} errors")
        cycles = result["cycles"]
        cpu_us = (process_cpu_seconds(nodes[0].proc.pid) - cpu_before) * 1e6 / cycles
        return result["cps"], cpu_us
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"kill -9": [], "SIGSTOP": []}
    rates: dict[str, list[float]] = {"1 daemon": [], "2 daemons, with backups": []}
    cpu: dict[str, list[float]] = {"1 daemon": [], "2 daemons, with backups": []}
    for i in range(args.rounds):
        for fault in results:
            d = Path(tempfile.mkdtemp(prefix="phpsess-bench-", dir="/tmp"))
            try:
                seconds = failover_round(d, fault)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            results[fault].append(seconds)
            print(f"  round {i + 1}: failover after {fault}: {seconds:.2f} s", file=sys.stderr)
    build = Path(tempfile.mkdtemp(prefix="phpsess-bench-", dir="/tmp"))
    loadgen = build_loadgen(build)
    for i in range(min(args.rounds, 3)):
        for label, names in (("1 daemon", ["a"]), ("2 daemons, with backups", ["a", "b"])):
            d = Path(tempfile.mkdtemp(prefix="phpsess-bench-", dir="/tmp"))
            try:
                rate, cpu_us = replication_rate(d, names, args.seconds, loadgen)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            rates[label].append(rate)
            cpu[label].append(cpu_us)
            print(f"  round {i + 1}: {label}: {rate:,.0f} read+write/s, master CPU "
                  f"{cpu_us:.0f} us per cycle", file=sys.stderr)
    shutil.rmtree(build, ignore_errors=True)
    print()
    print("| fault on the master | failover, median | worst | rounds |")
    print("|---|---:|---:|---:|")
    for fault, times in results.items():
        print(f"| {fault} | {statistics.median(times):.2f} s | {max(times):.2f} s "
              f"| {len(times)} |")
    print()
    base = statistics.median(rates["1 daemon"])
    base_cpu = statistics.median(cpu["1 daemon"])
    print("| setup | read+write cycles/s (median) | ratio | master CPU per cycle | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, values in rates.items():
        rate = statistics.median(values)
        cpu_us = statistics.median(cpu[label])
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f} | {cpu_us:.0f} us "
              f"| {cpu_us / base_cpu:.2f} |")


if __name__ == "__main__":
    main()
