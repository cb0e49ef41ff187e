"""phpsess.logs' pure parts, with plain numbers for time."""

from __future__ import annotations

import logging
import math
import shlex

import pytest

from phpsess.logs import Throttle, _Formatter, clipped, quoted


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


def test_the_count_of_a_burst_is_given_once_its_second_is_over() -> None:
    # A burst with no line of its kind after it: its count used to be lost.
    t = Throttle(per_s=2)
    assert [t.allow(10.0), t.allow(10.1), t.allow(10.2), t.allow(10.3)] == [0, 0, None, None]
    assert t.left_out(10.9) == 0  # the second is not over: more may come
    assert t.allow(10.95) is None
    assert t.left_out(11.0) == 3
    assert t.left_out(12.0) == 0  # given once
    # The next line of the kind still says how many were left out before it.
    assert t.allow(30.0) == 3
    assert t.left_out(40.0) == 0


def test_every_line_left_out_is_in_exactly_one_count() -> None:
    t = Throttle(per_s=1)
    counted = 0
    left_out = 0
    now = 0.0
    for step in range(1000):
        now += 0.01 * (1 + step % 7)
        if t.allow(now) is None:
            left_out += 1
        if step % 13 == 0:
            counted += t.left_out(now)
    counted += t.left_out(now + 1.0)
    assert counted == left_out > 0


def test_at_the_stop_the_open_second_is_counted_too() -> None:
    t = Throttle(per_s=1)
    assert [t.allow(5.0), t.allow(5.1), t.allow(5.2)] == [0, None, None]
    assert t.left_out(5.3) == 0
    assert t.left_out(math.inf) == 2
    assert t.left_out(math.inf) == 0


@pytest.mark.parametrize(
    ("text", "max_chars", "shown"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("a bit too long", 10, "a bit t..."),
    ],
)
def test_text_for_a_log_line_is_cut_to_its_length(text: str, max_chars: int, shown: str) -> None:
    assert clipped(text, max_chars) == shown


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("cluster.peers,log_level", "cluster.peers,log_level"),
        ("these apply (after a restart)", '"these apply (after a restart)"'),
        ('say "hi" \\ there', '"say \\"hi\\" \\\\ there"'),
        ("mysql://u@h:3306/db?socket=/x.sock", '"mysql://u@h:3306/db?socket=/x.sock"'),
        ("two\nlines", '"two\\nlines"'),
        ("", '""'),
        (7, "7"),
    ],
)
def test_a_value_with_spaces_quotes_or_equals_is_one_quoted_logfmt_value(
    value: object, field: str
) -> None:
    assert quoted(value) == field


def test_a_logged_line_with_quoted_values_splits_into_its_fields() -> None:
    record = logging.LogRecord(
        "phpsess", logging.WARNING, __file__, 1, "event=x changed=%s detail=%s count=%d",
        ("a,b", quoted('no "answer" within 2 s'), 3), None,
    )
    line = _Formatter().format(record)
    fields = dict(part.split("=", 1) for part in shlex.split(line)[1:])
    assert fields == {"level": "warning", "event": "x", "changed": "a,b",
                      "detail": 'no "answer" within 2 s', "count": "3"}
