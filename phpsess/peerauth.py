"""Authentication of peer traffic with the shared cluster secret
(CLUSTER.md §4).  Pure: wall-clock time is an argument; the only randomness is
:func:`new_challenge`.

UDP heartbeats.  A datagram is ``payload || tag``: ``payload`` is
``PHPSESS-HB1 `` followed by compact ASCII JSON (the :class:`Heartbeat` fields
plus ``t``, the sender's wall clock in integer milliseconds), ``tag`` is the
32-byte ``HMAC-SHA256(secret, payload)``.  :func:`decode_heartbeat` checks
the size, then the tag (in constant time), then the timestamp (at most
``max_skew_s`` off our wall clock, either way), then every field; anything
wrong is :class:`AuthError`.  A sender's timestamps only ever increase
(:func:`next_heartbeat_ms`), and :class:`ReplayGuard` accepts each sender's
heartbeats only in increasing timestamp order, so a datagram captured on the
wire and sent again is dropped (as is one UDP delivered late, harmlessly: a
newer one has been heard).

TCP handshake, before any other traffic on a peer connection, as header lines
of the line protocol (PROTOCOL.md §2)::

    listener  -> connector   CHALLENGE <c1 hex>
    connector -> listener    AUTH <name> <incarnation> <proof(secret, c1, name) hex> <c2 hex>
    listener  -> connector   ACCEPT <listener name> <proof(secret, c2, listener name) hex>

``proof(secret, c, name) = HMAC-SHA256(secret, c || name)`` and ``c1``, ``c2``
are fresh :func:`new_challenge` values.  The listener verifies the
connector's proof *before* proving itself (so it never computes a proof for
someone who has not proved they hold the secret); the connector verifies the
listener's.  Only then does ordinary protocol traffic flow.  The shell must
also check what this module cannot know: that the AUTH name is a configured
peer and not the listener's own name, that ``c2`` differs from ``c1`` (a
reflected challenge), and that the ACCEPT name is the peer it meant to reach.
Traffic is authenticated, not encrypted, and a man in the middle can relay a
handshake: run the cluster on a private network.

Errors never contain the secret or a proof.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from typing import Final, NoReturn

from phpsess.membership import (
    MAX_COUNT,
    MAX_INCARNATION,
    NODE_NAME_RE,
    Heartbeat,
    check_incarnation,
    check_node_name,
)

MIN_SECRET_BYTES: Final = 16
CHALLENGE_BYTES: Final = 32
TAG_BYTES: Final = 32
MAX_DATAGRAM_BYTES: Final = 1400  # fits an Ethernet MTU; Heartbeat bounds its dead list
HEARTBEAT_MAGIC: Final = b"PHPSESS-HB1 "
_MAX_TIMESTAMP_MS: Final = 2**53

_HB_KEYS: Final = frozenset({"n", "i", "s", "k", "d", "x", "h", "t"})
_HEX64: Final = "[0-9a-f]{64}"
_INC: Final = "[1-9][0-9]{0,18}"
_CHALLENGE_LINE: Final = re.compile(f"CHALLENGE ({_HEX64})".encode())
_AUTH_LINE: Final = re.compile(f"AUTH ({NODE_NAME_RE}) ({_INC}) ({_HEX64}) ({_HEX64})".encode())
_ACCEPT_LINE: Final = re.compile(f"ACCEPT ({NODE_NAME_RE}) ({_HEX64})".encode())


class AuthError(Exception):
    """Peer traffic failed authentication or is malformed: drop it, log it."""


def check_secret(secret: bytes) -> bytes:
    """The secret without trailing whitespace (as a file holds it); ValueError
    if fewer than ``MIN_SECRET_BYTES`` remain."""
    key = secret.rstrip()
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the cluster secret is {len(key)} bytes (after stripping trailing whitespace);"
            f" at least {MIN_SECRET_BYTES} are needed: make one with"
            " `head -c 32 /dev/urandom | base64 > FILE`"
        )
    return key


def _key(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError("the cluster secret is too short: pass it through check_secret()")
    return secret


def _mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(_key(secret), message, hashlib.sha256).digest()


# -- UDP heartbeats


def encode_heartbeat(hb: Heartbeat, secret: bytes, wall_now: float) -> bytes:
    if not math.isfinite(wall_now) or not 0 <= wall_now * 1000 <= _MAX_TIMESTAMP_MS:
        raise ValueError(f"invalid wall clock {wall_now!r}")
    body = {
        "n": hb.name,
        "i": hb.incarnation,
        "s": hb.sessions,
        "k": hb.sockets,
        "d": hb.draining,
        "x": [list(entry) for entry in hb.dead],
        "h": list(hb.hears),
        "t": round(wall_now * 1000),
    }
    payload = HEARTBEAT_MAGIC + json.dumps(body, separators=(",", ":")).encode("ascii")
    if len(payload) + TAG_BYTES > MAX_DATAGRAM_BYTES:
        # Only with dozens of long node names and a full dead list: leave
        # out whom we hear (peers then declare deaths without our witness).
        body["h"] = []
        payload = HEARTBEAT_MAGIC + json.dumps(body, separators=(",", ":")).encode("ascii")
    return payload + _mac(secret, payload)


def _bad(message: str) -> NoReturn:
    raise AuthError(f"malformed heartbeat: {message}")


def _reject_constant(name: str) -> NoReturn:
    _bad(f"{name} is not allowed")


def _reject_float(text: str) -> NoReturn:
    _bad("non-integer number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        _bad("duplicate key")
    return result


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        _bad(f"{what} must be an integer in {low} .. {high}")
    return value


def next_heartbeat_ms(wall_now: float, last_ms: int) -> int:
    """The timestamp of a sender's next heartbeat: its wall clock in
    milliseconds, but always after the last one, even if the clock stepped
    back (receivers accept only increasing timestamps)."""
    return max(round(wall_now * 1000), last_ms + 1)


class ReplayGuard:
    """Accepts a sender's heartbeats only in increasing timestamp order: a
    replayed datagram could otherwise keep a dead peer looking alive for the
    whole ``max_skew_s``, or bring back a previous incarnation of it.  Per
    name, not per incarnation: a restarted daemon's clock is past the last
    heartbeat of the one before (a clock stepped back across a restart delays
    its rejoin by the step; more than ``max_skew_s`` is refused anyway)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def fresh(self, name: str, sent_ms: int) -> bool:
        if sent_ms <= self._last.get(name, -1):
            return False
        self._last[name] = sent_ms
        return True


