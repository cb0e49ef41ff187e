"""Where a session lives: IDs that name master and backup (CLUSTER.md §2).
Pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

NODE_NAME_RE: Final = re.compile(r"[A-Za-z0-9]{1,16}\Z")
# Room left for "-<master>-<backup>" within the 256 characters of an ID.
MAX_SUFFIX: Final = 2 * (1 + 16)


def check_node_name(name: str) -> str:
    if NODE_NAME_RE.match(name) is None:
        raise ValueError(f"node name {name!r} must be 1-16 characters from A-Z a-z 0-9")
    return name


def suffix(master: str, backup: str | None) -> str:
    """What create_sid appends: ``-<master>-<backup>`` (backup ``0``-less:
    a node alone names itself twice, so the form never changes)."""
    return f"-{master}-{backup or master}"


def named_nodes(sid: str, nodes: Iterable[str]) -> tuple[str, str]:
    """The (master, backup) an ID names, or, for an ID not made by a node of
    this cluster, the two nodes rendezvous hashing picks (CLUSTER.md §2)."""
    known = set(nodes)
    parts = sid.rsplit("-", 2)
    if len(parts) == 3 and parts[1] in known and parts[2] in known and parts[0]:
        return parts[1], parts[2]
    ranked = sorted(
        known, key=lambda n: hashlib.sha256(f"{n}\0{sid}".encode()).digest(), reverse=True
    )
    if len(ranked) == 1:
        return ranked[0], ranked[0]
    return ranked[0], ranked[1]
