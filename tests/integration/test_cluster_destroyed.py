"""``READ ... DESTROYED`` through a cluster node that forwards it to the
session's master (PROTOCOL.md §4.1, CLUSTER.md §5): the waiter on another
node is told ``MISS DESTROYED`` as one on the master is, so PHP's handler
there keeps the destroyed (logged-out) ID dead.  Real daemons on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.integration.test_cluster import Cluster, _create, _local_sessions

# As test_cluster.py: their daemons time failure detection, one worker runs
# them one after another.
pytestmark = pytest.mark.xdist_group("cluster")


@pytest.fixture
def pair(workdir: Path) -> Iterator[Cluster]:
    c = Cluster(workdir, ("a", "b"))
    yield c
    c.stop()


def _until(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + 15
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_read_forwarded_to_the_master_is_told_the_session_was_destroyed_while_it_waited(
    pair: Cluster,
) -> None:
    sid = _create(pair, "a", b'user|s:5:"alice";')  # mastered by a, its backup on b
    via_b = pair.nodes["b"].address
    holder, waiter, plain = Client(via_b), Client(via_b), Client(via_b)
    try:
        assert holder.request(p.Read(sid)) == p.Data(b'user|s:5:"alice";')
        # What PHP's handler sends; then one without the token (an older
        # handler), queued behind it on the master.
        waiter.send_raw(b"READ " + sid.encode() + b" LOCK DESTROYED\n")
        _until(lambda: pair.stats("a")["locks_waiting"] == 1, "the waiter to wait on a")
        plain.send_raw(p.encode_request(p.Read(sid)))
        _until(lambda: pair.stats("a")["locks_waiting"] == 2, "the second waiter")
        assert holder.request(p.Destroy(sid)) == p.OK  # session_destroy()
        assert waiter.read_reply() == p.MISS_DESTROYED
        # Held only to release the dead ID: unknown to strict mode everywhere.
        for name in ("a", "b"):
            with Client(pair.nodes[name].address) as c:
                assert c.request(p.Exists(sid)) == p.Ok(("0",)), name
        # Re-entrant, as a session_start() after session_write_close() would.
        assert waiter.request(p.Read(sid, lock=True, destroyed=True)) == p.MISS_DESTROYED
        # The handler drops its write: DESTROY instead of WRITE.
        assert waiter.request(p.Destroy(sid)) == p.OK
        assert plain.read_reply() == p.MISS  # not asked: as before
        assert plain.request(p.Close()) == p.OK
    finally:
        for c in (holder, waiter, plain):
            c.close()
    # Dead on both nodes: no master copy, no backup copy, unknown through either.
    for name in ("a", "b"):
        with Client(pair.nodes[name].address) as c:
            assert c.request(p.Exists(sid)) == p.Ok(("0",)), name
            assert c.request(p.Read(sid, lock=False)) == p.MISS, name
    _until(lambda: _local_sessions(pair, "a") == _local_sessions(pair, "b") == 0,
           "no copy of the session on either node")
