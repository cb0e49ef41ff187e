"""Cluster membership and failure detection (CLUSTER.md §3).  Pure: time is an
argument, and sending, probing and logging are the shell's job.

Theory of operation: every configured peer is in one of five states::

    unknown --heartbeat--> alive --silent dead_after_s (tick)--> suspect
                           alive <--heartbeat / probe answered-- suspect
                                      suspect --probe failed--> dead
    dead --heartbeat from a *new* incarnation--> alive (rejoined)
    unknown --never heard for dead_after_s (tick)--> suspect --probe refused--> dead
    unknown, alive, suspect --leave announcement--> left
    left --heartbeat from a *new* incarnation--> alive (rejoined)

A peer is *unknown* until its first heartbeat.  :meth:`Membership.tick` turns
an alive peer that has been silent for ``dead_after_s`` into a *suspect* and
returns :class:`Suspect` once for that episode; the shell then probes the peer
over TCP and reports the outcome with :meth:`Membership.probe_result`.  A peer
that answers is slow, not dead: it is alive again and its silence timer
restarts.  One that does not is *dead*: :class:`Dead` is returned and its
incarnation goes into our dead list, which every heartbeat we send carries
(only the latest dead incarnation per node, so the list is bounded by the
number of peers).  Heartbeats from an incarnation we recorded dead are
ignored; one from any other incarnation of a dead peer is a rejoin.  A
heartbeat from a new incarnation of a peer we still think alive means it
restarted before we noticed: the old incarnation is declared dead and the new
one alive, in that order.

A peer never heard since we began watching it (our start, or a reload that
added it) is suspected the same way after ``dead_after_s``: a node restarted
while a peer's daemon is down must not wait for that peer forever (every
write to a session it backs up would fail).  It has no incarnation yet, so
a dead list cannot tell it that it was declared dead: only a *refused* probe
(nothing listens: no daemon there, and one started later is a new process
that holds no backup copies) declares it dead, with incarnation 0, which no
heartbeat's dead list carries.  Any other outcome (an answer, a timeout: it
may be paused or cut off, still holding copies) leaves it *unknown*, its
timer restarted.  Its first heartbeat, whatever the incarnation, makes it
alive (not a rejoin).

Our own stalls: ticks run at least every ``dead_after_s / 4`` (see
:meth:`Membership.next_deadline`).  A tick that comes more than
``dead_after_s / 2`` after the previous one means our own loop was paused
(``SIGSTOP``, a VM pause), so the peers' silence was ours: every silence timer
restarts at that tick, the tick reports nothing, and for the next
``dead_after_s`` a failed probe does not declare anyone dead (the probe's
timeout may have run out during the pause); the peer goes back to alive and
is suspected again if it stays silent.  A failed probe reported more than
``dead_after_s / 2`` after the last tick is handled the same way (the shell
may run the probe's timeout before the tick that notices the stall).

Witnesses (asymmetric partitions): every heartbeat also lists the peers its
sender heard a heartbeat from within ``witness_s``.  A probe that gets no
answer (it timed out) does not declare a peer dead while another alive peer,
in a heartbeat of its own from within ``witness_s``, says it still hears it:
the link between the two of us is broken, not the peer.  The peer goes back to
alive (:class:`Unreachable` is returned once per episode, for the log) and is
suspected and probed again ``witness_s`` later, until the witnesses stop
hearing it too.  Without this, a master cut off from its backup alone would be taken
over by the backup while it goes on serving: two masters.  A *refused*
probe (nothing listens on the peer's port: the daemon is gone) needs no
witness.

A heartbeat whose dead list holds our own current incarnation yields
:class:`SelfDeclaredDead` (once per sender incarnation), even when we ignore
everything else in it: after a partition heals, both sides may hold the other
dead, and each must still learn that the others took over.

Leaving (CLUSTER.md §3, §8): a node whose drain completed (it masters and
backs up nothing any more) calls :meth:`Membership.leave`; from then on its
heartbeats list its *own* current incarnation in their dead list (the
datagram's format is unchanged, so a peer of the previous version still
accepts them).  A peer that receives such a *leave announcement* records the
sender *left*, not dead: :class:`Left` is returned once, the incarnation is
finished (its later datagrams are ignored, as a dead one's), no probe is
made and no tick suspects it.  Like a dead peer it is no longer alive and
never chosen as a backup; a new incarnation of it rejoins.  A node killed
during its drain never announces anything: its peers find it dead.  A left
peer does not go into our dead list: the dead list says "declared dead",
and makes peers that still take the incarnation for alive suspect it.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Collection, Iterable
from typing import Final

import attrs

NODE_NAME_RE: Final = r"[A-Za-z0-9]{1,16}"
MAX_INCARNATION: Final = 2**63 - 1
MAX_COUNT: Final = 2**63 - 1  # sessions, sockets
# Bounds the dead list, and so a heartbeat datagram (peerauth.MAX_DATAGRAM_BYTES).
MAX_PEERS: Final = 28
MAX_DEAD_ENTRIES: Final = MAX_PEERS
# Dead incarnations remembered per peer (to ignore their late datagrams); only
# the latest is reported.
_DEAD_HISTORY: Final = 4

_NAME: Final = re.compile(NODE_NAME_RE)

UNKNOWN: Final = "unknown"
ALIVE: Final = "alive"
SUSPECT: Final = "suspect"
DEAD: Final = "dead"
LEFT: Final = "left"


def check_node_name(name: object) -> str:
    """``name`` if it is a valid node name (CLUSTER.md §1), else ValueError."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"invalid node name {name!r}: must match {NODE_NAME_RE}")
    return name


