"""Durability benchmark: restart time and write throughput per fsync policy.

    .venv/bin/python bench/durability.py [--sessions 1000000] [--seconds 5]

1. Restore: writes a data directory holding N sessions of 1 KiB (a snapshot
   made with the daemon's own record format), starts ``phpsess serve`` on it
   and measures the time from exec to accepting connections.  Goal: < 10 s
   for 1,000,000 sessions.
2. Throughput: 32 connections each writing 1 KiB sessions as fast as the
   daemon acknowledges them, for each policy and with no persistence at all.
   Goal: ``interval`` costs < 10 % of the no-persistence rate.

Prints a Markdown table; numbers vary between machines, ratios are what to
compare.  Everything runs on a unix socket in a temporary directory and is
stopped when done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phpsess import journal as j
from phpsess import protocol as p
from phpsess.persist import snapshot_name

ROOT = Path(__file__).resolve().parent.parent


def start(workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, float]:
    sock = str(workdir / "s.sock")
    started = time.monotonic()
    with open(workdir / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phpsess", "serve", "--listen", f"unix:{sock}", *args],
            cwd=ROOT, stderr=log,
        )
    while True:
        if proc.poll() is not None:
            raise SystemExit((workdir / "daemon.log").read_text())
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(sock)
            return proc, sock, time.monotonic() - started
        except OSError:
            time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


def bench_restore(workdir: Path, sessions: int) -> tuple[float, float, int]:
    data = workdir / "data"
    data.mkdir()
    value = os.urandom(1024)
    expires = time.time() + 86400
    t = time.monotonic()
    with open(data / snapshot_name(1), "wb") as f:
        f.write(j.SNAPSHOT_MAGIC)
        entries = ((f"{i:026d}", expires, 86400, value) for i in range(sessions))
        chunk = []
        for record in j.iter_snapshot_records(entries):
            chunk.append(record)
            if len(chunk) >= 4096:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))
    made = time.monotonic() - t
    size = (data / snapshot_name(1)).stat().st_size
    proc, _, ready = start(workdir, "--data-dir", str(data))
    with open(f"/proc/{proc.pid}/status") as status:
        rss = int(status.read().split("VmRSS:")[1].split()[0])
    stop(proc)
    print(f"  made a {size / 2**20:.0f} MiB snapshot in {made:.1f} s; "
          f"daemon RSS {rss / 1024:.0f} MiB", file=sys.stderr)
    return ready, size / 2**20, rss


async def _load(sock: str, seconds: float, conns: int) -> int:
    value = os.urandom(1024)
    done = 0
    stop_at = trio.current_time() + seconds

    async def one(n: int) -> None:
        nonlocal done
        stream = await trio.open_unix_socket(sock)
        await stream.send_all(b"HELLO 1\n")
        await stream.receive_some(100)
        i = 0
        while trio.current_time() < stop_at:
            i += 1
            await stream.send_all(p.encode_request(p.Write(f"c{n}s{i % 1000}", 1440, value)))
            reply = await stream.receive_some(100)
            assert reply == b"OK\n", reply
            done += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(conns):
            nursery.start_soon(one, n)
    return done


def bench_throughput(workdir: Path, seconds: float) -> dict[str, float]:
    results = {}
    for name, args in [
        ("memory only", ["--memory-only"]),
        ("never", ["--fsync", "never"]),
        ("interval (200 ms)", ["--fsync", "interval"]),
        ("always", ["--fsync", "always"]),
    ]:
        d = workdir / name.split()[0]
        d.mkdir()
        extra = [] if args == ["--memory-only"] else ["--data-dir", str(d / "data")]
        proc, sock, _ = start(d, *args, *extra)
        try:
            n = trio.run(_load, sock, seconds, 32)
        finally:
            stop(proc)
        results[name] = n / seconds
        print(f"  {name}: {n / seconds:,.0f} writes/s", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="phpsess-bench-", dir="/tmp"))
    try:
        print(f"restore of {args.sessions:,} sessions of 1 KiB ...", file=sys.stderr)
        ready, mib, rss = bench_restore(workdir, args.sessions)
        print("write throughput, 32 connections, 1 KiB sessions ...", file=sys.stderr)
        rates = bench_throughput(workdir, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = rates["memory only"]
    print()
    print("| restore | sessions | snapshot | time to serving | daemon RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| 1 KiB sessions | {args.sessions:,} | {mib:,.0f} MiB | {ready:.2f} s "
          f"| {rss / 1024:,.0f} MiB |")
    print()
    print("| persistence | writes/s | ratio to memory only |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
