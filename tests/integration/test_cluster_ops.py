"""The operator's view of a cluster, with real daemons on loopback: a
drained node is shown ``left`` (not dead) and the documented peer alert
stays quiet for it, while a node killed with ``kill -9`` is dead and the
alert fires (CLUSTER.md §3, §8; DEPLOYMENT.md §6)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import Daemon, Samples, free_tcp_port, scrape_metrics
from tests.integration.test_cluster import (
    Cluster,
    _create,
    _free_port,
    _FsyncAlways,
    _local_sessions,
)

pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[2]
# The alert of DEPLOYMENT.md §6, as documented (the test checks it is).
PEER_ALERT = "phpsess_peer_up == 0 unless on(instance, peer) phpsess_peer_left == 1"


def _firing(samples: Samples) -> set[str]:
    """The peers for which PEER_ALERT fires on one daemon's /metrics: its
    ``phpsess_peer_up`` samples at 0, less those whose ``phpsess_peer_left``
    is 1 (``unless on(instance, peer)``: one instance here)."""
    up = {dict(labels)["peer"]: value for (name, labels), value in samples.items()
          if name == "phpsess_peer_up"}
    left = {dict(labels)["peer"]: value for (name, labels), value in samples.items()
            if name == "phpsess_peer_left"}
    return {peer for peer, value in up.items() if value == 0 and left.get(peer) != 1}


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "60", sys.executable, "-m", "phpsess", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=90,
    )


def _peer_states(address: str) -> dict[str, str]:
    """The peers' states as ``phpsess status --json`` shows them."""
    done = _admin("status", "--json", "--connect", address)
    assert done.returncode == 0, done.stderr
    peers = json.loads(done.stdout)["cluster"]["peers"]
    return {name: info["state"] for name, info in peers.items()}


def _wait_state(cluster: Cluster, on: str, peer: str, state: str) -> None:
    deadline = time.monotonic() + 15
    while (seen := _peer_states(cluster.nodes[on].address)[peer]) != state:
        assert time.monotonic() < deadline, (on, peer, seen, cluster.nodes[on].log())
        time.sleep(0.1)


class _Metered(Cluster):
    metrics_ports: dict[str, int]

    def args(self, name: str, secret: Path) -> list[str]:
        if name not in self.metrics_ports:
            port = free_tcp_port()
            while port in self.ports.values():  # a cluster port, not bound yet
                port = free_tcp_port()
            self.metrics_ports[name] = port
        port = self.metrics_ports[name]
        return [*super().args(name, secret), "--metrics-listen", f"127.0.0.1:{port}"]


def test_a_drained_node_is_left_and_quiet_a_killed_one_dead_and_alerting(
    workdir: Path,
) -> None:
    assert PEER_ALERT in (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    _Metered.metrics_ports = {}
    cluster = _Metered(workdir)
    try:
        sids = [_create(cluster, on, b"n|i:1;") for on in ("a", "b", "c", "b")]
        for name in ("a", "c"):
            assert _firing(scrape_metrics(cluster.metrics_ports[name])) == set()
        # phpsess drain --wait: b hands its sessions over and exits.
        done = _admin("drain", "--wait", "--connect", cluster.nodes["b"].address)
        assert done.returncode == 0, (done.stdout, done.stderr, cluster.nodes["b"].log())
        assert cluster.nodes["b"].wait(30) == 0
        assert "event=leaving" in cluster.nodes["b"].log()
        for name in ("a", "c"):
            _wait_state(cluster, name, "b", "left")
        # Well past the detection time, it is still left, not dead.
        time.sleep(3 * 1.5)
        assert _peer_states(cluster.nodes["a"].address) == {"b": "left", "c": "alive"}
        assert _peer_states(cluster.nodes["c"].address) == {"a": "alive", "b": "left"}
        for name in ("a", "c"):
            samples = scrape_metrics(cluster.metrics_ports[name])
            assert samples[("phpsess_peer_up", (("peer", "b"),))] == 0.0  # not up: true
            assert samples[("phpsess_peer_left", (("peer", "b"),))] == 1.0
            assert _firing(samples) == set(), name
            assert "event=peer_dead peer=b" not in cluster.nodes[name].log()
        status = _admin("status", "--connect", cluster.nodes["a"].address)
        assert re.search(r"^peer b +left, 0 sessions$", status.stdout, re.M), status.stdout
        # Nothing has a single copy: a and c hold both copies of each.
        assert _local_sessions(cluster, "a") == _local_sessions(cluster, "c") == len(sids)

        # c dies without a drain: dead, and the alert fires for it alone.
        cluster.nodes["c"].kill9()
        _wait_state(cluster, "a", "c", "dead")
        samples = scrape_metrics(cluster.metrics_ports["a"])
        assert samples[("phpsess_peer_left", (("peer", "c"),))] == 0.0
        assert _firing(samples) == {"c"}
        assert _peer_states(cluster.nodes["a"].address) == {"b": "left", "c": "dead"}

        # A left node that starts again rejoins.
        cluster.nodes["b"].start()
        _wait_state(cluster, "a", "b", "alive")
        assert _firing(scrape_metrics(cluster.metrics_ports["a"])) == {"c"}
    finally:
        cluster.stop()


class _SlowToStop(_Metered):
    def args(self, name: str, secret: Path) -> list[str]:
        # Requests holding locks get half a second once the drain's
        # hand-over ends (the default 10 s would only slow the test down).
        return [*super().args(name, secret), "--shutdown-timeout-s", "0.5"]


def _draining(cluster: Cluster, on: str, peer: str) -> bool:
    done = _admin("status", "--json", "--connect", cluster.nodes[on].address)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)["cluster"]["peers"][peer]
    return bool(info["state"] == "alive" and info["draining"])


