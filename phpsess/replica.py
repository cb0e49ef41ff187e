"""Per-session replication state of one node, and the decisions of
CLUSTER.md §5-§7 that depend only on it.  Pure: the shell (phpsess.cluster)
does the talking and tells this module what happened.

Theory of operation: ``meta[sid]`` says whether this node is the session's
master or backup, who the other copy holder is, and the session's
``(epoch, version)``.  A node that makes a change to a session it masters
calls :meth:`Replicas.local_change` and sends the :class:`Repl` it returns to
the backup; the backup calls :meth:`Replicas.apply` with it, which accepts
only updates from the session's current master at the current or a newer
epoch, newer than what it has (CLUSTER.md §6).  :meth:`node_dead` performs a
takeover and lists the copies to send to new backups (§7).  Copies of
uncertain freshness (restored from disk, or held across our own stall) are
*unverified*: the shell checks them with their other holder first
(``phpsess.cluster`` asks the other holder).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from phpsess.placement import named_nodes

MASTER: Final = "master"
BACKUP: Final = "backup"
# The node a STALE refusal names for a session that was destroyed at its
# epoch: nobody masters it (CLUSTER.md §11.4, REPL rule 1).
NOBODY: Final = "-"
# The role a WHERE reply gives for a session deleted here (a tombstone, no
# copy): CLUSTER.md §11.4.
DELETED: Final = "deleted"
_HINTS_MAX: Final = 100_000


@attrs.define(slots=True)
class Meta:
    role: str  # MASTER or BACKUP
    master: str  # the master's name (ourselves when role is MASTER)
    backup: str | None  # the backup's name; None when the master is alone (degraded)
    epoch: int
    version: int


def encode_meta(m: Meta) -> bytes:
    """For the journal (CLUSTER.md §7): ``role epoch version master backup``."""
    return f"{m.role} {m.epoch} {m.version} {m.master} {m.backup or '-'}".encode("ascii")


def decode_meta(raw: bytes) -> Meta | None:
    """The inverse of :func:`encode_meta`; None for anything malformed."""
    try:
        role, epoch, version, master, backup = raw.decode("ascii").split(" ")
        meta = Meta(role, master, None if backup == "-" else backup, int(epoch), int(version))
    except (UnicodeDecodeError, ValueError):
        return None
    if role not in (MASTER, BACKUP) or meta.epoch < 0 or meta.version < 0:
        return None
    return meta


@attrs.frozen
class Repl:
    """A change (or a whole copy) for ``to``, the session's backup."""

    to: str
    sid: str
    master: str
    epoch: int
    version: int
    deleted: bool


class Verdict(enum.Enum):
    ACCEPT = "accept"  # applied: acknowledge
    DUPLICATE = "duplicate"  # old or repeated update: acknowledge, change nothing
    STALE = "stale"  # from a master that is no longer one: refuse


@attrs.frozen
class Applied:
    verdict: Verdict
    master: str = ""
    epoch: int = 0