def check_incarnation(incarnation: object) -> int:
    if type(incarnation) is not int or not 1 <= incarnation <= MAX_INCARNATION:
        raise ValueError(f"invalid incarnation {incarnation!r}: must be 1 .. 2**63-1")
    return incarnation


def _name_validator(instance: object, attribute: object, value: str) -> None:
    check_node_name(value)


def _incarnation_validator(instance: object, attribute: object, value: int) -> None:
    check_incarnation(value)


def _count_validator(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"invalid {attribute.name} {value!r}: must be 0 .. 2**63-1")


def _bool_validator(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if type(value) is not bool:
        raise ValueError(f"invalid {attribute.name} {value!r}: must be a bool")


def _hears_validator(
    instance: object, attribute: object, value: tuple[str, ...]
) -> None:
    if type(value) is not tuple or len(value) > MAX_PEERS:
        raise ValueError(f"invalid hears list {value!r}: a tuple of at most {MAX_PEERS} names")
    for name in value:
        check_node_name(name)
    if list(value) != sorted(set(value)):
        raise ValueError("hears list must be sorted, each name once")


def _dead_validator(
    instance: object, attribute: object, value: tuple[tuple[str, int], ...]
) -> None:
    if type(value) is not tuple:
        raise ValueError(f"invalid dead list {value!r}: must be a tuple")
    if len(value) > MAX_DEAD_ENTRIES:
        raise ValueError(f"dead list has {len(value)} entries, at most {MAX_DEAD_ENTRIES}")
    previous = ""
    for entry in value:
        if type(entry) is not tuple or len(entry) != 2:
            raise ValueError(f"invalid dead list entry {entry!r}: must be (node, incarnation)")
        name, incarnation = entry
        check_node_name(name)
        check_incarnation(incarnation)
        if name <= previous:
            raise ValueError("dead list must be sorted by node, one entry per node")
        previous = name


@attrs.frozen
class Heartbeat:
    """What a node tells every peer every ``heartbeat_s`` (CLUSTER.md §3)."""

    name: str = attrs.field(validator=_name_validator)
    incarnation: int = attrs.field(validator=_incarnation_validator)
    sessions: int = attrs.field(validator=_count_validator)
    sockets: int = attrs.field(validator=_count_validator)
    draining: bool = attrs.field(validator=_bool_validator)
    # (node, incarnation) this sender has declared dead, sorted by node
    dead: tuple[tuple[str, int], ...] = attrs.field(validator=_dead_validator)
    # the peers this sender heard within its witness time, sorted
    hears: tuple[str, ...] = attrs.field(default=(), validator=_hears_validator)

    @property
    def leaving(self) -> bool:
        """A leave announcement: the sender lists its own incarnation as
        dead, saying it has drained and holds nothing (CLUSTER.md §3, §8)."""
        return (self.name, self.incarnation) in self.dead


@attrs.frozen
class Alive:
    """First heartbeat of a peer, or (``rejoined``) a new incarnation of one
    that was dead, left or restarted."""

    name: str
    incarnation: int
    rejoined: bool


@attrs.frozen
class Suspect:
    """``name`` was silent for ``dead_after_s``: probe it, then call
    :meth:`Membership.probe_result`."""

    name: str


@attrs.frozen
class Dead:
    """Incarnation ``incarnation`` of ``name`` is declared dead."""

    name: str
    incarnation: int


@attrs.frozen
class Left:
    """Incarnation ``incarnation`` of ``name`` announced that it left after a
    completed drain: it holds no copy of anything (not a death)."""

    name: str
    incarnation: int


@attrs.frozen
class Unreachable:
    """``name`` did not answer our probe, but ``witness`` still hears it: not
    declared dead (see the module doc)."""

    name: str
    witness: str


@attrs.frozen
class SelfDeclaredDead:
    """Peer ``by`` has declared our current incarnation dead (CLUSTER.md §7)."""

    by: str


Event = Alive | Suspect | Dead | Left | Unreachable | SelfDeclaredDead


@attrs.define(slots=True)
class _Peer:
    state: str = UNKNOWN
    incarnation: int = 0
    last_heard: float = 0.0  # silence timer: last heartbeat, answered probe or stall
    sessions: int = 0
    sockets: int = 0
    draining: bool = False
    dead_incarnations: deque[int] = attrs.field(factory=lambda: deque(maxlen=_DEAD_HISTORY))
    told_self_dead: int = 0  # the sender incarnation we reported SelfDeclaredDead for
    heard_at: float = -math.inf  # its last heartbeat (not probes or stalls)
    hears: tuple[str, ...] = ()  # whom it heard, per that heartbeat
    witnessed: bool = False  # Unreachable reported for this episode


def _is_alive(peer: _Peer) -> bool:
    return peer.state == ALIVE or (peer.state == SUSPECT and peer.incarnation != 0)


class Membership:
    def __init__(
        self,
        me: str,
        peers: Iterable[str],
        incarnation: int,
        now: float,
        *,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 3.0,
    ) -> None:
        self._me = check_node_name(me)
        self._incarnation = check_incarnation(incarnation)
        if not heartbeat_s > 0 or not dead_after_s > 0:
            raise ValueError("heartbeat_s and dead_after_s must be positive")
        # The configured list is the same on every node, so it may name us.
        names = {check_node_name(name) for name in peers} - {me}
        if len(names) > MAX_PEERS:
            raise ValueError(f"{len(names)} peers configured, at most {MAX_PEERS}")
        # A silence timer for every peer, the never heard included.
        self._peers = {name: _Peer(last_heard=now) for name in sorted(names)}
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        # A witness must have heard the peer, and we the witness, this recently:
        # two heartbeats and a half (one lost datagram is no evidence).
        self.witness_s = min(dead_after_s, 2.5 * heartbeat_s)
        self._dead: dict[str, int] = {}  # the latest incarnation we declared dead, per node
        self._last_tick = now
        self._grace_until = now  # failed probes do not kill before this (after a stall)
        self._next_heartbeat = now
        self._sessions = 0
        self._sockets = 0
        self._draining = False
        self._left = False  # leave() called: our heartbeats announce it
        self.stalls_total = 0

    # -- what we send

    @property
    def me(self) -> str:
        return self._me

    @property
    def incarnation(self) -> int:
        return self._incarnation

    def set_load(self, sessions: int, sockets: int, draining: bool) -> None:
        # Validate now rather than in the next heartbeat().
        Heartbeat(self._me, self._incarnation, sessions, sockets, draining, ())
        self._sessions = sessions
        self._sockets = sockets
        self._draining = draining

    def leave(self) -> None:
        """Our drain completed (we master and back up nothing): every
        heartbeat from now on announces that this incarnation left."""
        self._left = True
        self._draining = True

    @property
    def has_left(self) -> bool:
        return self._left

    def heartbeat(self, now: float | None = None) -> Heartbeat:
        """Our heartbeat; ``now`` says whom we still hear (none without it)."""
        dead = self._dead
        if self._left:
            others = sorted(dead.items())
            # Within the bound an older peer checks too: with every peer in
            # the dead list (it has no room for us), one of them is left
            # out of our last heartbeats, for the announcement.
            del others[MAX_DEAD_ENTRIES - 1:]
            dead = dict(others)
            dead[self._me] = self._incarnation
        return Heartbeat(
            name=self._me,
            incarnation=self._incarnation,
            sessions=self._sessions,
            sockets=self._sockets,
            draining=self._draining,
            dead=tuple(sorted(dead.items())),
            hears=tuple(
                name
                for name, peer in self._peers.items()
                if now is not None
                and peer.state in (ALIVE, SUSPECT)
                and now - peer.heard_at <= self.witness_s
            ),
        )

    def heartbeat_due(self, now: float) -> bool:
        return now >= self._next_heartbeat

    def sent_heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.heartbeat_s

    # -- what we learn

    def receive(self, hb: Heartbeat, now: float) -> list[Event]:
        """Take in a (verified) heartbeat.  One from a name that is not a
        configured peer (or is our own) is ignored: the shell logs it."""
        peer = self._peers.get(hb.name)
        if peer is None:
            return []
        events: list[Event] = []
        if (self._me, self._incarnation) in hb.dead and peer.told_self_dead != hb.incarnation:
            peer.told_self_dead = hb.incarnation
            events.append(SelfDeclaredDead(by=hb.name))
        if hb.incarnation in peer.dead_incarnations:
            return events  # a dead or left incarnation (or its late datagrams)
        if hb.leaving:
            if peer.state in (ALIVE, SUSPECT) and peer.incarnation not in (0, hb.incarnation):
                # It restarted before we noticed, then left: the old
                # incarnation is gone (it may have held copies).
                events.append(self._declare_dead(hb.name, peer))
            # Finished, like a dead incarnation: its repeats and late
            # datagrams are ignored, a new incarnation rejoins.
            peer.state = LEFT
            peer.incarnation = hb.incarnation
            peer.dead_incarnations.append(hb.incarnation)
            peer.last_heard = peer.heard_at = now
            peer.hears = ()
            peer.witnessed = False
            peer.sessions = hb.sessions
            peer.sockets = hb.sockets
            peer.draining = hb.draining
            events.append(Left(hb.name, hb.incarnation))
            return events
        if peer.state == UNKNOWN or (peer.state in (SUSPECT, DEAD) and not peer.incarnation):
            # Its first heartbeat (also after a failed probe declared it dead
            # unheard: it joins late rather than rejoins).
            events.append(Alive(hb.name, hb.incarnation, rejoined=False))
        elif peer.state in (DEAD, LEFT):
            events.append(Alive(hb.name, hb.incarnation, rejoined=True))
        elif hb.incarnation != peer.incarnation:
            # It restarted before we noticed: the old incarnation is gone.
            events.append(self._declare_dead(hb.name, peer))
            events.append(Alive(hb.name, hb.incarnation, rejoined=True))
        peer.state = ALIVE
        peer.incarnation = hb.incarnation
        peer.last_heard = peer.heard_at = now
        peer.hears = hb.hears
        peer.witnessed = False
        peer.sessions = hb.sessions
        peer.sockets = hb.sockets
        peer.draining = hb.draining
        # A peer declared a node dead that we still think alive: evidence, so
        # suspect it now (our own probe decides).  The cluster converges on
        # a death within one heartbeat instead of one detection time each.
        for name, incarnation in hb.dead:
            other = self._peers.get(name)
            if other is not None and other.state == ALIVE and other.incarnation == incarnation:
                other.state = SUSPECT
                events.append(Suspect(name))
        return events

    def connected(self, name: str, incarnation: int, now: float) -> list[Event]:
        """An authenticated TCP connection from incarnation ``incarnation`` of
        ``name``: a new incarnation of a known peer is alive from now, as its
        first heartbeat would make it (CLUSTER.md §3).  If we still take an
        earlier incarnation of it for alive, that one is gone (it restarted
        before we noticed, and its heartbeats may not have reached us yet):
        it is declared dead first, before we answer anything on the
        connection, so that the restarted node verifying its copies learns
        of our takeover (§7).  A dead or left peer rejoins: what it sends on
        this connection (the copy of a session it masters, §6) must not be
        taken for a dead master's, which this node would take over, a
        second master of it (a node resumed from a pause learns that it was
        declared dead, and masters new sessions at once)."""
        peer = self._peers.get(name)
        if (
            peer is None
            or not peer.incarnation  # never heard: its heartbeat will say
            or incarnation == peer.incarnation
            or incarnation in peer.dead_incarnations
        ):
            return []
        events: list[Event] = []
        if peer.state in (ALIVE, SUSPECT):
            events.append(self._declare_dead(name, peer))
        events.append(Alive(name, incarnation, rejoined=True))
        peer.state = ALIVE
        peer.incarnation = incarnation
        peer.last_heard = now  # as an answered probe: not a heartbeat (heard_at)
        peer.hears = ()
        peer.witnessed = False
        # Its load stays as last heard until its heartbeat says (a zero would
        # make it every takeover's choice of backup); a new incarnation is
        # not draining.
        peer.draining = False
        return events

    def tick(self, now: float) -> list[Event]:
        """Run at :meth:`next_deadline` (or later): suspect silent peers."""
        if self._stalled(now):
            return []
        self._last_tick = now
        events: list[Event] = []
        for name, peer in self._peers.items():
            if peer.state in (ALIVE, UNKNOWN) and now - peer.last_heard >= self.dead_after_s:
                peer.state = SUSPECT
                events.append(Suspect(name))
        return events

    def set_peers(self, peers: Iterable[str]) -> tuple[list[str], list[str]]:
        """A reloaded configuration (SIGHUP): start watching new peers
        (unknown until they speak, or until a refused probe declares them
        dead) and stop watching removed ones.  Returns
        (added, removed)."""
        names = {check_node_name(name) for name in peers} - {self._me}
        if len(names) > MAX_PEERS:
            raise ValueError(f"{len(names)} peers configured, at most {MAX_PEERS}")
        added = sorted(names - set(self._peers))
        removed = sorted(set(self._peers) - names)
        for name in removed:
            del self._peers[name]
            self._dead.pop(name, None)
        for name in added:
            self._peers[name] = _Peer(last_heard=self._last_tick)
        return added, removed

    def reincarnate(self, incarnation: int) -> None:
        """Peers declared this incarnation dead and took over what we held:
        go on as a new one, so that they take us back (a rejoin)."""
        self._incarnation = check_incarnation(incarnation)
        self._left = False  # the new incarnation has announced nothing

    def suspect(self, name: str) -> list[Event]:
        """Direct evidence that ``name`` may be gone (a refused connection, a
        request that timed out): suspect it now rather than after
        ``dead_after_s`` of silence.  The probe still decides."""
        peer = self._peers.get(name)
        if peer is None or peer.state != ALIVE:
            return []
        peer.state = SUSPECT
        return [Suspect(name)]

    def probe_result(
        self, name: str, answered: bool, now: float, *, refused: bool = False
    ) -> list[Event]:
        """The outcome of probing a suspect (``refused``: the connection was
        refused, nothing listens there).  Ignored unless ``name`` is still
        suspect (a heartbeat may have come in meanwhile)."""
        peer = self._peers.get(name)
        if peer is None or peer.state != SUSPECT:
            return []
        if not peer.incarnation and not refused:
            # Never heard, and not proven gone: it may be alive but paused or
            # cut off from us, holding copies of what we master; declared
            # dead, it could never learn it (no incarnation for the dead
            # list) and would take those sessions over when it comes back,
            # over the writes we took meanwhile.  It stays unknown.
            peer.state = UNKNOWN
            peer.last_heard = now
            return []
        if not answered and not self._stalled(now) and now >= self._grace_until:
            witness = None if refused else self._witness(name, now)
            if witness is None:
                return [self._declare_dead(name, peer)]
            # Cut off from us only: alive, and suspected again in witness_s.
            peer.state = ALIVE
            peer.last_heard = max(peer.last_heard, now - self.dead_after_s + self.witness_s)
            if peer.witnessed:
                return []
            peer.witnessed = True
            return [Unreachable(name, witness)]
        # Answered: slow, not dead.  Or failed while our own stall may be to
        # blame.  Never heard: unknown until its first heartbeat.
        peer.state = ALIVE if peer.incarnation else UNKNOWN
        peer.last_heard = now
        return []

    def next_deadline(self) -> float:
        """When :meth:`tick` must next run (and a heartbeat may be due)."""
        deadline = min(self._next_heartbeat, self._last_tick + self.dead_after_s / 4)
        for peer in self._peers.values():
            if peer.state in (ALIVE, UNKNOWN):
                deadline = min(deadline, peer.last_heard + self.dead_after_s)
        return deadline

    # -- queries

    def peers(self) -> list[str]:
        """Every configured peer (not us), sorted."""
        return list(self._peers)

    def state(self, name: str) -> str:
        """``unknown`` (never heard, or not a configured peer), ``alive``,
        ``suspect``, ``dead`` or ``left``.  We are always ``alive``."""
        if name == self._me:
            return ALIVE
        peer = self._peers.get(name)
        return UNKNOWN if peer is None else peer.state

    def gone(self, name: str) -> bool:
        """``name`` is dead or left: it holds nothing, and will not answer."""
        return self.state(name) in (DEAD, LEFT)

    def incarnation_of(self, name: str) -> int | None:
        """The incarnation of ``name`` we last heard from, if any."""
        if name == self._me:
            return self._incarnation
        peer = self._peers.get(name)
        return None if peer is None or not peer.incarnation else peer.incarnation

    def alive_peers(self) -> list[str]:
        """Peers alive or suspect (a suspect is not dead yet; one never
        heard is not alive yet), sorted."""
        return [name for name, peer in self._peers.items() if _is_alive(peer)]

    def is_alive(self, name: str) -> bool:
        if name == self._me:
            return True
        peer = self._peers.get(name)
        return peer is not None and _is_alive(peer)

    def load(self, name: str) -> tuple[int, int, bool]:
        """Last reported ``(sessions, sockets, draining)``; zeros if never heard."""
        if name == self._me:
            return (self._sessions, self._sockets, self._draining)
        peer = self._peers.get(name)
        if peer is None:
            return (0, 0, False)
        return (peer.sessions, peer.sockets, peer.draining)

    def choose_backup(self, exclude: Collection[str] = ()) -> str | None:
        """The alive (not suspect), non-draining peer with the fewest sessions
        plus sockets, ties by name (CLUSTER.md §2); None if there is none."""
        candidates = [
            (peer.sessions + peer.sockets, name)
            for name, peer in self._peers.items()
            if peer.state == ALIVE and not peer.draining and name not in exclude
        ]
        return min(candidates)[1] if candidates else None

    @property
    def degraded(self) -> bool:
        """No peer can take a copy (CLUSTER.md §6)."""
        return self.choose_backup() is None

    def dead_list(self) -> dict[str, int]:
        """The latest incarnation we declared dead, per node."""
        return dict(self._dead)

    # -- internals

    def _stalled(self, now: float) -> bool:
        """Detect a pause of our own loop; if so restart every silence timer."""
        if now - self._last_tick <= self.dead_after_s / 2:
            return False
        self.stalls_total += 1
        self._last_tick = now
        self._grace_until = now + self.dead_after_s
        for peer in self._peers.values():
            peer.last_heard = now
        return True

    def _witness(self, name: str, now: float) -> str | None:
        """An alive peer that recently told us it hears ``name``, if any."""
        for other, peer in self._peers.items():
            if (
                other != name
                and peer.state == ALIVE
                and now - peer.heard_at <= self.witness_s
                and name in peer.hears
            ):
                return other
        return None

    def _declare_dead(self, name: str, peer: _Peer) -> Dead:
        peer.state = DEAD
        if peer.incarnation:  # a peer never heard has none to report
            peer.dead_incarnations.append(peer.incarnation)
            self._dead[name] = peer.incarnation
        return Dead(name, peer.incarnation)