def test_a_node_killed_in_the_middle_of_its_drain_is_dead(workdir: Path) -> None:
    _Metered.metrics_ports = {}
    cluster = _SlowToStop(workdir)
    try:
        a = cluster.nodes["a"]
        sid = _create(cluster, "a", b"n|i:1;")
        # A request holds the lock of a session a masters: a's drain waits
        # for it before handing it over (CLUSTER.md §8), so a is killed
        # while still draining, having announced nothing.
        with Client(a.address) as holder:
            assert isinstance(holder.request(p.Read(sid)), p.Data)
            done = _admin("drain", "--connect", a.address)
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 15
            while not (_draining(cluster, "b", "a") and _draining(cluster, "c", "a")):
                assert time.monotonic() < deadline, cluster.nodes["b"].log()
                time.sleep(0.1)
            a.kill9()
        for name in ("b", "c"):
            _wait_state(cluster, name, "a", "dead")
            samples = scrape_metrics(cluster.metrics_ports[name])
            assert samples[("phpsess_peer_left", (("peer", "a"),))] == 0.0
            assert _firing(samples) == {"a"}
        assert "event=leaving" not in a.log()
    finally:
        cluster.stop()



# -- phpsess ls on a cluster node: master or backup, and the other holder


def _ls(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = _admin("ls", "--connect", address, *args)
    assert done.returncode == 0, done.stderr
    return done


def _ls_json(address: str) -> dict[str, dict[str, object]]:
    rows = [json.loads(line) for line in _ls(address, "--json").stdout.splitlines()]
    return {str(row.pop("id")): row for row in rows}


def test_ls_says_master_or_backup_and_where_the_other_copy_is(workdir: Path) -> None:
    for sub in ("pair", "single"):
        (workdir / sub).mkdir()
    pair = Cluster(workdir / "pair", ("a", "b"))
    single = Daemon(workdir / "single", "--memory-only")
    try:
        on_a = _create(pair, "a", b"n|i:1;")  # master a, backup b
        on_b = _create(pair, "b", b"n|i:22;")  # master b, backup a
        a = pair.nodes["a"].address
        rows = _ls_json(a)
        assert rows == {
            on_a: {"bytes": 6, "ttl_ms": rows[on_a]["ttl_ms"], "locked": False,
                   "role": "master", "other": "b"},
            on_b: {"bytes": 7, "ttl_ms": rows[on_b]["ttl_ms"], "locked": False,
                   "role": "backup", "other": "b"},
        }
        assert _ls_json(pair.nodes["b"].address)[on_a]["role"] == "backup"
        table = _ls(a).stdout.splitlines()
        assert table[0].split() == ["ID", "BYTES", "TTL", "LOCKED", "COPIES"]
        assert table[1 + sorted([on_a, on_b]).index(on_a)].endswith("no      master, other on b")
        assert table[1 + sorted([on_a, on_b]).index(on_b)].endswith("no      backup, other on b")
        # b dies: a masters both, alone, whatever their IDs name.
        pair.nodes["b"].kill9()
        deadline = time.monotonic() + 15
        while _peer_states(a)["b"] != "dead":
            assert time.monotonic() < deadline, pair.nodes["a"].log()
            time.sleep(0.1)
        rows = _ls_json(a)
        assert {sid: (row["role"], row["other"]) for sid, row in rows.items()} == {
            on_a: ("master", None), on_b: ("master", None),
        }
        assert "master, single copy" in _ls(a).stdout
        # A single daemon: the output is what it was, nothing new.
        with Client(single.address) as c:
            assert c.request(p.Write("plain", 60, b"x")) == p.OK
        plain = _ls_json(single.address)
        assert list(plain) == ["plain"]
        assert sorted(plain["plain"]) == ["bytes", "locked", "ttl_ms"]
        assert _ls(single.address).stdout.splitlines()[0].split() == [
            "ID", "BYTES", "TTL", "LOCKED"]
    finally:
        pair.stop()
        single.stop()


def test_a_single_daemons_data_directory_is_not_made_a_cluster_nodes_at_a_loss(
    workdir: Path,
) -> None:
    # A single daemon's data directory, made node a's: the sessions whose IDs
    # name b master were taken for backup copies and dropped (an info line),
    # though b never had them: users logged out (a walkthrough of
    # DEPLOYMENT.md §2 then §4).  a now refuses to start, and says how to
    # bring them in: export, then import, which keeps every one.
    from phpsess.placement import named_nodes

    sessions = {f"migrated{i:02d}sessionid{i:04d}": (b"n|i:%d;" % i, 600) for i in range(12)}
    on_b = [sid for sid in sessions if named_nodes(sid, frozenset("ab"))[0] == "b"]
    assert on_b, "the IDs must name b master of some"
    (workdir / "a").mkdir()
    single = Daemon(workdir / "a")
    with Client(single.address) as c:
        replies = c.pipeline([p.Write(sid, ttl, data) for sid, (data, ttl) in sessions.items()])
    assert all(isinstance(r, p.Ok) for r in replies), replies
    single.stop()

    try:
        Cluster(workdir, names=("a", "b")).stop()
    except RuntimeError as exc:
        refused = str(exc)
    else:
        pytest.fail("node a started on a single daemon's data directory")
    assert f"holds {len(on_b)} sessions (of 12) that a daemon outside a cluster wrote (no " \
        "cluster record) and whose IDs name another node master, which never had them" \
        in refused, refused
    assert "run `phpsess export -o sessions.jsonl`" in refused, refused

    # Nothing was lost: the single daemon has them all, and the way the
    # message gives brings every one into the cluster.
    single.start()
    dump = workdir / "sessions.jsonl"
    try:
        assert _admin("export", "--connect", single.address, "--output", str(dump)).returncode == 0
    finally:
        single.stop()
    (workdir / "a" / "data").rename(workdir / "single-data")
    cluster = Cluster(workdir, names=("a", "b"))
    try:
        imported = _admin("import", str(dump), "--connect", cluster.nodes["a"].address)
        assert imported.returncode == 0, imported.stderr
        for via in "ab":
            with Client(cluster.nodes[via].address) as c:
                for sid, (data, _) in sessions.items():
                    assert c.request(p.Read(sid, lock=False)) == p.Data(data), (via, sid)
    finally:
        cluster.stop()


def test_a_second_daemon_with_a_nodes_name_is_named_in_a_warning(workdir: Path) -> None:
    # A copied configuration whose `node` was not changed: the copy, at
    # another address, took turns with the real a in b's eyes (b took a's
    # sessions over, a was told it was dead) with nothing above info level
    # in any log (a first-install walkthrough).  b now warns, naming both
    # addresses.
    pair = Cluster(workdir, names=("a", "b"))
    copy: Daemon | None = None
    try:
        copy_dir = workdir / "copy"
        copy_dir.mkdir()
        copy_port = _free_port()
        copy = Daemon(
            copy_dir, "--memory-only", "--node", "a", "--cluster-listen",
            f"127.0.0.1:{copy_port}", "--cluster-secret-file", str(pair.secret),
            "--heartbeat-ms", "250", "--peer", f"b=127.0.0.1:{pair.ports['b']}",
        )
        b = pair.nodes["b"]
        deadline = time.monotonic() + 15
        while "event=heartbeat_from_another_address peer=a" not in b.log():
            assert time.monotonic() < deadline, b.log()
            time.sleep(0.05)
        line = next(line for line in b.log().splitlines()
                    if "event=heartbeat_from_another_address" in line)
        assert f"source=127.0.0.1:{copy_port} configured=tcp:127.0.0.1:{pair.ports['a']}" \
            in line, line
        assert "two daemons may run with node = a" in line, line
        # The real a, at its own address, is not named.
        assert f"source=127.0.0.1:{pair.ports['a']} " not in b.log()
    finally:
        if copy is not None:
            copy.stop()
        pair.stop()


def test_a_cluster_node_whose_journal_lost_a_role_record_still_starts(workdir: Path) -> None:
    # The refusal above is for a directory with no cluster record at all. A
    # cluster node's own directory has one for every session; one lost (to
    # damage, then `phpsess repair`) leaves that session to be read by its
    # ID, as before, and the node starts.
    from phpsess import journal as j

    pair = _FsyncAlways(workdir, names=("a", "b"))  # a kill -9 keeps b's copies
    try:
        sids = [_create(pair, "a", b"n|i:%d;" % i) for i in range(3)]  # b backs them up
        b = pair.nodes["b"]
        b.kill9()  # a stop would hand its copies over, and drop them
        (path,) = (b.data_dir).glob("journal-*.pjnl")
        buf = path.read_bytes()
        header = j.parse_header(buf, j.JOURNAL)
        assert header is not None and header.version == 2
        records: list[j.Record] = []
        j.scan(buf, header.size, lambda *fields: records.append(j.Record(*fields)),
               header.salt)
        kept = [r for r in records if not (r.op is j.Op.META and r.sid == sids[0])]
        assert len(kept) < len(records)
        path.write_bytes(buf[:header.size] + b"".join(
            j.encode(r.op, r.sid, r.expires_at, r.ttl_s, r.data, salt=header.salt)
            for r in kept))
        b.start()  # it refused: "holds 1 session (of 3) that a daemon outside a cluster wrote"
        pair.wait_formed()
        with Client(b.address) as c:
            for i, sid in enumerate(sids):
                assert c.request(p.Read(sid, lock=False)) == p.Data(b"n|i:%d;" % i)
    finally:
        pair.stop()