def decode_heartbeat(
    datagram: bytes, secret: bytes, wall_now: float, max_skew_s: float = 30.0
) -> Heartbeat:
    """The heartbeat in ``datagram``, or :class:`AuthError` saying why not
    (ValueError only for a bad ``secret`` argument)."""
    return decode_heartbeat_sent(datagram, secret, wall_now, max_skew_s)[0]


def decode_heartbeat_sent(
    datagram: bytes, secret: bytes, wall_now: float, max_skew_s: float = 30.0
) -> tuple[Heartbeat, int]:
    """As :func:`decode_heartbeat`, with the sender's timestamp (ms) for
    :class:`ReplayGuard`."""
    key = _key(secret)
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise AuthError(f"heartbeat datagram of {len(datagram)} bytes is too large")
    if len(datagram) < len(HEARTBEAT_MAGIC) + TAG_BYTES:
        raise AuthError(f"heartbeat datagram of {len(datagram)} bytes is too short")
    payload, tag = datagram[:-TAG_BYTES], datagram[-TAG_BYTES:]
    if not hmac.compare_digest(_mac(key, payload), tag):
        raise AuthError("heartbeat HMAC does not match: the sender does not have our secret")
    if not payload.startswith(HEARTBEAT_MAGIC):
        _bad("unknown format")
    try:
        body = json.loads(
            payload[len(HEARTBEAT_MAGIC) :].decode("ascii"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_reject_float,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise AuthError(f"malformed heartbeat: not ASCII JSON ({exc.__class__.__name__})") from None
    if type(body) is not dict or body.keys() != _HB_KEYS:
        _bad(f"expected an object with keys {sorted(_HB_KEYS)}")
    sent_ms = _int(body["t"], "t", 0, _MAX_TIMESTAMP_MS)
    sent_s = sent_ms / 1000
    if sent_s < wall_now - max_skew_s:
        raise AuthError(
            f"heartbeat timestamp is {wall_now - sent_s:.1f} s old (more than {max_skew_s} s):"
            " replayed, or the clocks differ (run NTP)"
        )
    if sent_s > wall_now + max_skew_s:
        raise AuthError(
            f"heartbeat timestamp is {sent_s - wall_now:.1f} s in the future"
            f" (more than {max_skew_s} s): the clocks differ (run NTP)"
        )
    dead = body["x"]
    if type(dead) is not list:
        _bad("x must be a list")
    entries: list[tuple[str, int]] = []
    for entry in dead:
        if type(entry) is not list or len(entry) != 2:
            _bad("x entries must be [node, incarnation]")
        entries.append((entry[0], _int(entry[1], "dead incarnation", 1, MAX_INCARNATION)))
    hears = body["h"]
    if type(hears) is not list:
        _bad("h must be a list")
    try:
        heartbeat = Heartbeat(
            name=body["n"],
            incarnation=_int(body["i"], "i", 1, MAX_INCARNATION),
            sessions=_int(body["s"], "s", 0, MAX_COUNT),
            sockets=_int(body["k"], "k", 0, MAX_COUNT),
            draining=body["d"],
            dead=tuple(entries),
            hears=tuple(hears),
        )
    except ValueError as exc:
        raise AuthError(f"malformed heartbeat: {exc}") from None
    return heartbeat, sent_ms


# -- TCP handshake


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def _check_challenge(challenge: bytes) -> bytes:
    if type(challenge) is not bytes or len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"a challenge is {CHALLENGE_BYTES} bytes")
    return challenge


def proof(secret: bytes, challenge: bytes, name: str) -> bytes:
    """``HMAC-SHA256(secret, challenge || name)``."""
    _check_challenge(challenge)
    return _mac(secret, challenge + check_node_name(name).encode("ascii"))


def verify_proof(secret: bytes, challenge: bytes, name: str, tag: bytes) -> None:
    """AuthError unless ``tag`` is ``proof(secret, challenge, name)``."""
    if not hmac.compare_digest(proof(secret, challenge, name), tag):
        raise AuthError(f"peer {name!r} failed to prove it holds the cluster secret")


def _match(pattern: re.Pattern[bytes], line: bytes, what: str) -> re.Match[bytes]:
    match = pattern.fullmatch(line.removesuffix(b"\n"))
    if match is None:
        # In hex: a log line quotes the error, and the line's text comes
        # from whoever connected, before it proved anything (spaces and
        # "key=value" words would read as fields of that log line).
        raise AuthError(
            f"malformed {what} line in the peer handshake, its first bytes in hex: "
            f"{line[:40].hex()}"
        )
    return match


def challenge_line(challenge: bytes) -> bytes:
    return b"CHALLENGE %s\n" % _check_challenge(challenge).hex().encode()


def parse_challenge_line(line: bytes) -> bytes:
    return bytes.fromhex(_match(_CHALLENGE_LINE, line, "CHALLENGE")[1].decode())


def auth_line(
    name: str, incarnation: int, challenge_they_sent: bytes, secret: bytes, my_challenge: bytes
) -> bytes:
    tag = proof(secret, challenge_they_sent, name)
    check_incarnation(incarnation)
    _check_challenge(my_challenge)
    return f"AUTH {name} {incarnation} {tag.hex()} {my_challenge.hex()}\n".encode()


def parse_auth_line(line: bytes) -> tuple[str, int, bytes, bytes]:
    """``(name, incarnation, proof, their_challenge)``."""
    match = _match(_AUTH_LINE, line, "AUTH")
    incarnation = int(match[2])
    if incarnation > MAX_INCARNATION:
        raise AuthError("malformed AUTH line in the peer handshake: incarnation out of range")
    return (
        match[1].decode(),
        incarnation,
        bytes.fromhex(match[3].decode()),
        bytes.fromhex(match[4].decode()),
    )


def accept_line(name: str, their_challenge: bytes, secret: bytes) -> bytes:
    return f"ACCEPT {name} {proof(secret, their_challenge, name).hex()}\n".encode()


def parse_accept_line(line: bytes) -> tuple[str, bytes]:
    """``(name, proof)``."""
    match = _match(_ACCEPT_LINE, line, "ACCEPT")
    return match[1].decode(), bytes.fromhex(match[2].decode())
