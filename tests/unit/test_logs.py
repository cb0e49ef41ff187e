"""phpsess.logs' pure parts, with plain numbers for time."""

from __future__ import annotations

import logging
import shlex

import pytest

from phpsess.logs import Throttle, _Formatter, quoted


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
