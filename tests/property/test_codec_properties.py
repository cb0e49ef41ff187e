"""Hypothesis properties of the wire codec (PROTOCOL.md §2, §4, §8)."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from phpsess import protocol as p
from tests.unit.test_protocol import drain, replies_from

SID_CHARS = string.ascii_letters + string.digits + ",-"
TOKEN_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))

sids = st.one_of(
    st.text(SID_CHARS, min_size=1, max_size=12),
    st.text(SID_CHARS, min_size=1, max_size=256),
)
ttls = st.integers(1, p.MAX_TTL_S)
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=40)
payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"\x00", b"\n", b"\r", b"\xff", b"PING\n", b" "])).map(b"".join),
)

requests: st.SearchStrategy[p.Request] = st.one_of(
    st.builds(
        p.Hello,
        version=st.integers(0, 10**9),
        wait_ms=st.none() | st.integers(0, p.MAX_WAIT_MS),
        lease_ms=st.none() | st.integers(1, p.MAX_LEASE_MS),
        client=st.none() | tokens,
    ),
    st.builds(p.Read, sid=sids, lock=st.booleans(), destroyed=st.booleans()),
    st.builds(p.Write, sid=sids, ttl_s=ttls, data=payloads, keep=st.booleans()),
    st.builds(p.Touch, sid=sids, ttl_s=ttls, keep=st.booleans()),
    st.builds(p.Exists, sid=sids),
    st.builds(p.Destroy, sid=sids),
    st.just(p.Close()),
    st.builds(p.Gc, max_lifetime_s=ttls),
    st.builds(
        p.Create,
        length=st.integers(p.MIN_SID_LENGTH, p.MAX_SID_LENGTH),
        bits=st.sampled_from([4, 5, 6]),
        lock=st.booleans(),
    ),
    st.just(p.Ping()),
    st.just(p.Stats()),
    st.builds(p.Get, sid=sids),
    st.builds(
        p.List,
        after=st.none() | sids | st.just("-"),
        limit=st.integers(1, p.MAX_LIST_LIMIT),
        roles=st.booleans(),
    ),
)

MAX = 64  # max_session_bytes; payloads above may exceed it on purpose


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = []
    start = 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return chunks


def decode(data: bytes, cuts: list[int], max_session_bytes: int = MAX) -> list[p.Event]:
    parser = p.RequestParser(max_session_bytes)
    events: list[p.Event] = []
    for chunk in split(data, cuts):
        parser.receive_data(chunk)
        events += drain(parser)
    return events


@given(requests)
def test_encode_request_round_trips(request: p.Request) -> None:
    wire = p.encode_request(request)
    assert wire.endswith(b"\n") or isinstance(request, p.Write)
    header = wire.split(b"\n", 1)[0]
    assert len(header) < p.MAX_HEADER_BYTES
    assert all(0x20 <= b <= 0x7E for b in header)
    parser = p.RequestParser(p.DEFAULT_MAX_SESSION_BYTES)
    parser.receive_data(wire)
    assert drain(parser) == [request]
    assert not parser.mid_request


# Non-fatal wrong requests that may sit between good ones in a stream, with
# the error each must give.
wrong_requests = st.sampled_from(
    [
        (b"BOGUS\n", p.Code.UNKNOWN_VERB),
        (b"READ ../x\n", p.Code.BAD_ID),
        (b"TOUCH s1 0\n", p.Code.BAD_REQUEST),
        (b"HELLO 1 colour=blue\n", p.Code.BAD_REQUEST),
        (b"WRITE ../x 10 3\nabc", p.Code.BAD_ID),
        (b"WRITE s1 0 8\nREAD s1\n", p.Code.BAD_REQUEST),
        (b"WRITE s1 10 65\n" + b"READ s1\n" * 8 + b"X", p.Code.TOO_LARGE),
    ]
)


def expected_event(request: p.Request) -> p.Event:
    if isinstance(request, p.Write) and len(request.data) > MAX:
        return p.RequestError(p.Code.TOO_LARGE, "")
    return request


def same_event(got: p.Event, expected: p.Event) -> bool:
    if isinstance(expected, p.RequestError):
        return isinstance(got, p.RequestError) and got.code is expected.code
    return got == expected


pieces_st = st.lists(
    st.one_of(
        requests.map(lambda r: (p.encode_request(r), expected_event(r))),
        wrong_requests.map(lambda w: (w[0], p.RequestError(w[1], ""))),
    ),
    min_size=1,
    max_size=8,
)


@given(pieces_st, st.lists(st.integers(0, 10_000), max_size=20), st.booleans())
def test_any_chunking_decodes_to_the_same_events(
    pieces: list[tuple[bytes, p.Event]], cuts: list[int], fatal_tail: bool
) -> None:
    stream = b"".join(wire for wire, _ in pieces)
    if fatal_tail:
        stream += b"READ s\x00\nPING\n"
    whole = decode(stream, [])
    # Each piece gives exactly its own event; nothing leaks into the next one.
    assert len(whole) == len(pieces) + fatal_tail
    for (_, expected), got in zip(pieces, whole, strict=False):
        assert same_event(got, expected), (got, expected)
    if fatal_tail:
        assert isinstance(whole[-1], p.FatalError) and whole[-1].code is p.Code.BAD_FRAME
    assert decode(stream, cuts) == whole
    assert decode(stream, list(range(len(stream)))) == whole  # byte by byte


@given(
    st.builds(p.Write, sid=sids, ttl_s=ttls, data=st.binary(max_size=300), keep=st.booleans()),
    st.integers(0, 300),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_oversized_writes_are_swallowed(
    write: p.Write, max_session_bytes: int, cuts: list[int]
) -> None:
    stream = p.encode_request(write) + b"EXISTS next\n"
    events = decode(stream, cuts, max_session_bytes)
    if len(write.data) <= max_session_bytes:
        assert events == [write, p.Exists("next")]
    else:
        assert len(events) == 2
        assert isinstance(events[0], p.RequestError)
        assert events[0].code is p.Code.TOO_LARGE
        assert events[1] == p.Exists("next")


@given(
    st.text(TOKEN_CHARS + " ", min_size=p.MAX_HEADER_BYTES, max_size=3000),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_long_header_lines_are_fatal(line: str, cuts: list[int]) -> None:
    events = decode(line.encode("ascii") + b"\nPING\n", cuts)
    assert len(events) == 1
    assert isinstance(events[0], p.FatalError)
    assert events[0].code is p.Code.HEADER_TOO_LONG


protocolish = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from(
            [
                b"WRITE ",
                b"READ ",
                b"HELLO 1 ",
                b"s1 ",
                b"10 ",
                b"5",
                b"65",
                b"100000",
                b"\n",
                b" ",
                b"KEEP",
                b"wait_ms=",
                b"\r\n",
                b"\x00",
                b"\xff",
                b"x" * 600,
            ]
        ),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300)
@given(
    st.one_of(st.binary(max_size=3000), protocolish),
    st.lists(st.integers(0, 10_000), max_size=20),
    st.integers(0, 100),
)
def test_arbitrary_bytes_never_crash_and_memory_stays_bounded(
    data: bytes, cuts: list[int], max_session_bytes: int
) -> None:
    parser = p.RequestParser(max_session_bytes)
    bound = p.MAX_HEADER_BYTES + max_session_bytes
    seen_fatal = False
    for chunk in split(data, cuts):
        parser.receive_data(chunk)
        for event in drain(parser):
            assert not seen_fatal, "an event after a fatal error"
            assert isinstance(
                event,
                (
                    p.Hello,
                    p.Read,
                    p.Write,
                    p.Touch,
                    p.Exists,
                    p.Destroy,
                    p.Close,
                    p.Gc,
                    p.Create,
                    p.Ping,
                    p.Stats,
                    p.Get,
                    p.List,
                    p.Drain,
                    p.RequestError,
                    p.FatalError,
                ),
            ), event
            if isinstance(event, p.Write):
                assert len(event.data) <= max_session_bytes
            if isinstance(event, p.FatalError):
                seen_fatal = True
                assert event.code in (p.Code.BAD_FRAME, p.Code.HEADER_TOO_LONG)
                assert parser.broken
            elif isinstance(event, p.RequestError):
                assert not p.Error(event.code, "").fatal
        # White box: what the parser holds once it asks for more data.
        assert len(parser._buf) <= bound
        assert parser.broken == seen_fatal


# ---------------------------------------------------------------- replies

reply_tokens = st.text(TOKEN_CHARS, min_size=1, max_size=20)
replies: st.SearchStrategy[p.Reply] = st.one_of(
    st.builds(p.Ok, tokens=st.lists(reply_tokens, max_size=3).map(tuple)),
    st.builds(
        p.Data,
        data=st.binary(max_size=200),
        tokens=st.lists(reply_tokens, max_size=3).map(tuple),
    ),
    st.just(p.MISS),
    st.just(p.MISS_DESTROYED),
    st.builds(
        p.Error,
        code=st.sampled_from(list(p.Code)),
        message=st.one_of(
            st.text("".join(chr(c) for c in range(0x20, 0x7F)), max_size=200),
            st.sampled_from(["", " ", " lead", "trail ", "two  spaces", "ERR X y"]),
        ),
    ),
)


@given(st.lists(replies, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_reply_parser_round_trips(reply_list: list[p.Reply], cuts: list[int]) -> None:
    wire = b"".join(p.encode_reply(r) for r in reply_list)
    assert replies_from(split(wire, cuts)) == reply_list


@given(st.builds(p.Error, code=st.sampled_from(list(p.Code)), message=st.text(max_size=100)))
def test_error_replies_are_one_printable_line(reply: p.Error) -> None:
    wire = p.encode_reply(reply)
    assert wire.endswith(b"\n")
    assert all(0x20 <= b <= 0x7E for b in wire[:-1])
    parser = p.ReplyParser()
    parser.receive_data(wire)
    parsed = parser.next_reply()
    assert isinstance(parsed, p.Error) and parsed.code is reply.code


# Header lines near the fast paths' forms (READ, WRITE, HELLO as PHP sends
# them), valid or not, to compare the fast paths with the general parser.
_near_fast_lines = st.one_of(
    st.builds(
        lambda sid, flag: b"READ " + sid + flag,
        st.one_of(sids.map(str.encode), st.binary(min_size=0, max_size=8)),
        st.sampled_from([b"", b" LOCK", b" NOLOCK", b" lock", b"  LOCK", b" LOCK "]),
    ),
    st.builds(
        lambda sid, ttl, length, keep: b"WRITE %s %s %s%s" % (sid, ttl, length, keep),
        st.one_of(sids.map(str.encode), st.just(b"bad!id"), st.just(b"s1")),
        st.one_of(
            st.sampled_from([0, 1, p.MAX_TTL_S, p.MAX_TTL_S + 1, "01", "x"]),
            st.integers(0, p.MAX_TTL_S + 2),
        ).map(
            lambda v: str(v).encode()
        ),
        st.sampled_from([b"0", b"3", b"64", b"65", b"999999999", b"1000000000", b"03"]),
        st.sampled_from([b"", b" KEEP", b" keep", b" KEEP KEEP"]),
    ),
    st.builds(
        lambda version, wait, lease, client: b"HELLO " + version + wait + lease + client,
        st.sampled_from([b"1", b"2", b"01"]),
        st.one_of(
            st.one_of(
                st.sampled_from([0, p.MAX_WAIT_MS, p.MAX_WAIT_MS + 1]),
                st.integers(0, p.MAX_WAIT_MS + 1),
            ).map(lambda v: b" wait_ms=%d" % v),
            st.sampled_from([b"", b" wait_ms=", b" wait_ms=01"]),
        ),
        st.one_of(
            st.one_of(
                st.sampled_from([0, 1, p.MAX_LEASE_MS, p.MAX_LEASE_MS + 1]),
                st.integers(0, p.MAX_LEASE_MS + 1),
            ).map(lambda v: b" lease_ms=%d" % v),
            st.just(b""),
        ),
        st.one_of(tokens.map(lambda t: b" client=" + t.encode()), st.just(b"")),
    ),
)


@settings(max_examples=1500)
@given(_near_fast_lines, st.binary(max_size=80), st.lists(st.integers(0, 200), max_size=3))
def test_the_fast_paths_parse_exactly_like_the_general_parser(
    line: bytes, tail: bytes, cuts: list[int]
) -> None:
    data = line + b"\n" + tail
    fast = decode(data, cuts)
    saved = p._FAST_READ, p._FAST_WRITE, p._FAST_HELLO
    never = __import__("re").compile(rb"(?!)")
    p._FAST_READ = p._FAST_WRITE = p._FAST_HELLO = never  # type: ignore[misc]
    try:
        general = decode(data, cuts)
    finally:
        p._FAST_READ, p._FAST_WRITE, p._FAST_HELLO = saved  # type: ignore[misc]
    assert fast == general
