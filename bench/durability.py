"""Durability benchmark: restart time and write throughput per fsync policy.

    .venv/bin/python bench/durability.py [--sessions 1000000] [--seconds 5]

1. Restore: writes a data directory holding N sessions of 1 KiB (a snapshot
   made with the daemon's own record format), starts ``phpsess serve`` on it
   and measures the time from exec to accepting connections.  Goal: < 10 s
   for 1,000,000 sessions.  Then the same with a journal as large as the
   live data behind the snapshot (N more writes of 1 KiB, over the same
   sessions): the most a journal holds before it is compacted, so about the
   longest restart after a crash.
2. Throughput, for each policy and with no persistence at all: the daemon
   pinned to CPU 0 and ``bench/loadgen.c`` (built with gcc) to CPU 1, 32
   connections on 32,000 sessions of 1 KiB: WRITE only, then PHP's request
   pattern (HELLO+READ LOCK, WRITE).  Goal: ``interval`` costs < 10 % of the
   no-persistence rate.  The daemon's CPU per request is printed too: on a
   shared machine it moves less than the rate.

Prints a Markdown table; numbers vary between machines, ratios are what to
compare.  Everything runs on a unix socket in a temporary directory and is
stopped when done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import build_loadgen, process_cpu_seconds  # bench/daemon.py

from phpsess import journal as j
from phpsess.persist import journal_name, snapshot_name

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


def bench_restore(workdir: Path, sessions: int,
                  journaled: int = 0) -> tuple[float, float, float, int]:
    """Seconds from exec to serving, snapshot MiB, journal MiB, RSS KiB, for
    a snapshot of ``sessions`` and a journal of ``journaled`` writes."""
    data = workdir / f"data-{journaled}"
    data.mkdir()
    value = os.urandom(1024)
    expires = time.time() + 86400
    t = time.monotonic()
    salt = int.from_bytes(os.urandom(4), "little")
    with open(data / snapshot_name(1), "wb") as f:
        f.write(j.header(j.SNAPSHOT, salt))
        entries = ((f"{i:026d}", (value, expires, 86400)) for i in range(sessions))
        for chunk in j.snapshot_chunks(entries, salt=salt):
            f.write(chunk)
    # Every snapshot has its journal (phpsess.persist), empty or not.
    with open(data / journal_name(1), "wb") as f:
        f.write(j.header(j.JOURNAL, salt ^ 1))
        for start_at in range(0, journaled, 10_000):
            writes = range(start_at, min(journaled, start_at + 10_000))
            f.write(j.encode_changes(
                [(time.time(), [(j.Op.PUT, f"{i % sessions:026d}", 86400, value)
                                for i in writes])], salt ^ 1))
    made = time.monotonic() - t
    size = (data / snapshot_name(1)).stat().st_size
    journal_size = (data / journal_name(1)).stat().st_size
    proc, _, ready = start(workdir, "--data-dir", str(data))
    with open(f"/proc/{proc.pid}/status") as status:
        rss = int(status.read().split("VmRSS:")[1].split()[0])
    stop(proc)
    shutil.rmtree(data)
    print(f"  made a {size / 2**20:.0f} MiB snapshot and a {journal_size / 2**20:.0f} MiB "
          f"journal in {made:.1f} s; serving after {ready:.2f} s; "
          f"daemon RSS {rss / 1024:.0f} MiB", file=sys.stderr)
    return ready, size / 2**20, journal_size / 2**20, rss


def bench_throughput(workdir: Path, seconds: float) -> dict[str, dict[str, float]]:
    """Per policy and mix: requests/s and the daemon's CPU microseconds per
    request, the daemon pinned to CPU 0 and bench/loadgen.c to CPU 1."""
    exe = build_loadgen(workdir)
    results: dict[str, dict[str, float]] = {}
    for name, args in [
        ("memory only", ["--memory-only"]),
        ("never", ["--fsync", "never"]),
        ("interval (200 ms)", ["--fsync", "interval"]),
        ("always", ["--fsync", "always"]),
    ]:
        d = workdir / name.split()[0]
        d.mkdir()
        extra = [] if args == ["--memory-only"] else ["--data-dir", str(d / "data")]
        sock = str(d / "s.sock")
        with open(d / "daemon.log", "ab") as log:
            proc = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, "-m", "phpsess", "serve",
                 "--listen", f"unix:{sock}", "--log-level", "warning", *args, *extra],
                cwd=ROOT, stderr=log,
            )
        try:
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    raise SystemExit((d / "daemon.log").read_text())
                time.sleep(0.02)
            for mix in ("write", "rw"):
                cmd = ["taskset", "-c", "1", str(exe), "-m", mix, "-c", "32", "-k", "32000",
                       "-d", str(seconds), "-w", "1", f"unix:{sock}"]
                cmd[-1:-1] = ["--prefill"] if mix == "write" else ["--exist"]
                before = process_cpu_seconds(proc.pid)
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     timeout=seconds + 120).stdout
                cpu = process_cpu_seconds(proc.pid) - before
                r = json.loads(out.strip().splitlines()[-1])
                if r["errors"]:
                    raise SystemExit(f"{name} {mix}: {r['errors']} errors")
                # The CPU window includes the warm-up second: scale it.
                total = r["requests"] * (seconds + 1) / seconds
                results.setdefault(name, {})[mix] = r["rps"]
                results[name][mix + " cpu"] = cpu / total * 1e6
                print(f"  {name}, {mix}: {r['rps']:,.0f} req/s, daemon "
                      f"{cpu / total * 1e6:.1f} us CPU per request", file=sys.stderr)
        finally:
            stop(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="phpsess-bench-", dir="/tmp"))
    try:
        print(f"restore of {args.sessions:,} sessions of 1 KiB ...", file=sys.stderr)
        restores = [bench_restore(workdir, args.sessions)]
        print("... and with a journal of as many writes behind the snapshot ...",
              file=sys.stderr)
        restores.append(bench_restore(workdir, args.sessions, args.sessions))
        print("throughput, 32 connections, 1 KiB sessions ...", file=sys.stderr)
        rates = bench_throughput(workdir, args.seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = rates["memory only"]
    print()
    print("| restore | sessions | snapshot | journal | time to serving | daemon RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (ready, mib, journal_mib, rss) in zip(
        ("snapshot only", "snapshot and a journal as large (the most before compaction)"),
        restores, strict=True,
    ):
        print(f"| {label} | {args.sessions:,} | {mib:,.0f} MiB | {journal_mib:,.0f} MiB "
              f"| {ready:.2f} s | {rss / 1024:,.0f} MiB |")
    print()
    print("| persistence | WRITE req/s | ratio | daemon us/WRITE | PHP-like cycles (HELLO+READ, "
          "WRITE) req/s | ratio | daemon us/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r['write']:,.0f} | {r['write'] / base['write']:.2f} "
              f"| {r['write cpu']:.1f} | {r['rw']:,.0f} | {r['rw'] / base['rw']:.2f} "
              f"| {r['rw cpu']:.1f} |")


if __name__ == "__main__":
    main()
