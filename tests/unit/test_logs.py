"""phpsess.logs' pure parts, with plain numbers for time."""

from __future__ import annotations

from phpsess.logs import Throttle


def test_a_throttle_lets_per_s_lines_a_second_through_and_counts_the_rest() -> None:
    t = Throttle(per_s=3)
    assert [t.allow(10.0), t.allow(10.1), t.allow(10.2)] == [0, 0, 0]
    assert [t.allow(10.3), t.allow(10.9)] == [None, None]  # left out, counted
    # A new second: the first line says how many were left out before it.
    assert t.allow(11.0) == 2
    assert t.allow(11.5) == 0
    assert t.allow(11.6) == 0
    assert t.allow(11.7) is None
    assert t.allow(20.0) == 1