class Replicas:
    def __init__(self, me: str, nodes: Iterable[str]) -> None:
        self.me = me
        self.nodes = frozenset(nodes)
        self.meta: dict[str, Meta] = {}
        # (epoch, version, master) of recently deleted sessions: a late update
        # must not bring a destroyed session back, and a session made again
        # carries on from there, so its new versions are newer than the
        # delete.
        self._tombstones: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        # Sessions a backup refused our copy of (STALE): the lowest epoch
        # they may start at here again (:meth:`stale`).
        self._floors: OrderedDict[str, int] = OrderedDict()
        self.unverified: set[str] = set()
        # Where other nodes told us a session's master is (NOT_MASTER, WHERE).
        self._hints: OrderedDict[str, str] = OrderedDict()

    # -- routing (CLUSTER.md §5)

    def route(self, sid: str, alive: Callable[[str], bool]) -> str:
        """The node that should serve ``sid`` now (``self.me``: serve here)."""
        m = self.meta.get(sid)
        if m is not None:
            if m.role == MASTER:
                return self.me
            if alive(m.master):
                return m.master
        hint = self._hints.get(sid)
        if hint is not None and alive(hint):
            return hint
        master, backup = named_nodes(sid, self.nodes)
        if alive(master):
            return master
        if alive(backup):
            return backup
        return self.me

    def hint(self, sid: str, node: str) -> None:
        self._hints[sid] = node
        self._hints.move_to_end(sid)
        if len(self._hints) > _HINTS_MAX:
            self._hints.popitem(last=False)

    def hinted(self, sid: str) -> str | None:
        """Where another node last told us ``sid``'s master is, if anywhere."""
        return self._hints.get(sid)

    def forget_hint(self, sid: str) -> None:
        self._hints.pop(sid, None)

    # -- the master's side (CLUSTER.md §6)

    def local_change(
        self, sid: str, deleted: bool, choose_backup: Callable[[], str | None]
    ) -> Repl | None:
        """We changed a session we serve; what to send to its backup."""
        m = self.meta.get(sid)
        if m is None or m.role != MASTER:
            # First change here: we are its master now.
            _, named_backup = named_nodes(sid, self.nodes)
            epoch, version, _ = self._tombstones.pop(sid, (0, 0, ""))
            floor = self._floors.pop(sid, 0)
            if floor > epoch:
                epoch, version = floor, 0
            if m is not None:
                epoch, version = max((epoch, version), (m.epoch, m.version))
            m = Meta(MASTER, self.me, None, max(1, epoch + (m is not None)), version)
            self.meta[sid] = m
            m.backup = named_backup if named_backup != self.me else None
            if m.backup is None:
                m.backup = choose_backup()
        elif m.backup is None and not deleted:
            # Alone since no peer could take a copy when the backup died
            # (one was suspect, say): one may now, and this write's REPL
            # carries the whole session.
            m.backup = choose_backup()
        self.unverified.discard(sid)
        self._hints.pop(sid, None)
        m.version += 1
        backup = m.backup
        if deleted:
            del self.meta[sid]
            self._bury(sid, m.epoch, m.version, self.me)
        if backup is None:
            return None  # degraded: the only copy
        return Repl(backup, sid, self.me, m.epoch, m.version, deleted)

    def backup_failed(self, sid: str, choose_backup: Callable[[], str | None]) -> Repl | None:
        """Our backup for ``sid`` is gone: a whole copy for a new one, if any."""
        m = self.meta.get(sid)
        if m is None or m.role != MASTER:
            return None
        m.backup = choose_backup()
        if m.backup is None:
            return None
        return Repl(m.backup, sid, self.me, m.epoch, m.version, False)

    def stale(self, sid: str, master: str, epoch: int = 0) -> None:
        """Our backup told us ``master`` is the session's master now, at
        ``epoch`` (or :data:`NOBODY`: it was destroyed at that epoch): we
        are not, and our copy is out of date.  Should the session start here
        again, it starts above that epoch: a copy at or below it would be
        refused again."""
        self.meta.pop(sid, None)
        self.unverified.discard(sid)
        if master and master not in (self.me, NOBODY):
            self.hint(sid, master)
        if epoch:
            self._floors[sid] = max(self._floors.get(sid, 0), epoch + 1)
            self._floors.move_to_end(sid)
            if len(self._floors) > _HINTS_MAX:
                self._floors.popitem(last=False)

    # -- the backup's side

    def apply(self, sid: str, master: str, epoch: int, version: int, deleted: bool) -> Applied:
        """Whether to apply a replicated change (CLUSTER.md §6)."""
        m = self.meta.get(sid)
        if m is None:
            buried = self._tombstones.get(sid)
            if buried is not None:
                buried_epoch, buried_version, deleter = buried
                if not deleted and (
                    epoch < buried_epoch or (epoch == buried_epoch and master != deleter)
                ):
                    # A copy from another master than the one that destroyed
                    # the session, at or below that epoch: its old master
                    # (restarted with the copy it journaled, or drained and
                    # restarted) making it again.  "OK" here acknowledged a
                    # write that nothing stored: one kill -9 of that master
                    # lost it.  Refused naming nobody, the master starts the
                    # session again above this epoch (CLUSTER.md §11.4).
                    return Applied(Verdict.STALE, NOBODY, buried_epoch)
                if (epoch, version) <= (buried_epoch, buried_version):
                    return Applied(Verdict.DUPLICATE)  # older than its deletion
        if m is not None and m.role == MASTER and master != self.me and epoch <= m.epoch:
            return Applied(Verdict.STALE, self.me, m.epoch)
        if m is not None and m.role == BACKUP:
            if epoch < m.epoch or (epoch == m.epoch and master != m.master):
                # At one epoch a session has one master: another node
                # claiming it (two created it at once, cut off from each
                # other) must not have its writes acknowledged by a copy
                # that keeps the first one's.
                return Applied(Verdict.STALE, m.master, m.epoch)
            # A delete at the version we hold is the master releasing our
            # copy (it moved the backup elsewhere, CLUSTER.md §8).
            if epoch == m.epoch and (version < m.version or (version == m.version and not deleted)):
                return Applied(Verdict.DUPLICATE)
        self.unverified.discard(sid)
        self._hints.pop(sid, None)
        if deleted:
            self.meta.pop(sid, None)
            self._bury(sid, epoch, version, master)
        else:
            self._tombstones.pop(sid, None)
            self.meta[sid] = Meta(BACKUP, master, self.me, epoch, version)
        return Applied(Verdict.ACCEPT)

    def _bury(self, sid: str, epoch: int, version: int, master: str) -> None:
        self._tombstones[sid] = (epoch, version, master)
        self._tombstones.move_to_end(sid)
        if len(self._tombstones) > _HINTS_MAX:
            self._tombstones.popitem(last=False)

    def restart_above(self, sid: str, epoch: int) -> bool:
        """Our backup refused our copy of ``sid``: it was destroyed at
        ``epoch`` (STALE naming :data:`NOBODY`) by a node that holds no copy.
        We master a live session of that ID (made again since, or a copy
        it was refused before, sent at a lower epoch): it moves above that
        epoch, if not there already.  Whether we master it (its copy is
        then sent again)."""
        m = self.meta.get(sid)
        if m is None or m.role != MASTER:
            return False
        m.epoch = max(m.epoch, epoch + 1)
        return True

    def handoff(self, sid: str, epoch: int, version: int) -> None:
        """A draining master handed ``sid`` to us (CLUSTER.md §8)."""
        self.meta[sid] = Meta(MASTER, self.me, None, epoch, version)
        self.unverified.discard(sid)
        self._hints.pop(sid, None)

    # -- failures (CLUSTER.md §7)

    def node_dead(self, dead: str, choose_backup: Callable[[], str | None]) -> list[Repl]:
        """Take over from ``dead``; the whole copies to send to new backups."""
        copies: list[Repl] = []
        for sid, m in self.meta.items():
            if m.role == BACKUP and m.master == dead:
                m.role = MASTER
                m.master = self.me
                m.epoch += 1
                m.backup = choose_backup()
            elif m.role == MASTER and m.backup == dead:
                m.backup = choose_backup()
            else:
                continue
            if m.backup is not None:
                copies.append(Repl(m.backup, sid, self.me, m.epoch, m.version, False))
        for sid in [s for s, node in self._hints.items() if node == dead]:
            del self._hints[sid]
        return copies

    def degraded_sessions(self) -> list[str]:
        """Sessions we master with no backup: to re-copy when a peer appears."""
        return [s for s, m in self.meta.items() if m.role == MASTER and m.backup is None]

    def drop_all(self) -> list[str]:
        """Peers declared us dead and took over: everything here is stale."""
        dropped = list(self.meta)
        self.meta.clear()
        self.unverified.clear()
        self._hints.clear()
        return dropped

    def mark_unverified(self, sids: Iterable[str]) -> None:
        self.unverified.update(sids)

    def deleted(self, sid: str) -> tuple[int, int] | None:
        """(epoch, version) at which ``sid`` was deleted here, if we hold no
        record of it but its tombstone."""
        if sid in self.meta:
            return None
        buried = self._tombstones.get(sid)
        return None if buried is None else buried[:2]

    def where(self, sid: str) -> tuple[str, int, int] | None:
        """What we hold of ``sid``: (role, epoch, version)."""
        m = self.meta.get(sid)
        if m is None:
            return None
        return m.role, m.epoch, m.version

    def adopt_restored(self, sid: str, journaled: Meta | None = None) -> None:
        """A copy restored from disk: its journaled metadata, or else the
        roles its ID names; it stays unverified until checked (CLUSTER.md §7)."""
        self.unverified.add(sid)
        if journaled is not None:
            if journaled.role == MASTER:
                journaled.master = self.me
            self.meta[sid] = journaled
            return
        master, backup = named_nodes(sid, self.nodes)
        if master == self.me:
            self.meta[sid] = Meta(MASTER, self.me, backup if backup != self.me else None, 0, 0)
        else:
            self.meta[sid] = Meta(BACKUP, master, self.me, 0, 0)
        self.unverified.add(sid)

    def verified(self, sid: str, epoch: int, version: int) -> None:
        m = self.meta.get(sid)
        if m is not None:
            m.epoch = max(m.epoch, epoch)
            m.version = max(m.version, version)
        self.unverified.discard(sid)

    def holding(self, sid: str) -> tuple[str, str | None] | None:
        """How this node holds ``sid``, for ``phpsess ls``: ``(MASTER,
        backup)`` (backup None: the only copy) or ``(BACKUP, master)``;
        None without a record."""
        m = self.meta.get(sid)
        if m is None:
            return None
        return (MASTER, m.backup) if m.role == MASTER else (BACKUP, m.master)

    def master_count(self) -> int:
        return sum(1 for m in self.meta.values() if m.role == MASTER)
