"""Under ``--fsync always`` no reply reports a state a crash could still
undo: a DESTROY of a session already destroyed (it changes nothing) or a
READ after a destroy waits for the fsync of that destroy too.  It used to
answer at once while the first destroy's fsync was still running."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import pytest
import trio

from phpsess import protocol as p
from tests.conftest import HangingFdatasync, fsync_always_server
from tests.server.test_server_time import _Conn, hello


@contextlib.asynccontextmanager
async def _two_clients_and_a_disk_to_stall(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[_Conn, _Conn, HangingFdatasync]]:
    """Clients a and b of an ``--fsync always`` daemon holding session s
    (b"x"), and the disk, whose next fsync hangs until ``release``."""
    disk = HangingFdatasync(limit_s=10)
    async with fsync_always_server(nursery) as path:
        a, b = await hello(path), await hello(path)
        assert await a.request(p.Write("s", 60, b"x")) == p.OK
        monkeypatch.setattr(os, "fdatasync", disk)
        yield a, b, disk
        monkeypatch.setattr(os, "fdatasync", disk.real)
        for c in (a, b):
            await c.stream.aclose()


async def test_a_reply_waits_for_the_fsync_of_what_it_reports(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _two_clients_and_a_disk_to_stall(nursery, monkeypatch) as (a, b, disk):
        await a.stream.send_all(p.encode_request(p.Destroy("s")))
        await trio.to_thread.run_sync(disk.hung.wait, 10)
        # The destroy is in memory, not on disk: b must not be told yet.
        await b.stream.send_all(
            p.encode_request(p.Destroy("s")) + p.encode_request(p.Read("s", lock=False))
        )
        with trio.move_on_after(0.5) as early:
            await b.reply()
        assert early.cancelled_caught, "a reply went out before the fsync"
        disk.release.set()
        with trio.fail_after(10):
            assert await a.reply() == p.OK
            assert await b.reply() == p.OK
            assert await b.reply() == p.MISS


@pytest.mark.parametrize("batch", ["300 pipelined reads", "a reply of 300 KiB"])
async def test_replies_sent_before_the_end_of_a_long_batch_wait_too(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, batch: str
) -> None:
    # A long batch sends its replies so far every 256 requests (and every
    # 256 KiB of replies): those went out while another connection's
    # destroy or write they report was still in its fsync (a reviewer's
    # repro: 256 of 300 pipelined READs answered MISS; `phpsess export`
    # pipelines 1000 GETs).
    async with _two_clients_and_a_disk_to_stall(nursery, monkeypatch) as (a, b, disk):
        expected: p.Reply
        if batch == "300 pipelined reads":
            await a.stream.send_all(p.encode_request(p.Destroy("s")))
            count, expected = 300, p.MISS
        else:
            big = b"y" * (300 * 1024)
            await a.stream.send_all(p.encode_request(p.Write("s", 60, big)))
            count, expected = 1, p.Data(big)
        await trio.to_thread.run_sync(disk.hung.wait, 10)
        await b.stream.send_all(p.encode_request(p.Read("s", lock=False)) * count)
        with trio.move_on_after(0.5) as early:
            await b.stream.receive_some(1)
        assert early.cancelled_caught, "a reply went out before the fsync"
        disk.release.set()
        with trio.fail_after(10):
            assert await a.reply() == p.OK
            for _ in range(count):
                assert await b.reply() == expected
