"""The ``phpsess`` command.  ``main(argv) -> int`` so tests can call it."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import pwd
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

from phpsess import admin, logs
from phpsess import config as config_file
from phpsess.addresses import (
    DEFAULT_LISTEN,
    Address,
    AddressError,
    TcpAddress,
    UnixAddress,
    parse_address,
    parse_tcp_address,
)
from phpsess.argtypes import whole_number
from phpsess.engine import VERSION, Limits

if TYPE_CHECKING:
    from phpsess.cluster import ClusterConfig
    from phpsess.server import ServerConfig
from phpsess.persist import (
    DEFAULT_DATA_DIR,
    FSYNC_POLICIES,
    MIN_COMPACT_BYTES,
    JournalFailed,
    PersistConfig,
)
from phpsess.sqlstore import DEFAULT_ENGINE, DEFAULT_POOL_SIZE, DEFAULT_TABLE, SqlConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad flags or configuration
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

log = logging.getLogger("phpsess")


_positive_int = whole_number(1)
# SqlConfig's least pool: one connection may be pinned by a lock holder.
_MIN_POOL_SIZE: Final = 2


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phpsess", description="Session storage for PHP web farms."
    )
    parser.add_argument("--version", action="version", version=f"phpsess {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--config", metavar="PATH",
        help=f"read settings from this TOML file (e.g. {config_file.DEFAULT_CONFIG}); "
        "flags given on the command line win",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help=f"unix:/abs/path.sock or tcp:HOST:PORT; repeatable (default: {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--socket-mode", type=_mode, default=0o660, metavar="OCTAL",
        help="permissions of unix sockets (default: 0660)",
    )
    serve.add_argument(
        "--max-session-bytes", type=_positive_int, default=Limits().max_session_bytes,
        metavar="N", help="largest session accepted (default: 16 MiB)",
    )
    serve.add_argument(
        "--max-connections", type=_positive_int, default=4096, metavar="N",
        help="connections beyond this are refused with BUSY (default: 4096)",
    )
    serve.add_argument(
        "--max-incoming-bytes", type=_positive_int, default=256 * 1024 * 1024, metavar="N",
        help="bytes of requests still arriving, all clients together; a client whose "
        "request would go past it gets BUSY (default: 256 MiB)",
    )
    serve.add_argument(
        "--max-outgoing-bytes", type=_positive_int, default=256 * 1024 * 1024, metavar="N",
        help="bytes held for clients that do not read their replies, all clients together; "
        "past it, those that have read nothing longest (half a second at least) are "
        "closed (default: 256 MiB)",
    )
    serve.add_argument(
        "--idle-timeout-s", type=_seconds, default=300.0, metavar="S",
        help="close a connection that holds no lock and is silent this long (default: 300)",
    )
    serve.add_argument(
        "--lock-wait-s", type=_seconds, default=Limits().lock_wait_s, metavar="S",
        help="default time a request waits for a session lock (default: 30)",
    )
    serve.add_argument(
        "--max-locks-per-connection", type=_positive_int,
        default=Limits().max_locks_per_connection, metavar="N",
        help="session locks one connection may hold at once; PHP needs 1, 2 while "
        "regenerating an ID; more gets TOO_MANY_LOCKS (default: 64)",
    )
    serve.add_argument(
        "--lock-lease-s", type=_seconds, default=Limits().lock_lease_s, metavar="S",
        help="a lock held longer than this is revoked once another request asks for it "
        "(SQL storage: when it runs out) (default: 300)",
    )
    serve.add_argument(
        "--shutdown-timeout-s", type=_seconds, default=10.0, metavar="S",
        help="on SIGTERM, how long requests holding locks may take to finish (default: 10)",
    )
    serve.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
        help=f"where sessions are journaled and snapshotted (default: {DEFAULT_DATA_DIR})",
    )
    serve.add_argument(
        "--fsync", choices=FSYNC_POLICIES, default="interval",
        help="always: acknowledge after fsync; interval: at once, write every 10 ms and "
        "fsync every --fsync-interval-ms (a crash loses at most two intervals); never: "
        "at once, no fsync (default: interval)",
    )
    serve.add_argument(
        "--fsync-interval-ms", type=_positive_int, default=200, metavar="MS",
        help="with --fsync interval, fsync at most this often (default: 200)",
    )
    serve.add_argument(
        "--compact-min-bytes", type=_positive_int, default=MIN_COMPACT_BYTES, metavar="N",
        help="compact the journal into a snapshot once it is larger than the live data "
        "and than N bytes (default: 8 MiB)",
    )
    serve.add_argument(
        "--memory-only", action="store_true",
        help="keep sessions in memory only: a restart loses them all",
    )
    sql = serve.add_argument_group("SQL storage (README: SQL storage)")
    sql.add_argument(
        "--storage", metavar="URL",
        help="keep sessions in a MySQL / MariaDB / MySQL Cluster table shared by every "
        "daemon: mysql://USER@HOST:PORT/DB[?socket=/path.sock] (default: memory + journal)",
    )
    sql.add_argument(
        "--storage-password-file", metavar="PATH",
        help="file holding the database password (never put it on the command line)",
    )
    sql.add_argument(
        "--storage-table", default=DEFAULT_TABLE, metavar="NAME",
        help=f"session table, created if missing (default: {DEFAULT_TABLE})",
    )
    sql.add_argument(
        "--storage-engine", default=DEFAULT_ENGINE, metavar="ENGINE",
        help=f"engine of a table created here: InnoDB, or ndbcluster for MySQL Cluster "
        f"(default: {DEFAULT_ENGINE})",
    )
    sql.add_argument(
        "--storage-pool-size", type=whole_number(_MIN_POOL_SIZE), default=DEFAULT_POOL_SIZE,
        metavar="N",
        help=f"database connections per daemon, lock waiters included "
        f"(default: {DEFAULT_POOL_SIZE})",
    )
    cluster = serve.add_argument_group("cluster (CLUSTER.md)")
    cluster.add_argument("--node", metavar="NAME", help="this daemon's name in the cluster")
    cluster.add_argument(
        "--cluster-listen", metavar="HOST:PORT",
        help="TCP (session data) and UDP (heartbeats) address for peers",
    )
    cluster.add_argument(
        "--peer", action="append", default=[], metavar="NAME=HOST:PORT",
        help="another daemon of the cluster; repeatable",
    )
    cluster.add_argument(
        "--cluster-secret-file", metavar="PATH",
        help="file holding the shared secret (at least 16 bytes) that authenticates peers",
    )
    cluster.add_argument(
        "--heartbeat-ms", type=_positive_int, default=500, metavar="MS",
        help="send every peer a heartbeat this often; must be less than --dead-after-ms "
        "(default: 500)",
    )
    cluster.add_argument(
        "--dead-after-ms", type=_positive_int, default=3000, metavar="MS",
        help="a peer silent this long is probed, then declared dead (default: 3000)",
    )
    cluster.add_argument(
        "--probe-ms", type=_positive_int, default=500, metavar="MS",
        help="how long the direct TCP probe of a silent peer waits for its answer before "
        "the peer may be declared dead; must be less than --dead-after-ms (default: 500)",
    )
    cluster.add_argument(
        "--drain-timeout-s", type=_seconds, default=30.0, metavar="S",
        help="on SIGTERM, how long handing sessions to other daemons may take (default: 30)",
    )
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; "
        "keep it on loopback)",
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info",
        help="the least important lines logged (default: info)",
    )

    check = commands.add_parser(
        "check-config", help="validate a configuration file without starting the daemon",
        description="Read a configuration file as serve --config would, with any serve "
        "flags given after it (flags win over the file), and say 'PATH: ok' (exit 0), or "
        "what is wrong with its file and line (exit 2). Warnings (a secret others may "
        "read, a cluster node with no peers) go to stderr and do not fail the check.",
    )
    check.add_argument("config", metavar="PATH")
    check.add_argument(
        "--user", metavar="NAME",
        help="run as root, warn about the files the daemon reads (this configuration "
        "file, the cluster secret, the password file) and its data directory when user "
        f"NAME cannot read them (or write it) (default: {DAEMON_USER}, the unit's User=, "
        "if that user exists)",
    )
    for action in serve._actions:
        if action.dest not in ("help", "config"):
            check._add_action(action)

    repair = commands.add_parser(
        "repair", help="rewrite a damaged data directory keeping every intact record",
        description="Rewrite a data directory that the daemon refuses to start from "
        "(a damaged journal or snapshot), keeping every intact record; the originals "
        "are kept in its damaged-<time>/ directory. Stop the daemon first, and run "
        "this as its user (runuser -u phpsess -- phpsess repair); run as root, what it "
        "writes gets the owner and mode of the files it replaces.",
    )
    repair.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                        help=f"the daemon's data directory (default: {DEFAULT_DATA_DIR})")
    admin.add_commands(commands)
    return parser


def _cluster_config(args: argparse.Namespace) -> ClusterConfig:
    from phpsess.cluster import ClusterConfig, check_listen, parse_peer
    from phpsess.peerauth import check_secret
    from phpsess.placement import check_node_name

    needed = ("node", "cluster_listen", "cluster_secret_file")
    missing = [dest for dest in needed if not getattr(args, dest)]
    if missing:
        # About the settings that made it a cluster: their file and line.
        raise UsageError(
            f"a cluster needs {', '.join(_named(dest) for dest in missing)} as well",
            *(dest for dest in (*needed, "peer") if getattr(args, dest)),
        )
    if not args.heartbeat_ms < args.dead_after_ms:
        # Every peer would fall silent for dead_after_ms between two of its
        # heartbeats: suspected and probed all the time, and no witness
        # could vouch for it (membership: Witnesses).
        raise UsageError(
            f"{_named('heartbeat_ms')}, {args.heartbeat_ms}, must be less than "
            f"{_named('dead_after_ms')}, {args.dead_after_ms}: a peer is suspected dead "
            "after dead_after_ms without a heartbeat (defaults: 500 and 3000)",
            "heartbeat_ms", "dead_after_ms",
        )
    if not args.probe_ms < args.dead_after_ms:
        raise UsageError(
            f"{_named('probe_ms')}, {args.probe_ms}, must be less than "
            f"{_named('dead_after_ms')}, {args.dead_after_ms} (defaults: 500 and 3000)",
            "probe_ms", "dead_after_ms",
        )
    with _about("node"):
        check_node_name(args.node)
    listen = _tcp(args.cluster_listen, "cluster_listen")
    try:
        check_listen(listen)
    except ValueError as exc:
        raise UsageError(f"{_named('cluster_listen')}, {args.cluster_listen}: {exc}",
                         "cluster_listen") from None
    try:
        with open(args.cluster_secret_file, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise UsageError(
            f"cannot read the cluster secret file {args.cluster_secret_file}, "
            f"{_named('cluster_secret_file')}: {exc.strerror or exc}",
            "cluster_secret_file",
        ) from exc
    with _about("cluster_secret_file"):
        check_secret(secret)
    # Whoever holds it can act as a peer: list, read, write and drain every
    # session (DEPLOYMENT.md §4).
    _warn_if_readable(
        args.cluster_secret_file, "the cluster secret (whoever has it can act as a peer)",
        "chmod 0400 it (owned by the daemon's user)",
    )
    with _about("peer"):
        peers = tuple(parse_peer(peer) for peer in args.peer)
        if not peers:
            _warn(
                "a cluster node with no peers ([cluster.peers] or --peer) keeps a single "
                "copy of every session: name the other nodes"
            )
        return ClusterConfig(
            node=args.node,
            listen=listen,
            peers=peers,
            secret=secret,
            heartbeat_s=args.heartbeat_ms / 1000,
            dead_after_s=args.dead_after_ms / 1000,
            probe_s=args.probe_ms / 1000,
            drain_timeout_s=args.drain_timeout_s,
        )


class UsageError(Exception):
    """Bad flags or configuration: exit status 2.  ``dests`` are the settings
    it is about (argparse destinations), so that :func:`_configure` can name
    the file and line of one the configuration file gave."""

    def __init__(self, message: str, *dests: str) -> None:
        super().__init__(message)
        self.dests = dests


@contextlib.contextmanager
def _about(*dests: str) -> Iterator[None]:
    """A ValueError or AddressError in the block as a UsageError about ``dests``."""
    try:
        yield
    except (AddressError, ValueError) as exc:
        raise UsageError(str(exc), *dests) from exc


def _tcp(text: str, dest: str) -> TcpAddress:
    try:
        return parse_tcp_address(text)
    except AddressError as exc:
        raise UsageError(f"{_named(dest)}: {exc}", dest) from exc


# argparse destination -> (table, key) in the configuration file.
_FILE_KEYS: Final = {
    dest: (table, key)
    for table, keys in config_file.SCHEMA.items()
    for key, (dest, _check, _expected) in keys.items()
}
_FILE_ONLY: Final = frozenset({"storage_password"})  # no flag: never on a command line


def _named(dest: str) -> str:
    """A setting as the config file and the command line both name it:
    ``log_level (--log-level)``, ``[storage] pool_size (--storage-pool-size)``."""
    table, key = _FILE_KEYS.get(dest, ("", dest))
    name = key if key == dest else f"[{table}] {key}"
    if dest in _FILE_ONLY:
        return name
    return f"{name} (--{dest.replace('_', '-')})"


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The daemon's configuration from flags (already merged with the file);
    UsageError says what is wrong."""
    from phpsess.server import ServerConfig

    if args.log_level not in LOG_LEVELS:
        raise UsageError(
            f"{_named('log_level')} must be one of {', '.join(LOG_LEVELS)}", "log_level"
        )
    if args.fsync not in FSYNC_POLICIES:
        raise UsageError(
            f"{_named('fsync')} must be one of {', '.join(FSYNC_POLICIES)}", "fsync"
        )
    for name in ("max_session_bytes", "max_connections", "max_incoming_bytes",
                 "max_outgoing_bytes", "fsync_interval_ms", "compact_min_bytes", "heartbeat_ms",
                 "dead_after_ms", "probe_ms", "max_locks_per_connection"):
        if getattr(args, name) < 1:
            raise UsageError(f"{_named(name)} must be at least 1", name)
    for name in ("lock_wait_s", "shutdown_timeout_s", "drain_timeout_s"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"{_named(name)} must not be negative", name)
    if args.max_incoming_bytes < args.max_session_bytes:
        raise UsageError(
            f"{_named('max_incoming_bytes')} must be at least {_named('max_session_bytes')}, "
            f"{args.max_session_bytes}: a request of the largest session must fit in it",
            "max_incoming_bytes", "max_session_bytes",
        )
    # 0 would close every connection as soon as it is idle, sweeping for
    # them without a pause (a core at 100 %).
    if not args.idle_timeout_s > 0:
        raise UsageError(
            f"{_named('idle_timeout_s')} must be positive: how long a silent connection "
            "holding no lock is kept open", "idle_timeout_s",
        )
    if not args.lock_lease_s > 0:
        raise UsageError(f"{_named('lock_lease_s')} must be positive", "lock_lease_s")
    if not 0 <= args.socket_mode <= 0o777:
        raise UsageError(
            f"{_named('socket_mode')} must be a permission mode like 0660", "socket_mode"
        )
    listen = _listen_addresses(args.listen)
    try:
        limits = Limits(
            max_session_bytes=args.max_session_bytes,
            lock_wait_s=args.lock_wait_s,
            lock_lease_s=args.lock_lease_s,
            max_locks_per_connection=args.max_locks_per_connection,
        )
        persist = None
        if not args.memory_only:
            persist = PersistConfig(
                data_dir=os.path.abspath(args.data_dir),
                fsync=args.fsync,
                fsync_interval_s=args.fsync_interval_ms / 1000,
                min_compact_bytes=args.compact_min_bytes,
            )
        cluster_dests = [
            dest for dest in ("node", "peer", "cluster_listen", "cluster_secret_file")
            if getattr(args, dest)
        ]
        clustered = bool(cluster_dests)
        if clustered and getattr(args, "storage", None):
            raise UsageError(
                f"{_named('storage')} and a cluster ({', '.join(map(_named, cluster_dests))}) "
                "are alternatives: a shared SQL table needs no peer cluster; choose one "
                "(README: Choosing a storage)", "storage", *cluster_dests,
            )
        cluster = None
        if clustered:
            cluster = _cluster_config(args)
        storage = _storage_config(args)
    except (AddressError, ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    if storage is not None:
        if args.memory_only:
            raise UsageError(
                f"{_named('storage')} and {_named('memory_only')} are alternatives; "
                "choose one", "storage", "memory_only",
            )
        persist = None  # the database keeps the sessions
    metrics_listen = None
    if args.metrics_listen:
        metrics_listen = _tcp(args.metrics_listen, "metrics_listen")
    return ServerConfig(
        listen=listen,
        limits=limits,
        socket_mode=args.socket_mode,
        max_connections=args.max_connections,
        max_incoming_bytes=args.max_incoming_bytes,
        max_outgoing_bytes=args.max_outgoing_bytes,
        idle_timeout_s=args.idle_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
        persist=persist,
        cluster=cluster,
        metrics_listen=metrics_listen,
        storage=storage,
    )


def _listen_addresses(given: list[str] | None) -> tuple[Address, ...]:
    """The client addresses: ``given`` (flags or the file), else the default."""
    if given is None:
        given = [DEFAULT_LISTEN]
    elif not given:  # listen = [] in the file: not a daemon nobody can reach
        raise UsageError(
            f"{_named('listen')} is empty: give at least one address, or leave it out for "
            f"the default {DEFAULT_LISTEN}", "listen",
        )
    listen: list[Address] = []
    seen: dict[Address, Address] = {}  # the same, spelled alike -> as given first
    for text in given:
        try:
            address = parse_address(text)
        except AddressError as exc:
            raise UsageError(f"{_named('listen')}: {exc}", "listen") from exc
        same = address
        if isinstance(address, UnixAddress):
            same = UnixAddress(os.path.normpath(address.path))
        if same in seen and not (isinstance(address, TcpAddress) and address.port == 0):
            raise UsageError(
                f"{_named('listen')}: {seen[same]} is listed twice ({text!r}); give each "
                "address once", "listen",
            )
        seen[same] = address
        listen.append(address)
    return tuple(listen)


def _warn_if_readable(
    path: str,
    holds: str = "the database password ([storage] password)",
    fix: str = "chmod 0600 it, or use [storage] password_file",
) -> None:
    """A file holding a secret (``holds``) that users other than its owner
    may read (www-data is in the daemon's group): a warning, not a refusal,
    so that a working setup keeps starting."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        _warn(
            f"{path} holds {holds} and users other than its owner may read it "
            f"(mode {mode:04o}): {fix}"
        )


# The User= of deploy/systemd/phpsess.service.
DAEMON_USER: Final = "phpsess"


def _warn_unreachable_by_daemon(args: argparse.Namespace, user: str | None) -> None:
    """check-config run as root reads files the daemon, started as its own
    user, may not (a secret made with mode 0400 by root): it said "ok", and
    the daemon then failed at start.  Tried as that user, in a child
    process (its permissions and ACLs exactly, as the kernel applies them)."""
    if os.geteuid() != 0:
        if user is not None and _user_name(os.geteuid()) != user:
            _warn(f"--user {user}: check-config runs as another user, not root, so it "
                  f"cannot check as {user}: run it as root (sudo) for that check")
        return  # as the daemon's user, or another: what it read, it can read
    name = user or DAEMON_USER
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        if user is not None:
            _warn(f"--user {user}: no such user: the daemon's access to its files is not checked")
        return
    wanted = [(path, os.R_OK) for path in (
        getattr(args, "config", None), getattr(args, "cluster_secret_file", None),
        getattr(args, "storage_password_file", None),
    ) if path]
    data_dir = getattr(args, "data_dir", None)
    if data_dir and not getattr(args, "memory_only", False) and os.path.isdir(data_dir):
        wanted.append((data_dir, os.R_OK | os.W_OK | os.X_OK))
    for path, mode in wanted:
        may = _user_may(account, path, mode)
        if may is None:
            _warn(f"user {name}: check-config could not take on this user (setuid failed): "
                  "the daemon's access to its files is not checked")
            return
        if not may:
            what = "write to" if mode & os.W_OK else "read"
            _warn(
                f"{path}: user {name}, who runs the daemon (User= of its systemd unit), "
                f"cannot {what} it; check-config runs as root and can: give {name} "
                "access (chown or chgrp it, or fix the directories above it)"
            )


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no account (a container's)
        return None


def _user_may(account: pwd.struct_passwd, path: str, mode: int) -> bool | None:
    """Whether the user of ``account`` (a pwd entry) has ``mode`` access to
    ``path``: asked by a child process that takes on that user (None if it
    could not: no verdict, rather than a false alarm)."""
    uid, gid, name = account.pw_uid, account.pw_gid, account.pw_name
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 2
        try:
            os.initgroups(name, gid)
            os.setgid(gid)
            os.setuid(uid)
            code = 0 if os.access(path, mode) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code not in (0, 1) else code == 0


# What the last _configure found worth a warning but not a refusal: printed
# by check-config, logged by serve (once its log is set up, and at reloads).
_warnings: list[str] = []


def _warn(text: str) -> None:
    _warnings.append(text)


def _print_warnings() -> None:
    for text in _warnings:
        print(f"phpsess: warning: {text}", file=sys.stderr)


def _log_warnings() -> None:
    for text in _warnings:
        log.warning("event=config_warning detail=%s", logs.quoted(text))


def _storage_config(args: argparse.Namespace) -> SqlConfig | None:
    """The SQL backend's settings, or None (memory + journal); UsageError
    names the setting (and _configure its file and line, if the file gave it)."""
    import attrs

    from phpsess.sqlstore import StorageError, check_identifier, parse_storage_url

    if not args.storage:
        return None
    password_file = args.storage_password_file
    password = getattr(args, "storage_password", None)
    if password_file and password is not None:
        raise UsageError(
            f"give the database password once: {_named('storage_password')} or "
            f"{_named('storage_password_file')}", "storage_password", "storage_password_file",
        )
    if password is not None and getattr(args, "config", None):
        _warn_if_readable(args.config)
    if password_file:
        _warn_if_readable(password_file, "the database password", "chmod 0400 it")
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UsageError(
                f"cannot read the storage password file {password_file}, "
                f"{_named('storage_password_file')}: {why}", "storage_password_file",
            ) from exc
    if args.storage_pool_size < _MIN_POOL_SIZE:
        raise UsageError(
            f"{_named('storage_pool_size')} must be at least {_MIN_POOL_SIZE}: a lock "
            "holder keeps one connection", "storage_pool_size",
        )
    for dest, what in (("storage_table", "table name"), ("storage_engine", "storage engine")):
        try:
            check_identifier(getattr(args, dest), what)
        except StorageError as exc:
            raise UsageError(f"{_named(dest)}: {exc}", dest) from exc
    try:
        parsed = parse_storage_url(args.storage)
    except StorageError as exc:
        raise UsageError(f"{_named('storage')}: {exc}", "storage") from exc
    return attrs.evolve(
        parsed, password=password or "", table=args.storage_table,
        engine=args.storage_engine, pool_size=args.storage_pool_size,
    )


def _merged(
    args: argparse.Namespace, argv: Sequence[str]
) -> tuple[argparse.Namespace, dict[str, str]]:
    """Defaults < the --config file < flags given on the command line; and
    where (``"FILE:LINE"``) each setting taken from the file stands."""
    if not getattr(args, "config", None):
        return args, {}
    settings = config_file.load(args.config)
    given = _given_dests(argv, args.command)
    merged = argparse.Namespace(**vars(args))
    where: dict[str, str] = {}
    for dest, value in settings.items():
        if dest not in given:
            setattr(merged, dest, value)
            where[dest] = settings.where[dest]
    return merged, where


def _configure(
    args: argparse.Namespace, argv: Sequence[str]
) -> tuple[argparse.Namespace, ServerConfig]:
    """The settings (file and flags merged) and the daemon's configuration.
    A value the file gave that is out of range is named with its file and
    line, like the file's other mistakes (ConfigError)."""
    _warnings.clear()
    merged, where = _merged(args, argv)
    try:
        if merged.memory_only:
            # Durability asked for and not had: refused, not ignored.  A
            # file's key at its default (the shipped template lists every
            # one) asks for nothing, and a --memory-only flag wins over the
            # file's keys, as flags do.
            flags = _given_dests(argv, args.command)
            command = _subcommands(build_parser())[args.command]
            given = [
                dest for dest in _ON_DISK
                if dest in flags or (
                    dest in where and "memory_only" not in flags
                    and getattr(merged, dest) != command.get_default(dest)
                )
            ]
            if given:
                raise UsageError(
                    f"{_named('memory_only')} keeps nothing on disk, so "
                    f"{' and '.join(map(_named, given))} would do nothing: remove "
                    f"{'them' if len(given) > 1 else 'it'}, or {_named('memory_only')}",
                    "memory_only", *given,
                )
        return merged, server_config(merged)
    except UsageError as exc:
        for dest in exc.dests:
            if dest in where:
                raise config_file.ConfigError(f"{where[dest]}: {exc}") from exc
        raise


_UNSET: Final = object()
# The settings of the data directory, which --memory-only does without.
_ON_DISK: Final = ("data_dir", "fsync", "fsync_interval_ms", "compact_min_bytes")


def _given_dests(argv: Sequence[str], command: str) -> set[str]:
    """Which settings the command line itself gave (not defaults)."""
    parser = build_parser()
    sub = _subcommands(parser)[command]
    for action in sub._actions:
        if action.dest not in ("help", "command"):
            # Repeatable flags append to their default: give them None.
            action.default = None if isinstance(action, argparse._AppendAction) else _UNSET
    parsed = parser.parse_args(argv)
    return {
        dest for dest, value in vars(parsed).items() if value is not _UNSET and value is not None
    }


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _check_config(args: argparse.Namespace, argv: Sequence[str]) -> int:
    user = args.user
    try:
        args, _ = _configure(args, argv)
    except (config_file.ConfigError, UsageError) as exc:
        _print_warnings()
        print(f"phpsess: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _warn_unreachable_by_daemon(args, user)
    _print_warnings()
    print(f"{args.config}: ok")
    return EXIT_OK


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import resource

    import trio

    from phpsess.server import Server, StartupError, run_until_signal

    try:
        args, config = _configure(args, argv)
    except (config_file.ConfigError, UsageError) as exc:
        # With the error priority under systemd, like any reason to stop.
        logs.print_failure(str(exc))
        return EXIT_USAGE
    logs.setup(args.log_level)
    _log_warnings()  # with the log's priority: journalctl -p warning shows them
    # Every PHP worker holds a connection: allow as many descriptors as we may.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    def reload() -> tuple[ServerConfig, str]:
        """SIGHUP: the configuration as the file says now."""
        fresh, config = _configure(build_parser().parse_args(argv), argv)
        _log_warnings()
        return config, fresh.log_level

    # Threads (journal appends, snapshots) and the event loop hand the GIL to
    # each other within 0.5 ms instead of CPython's default 5 ms: with
    # --fsync always every acknowledged write waits for the journal thread,
    # and a snapshot being written must not hold requests back 5 ms at a time.
    sys.setswitchinterval(0.0005)
    # What exists now (modules, classes) lives as long as the process: out of
    # the cyclic collector's sight, so its full collections scan only what
    # requests made (sessions are untracked tuples: phpsess.store).
    gc.collect()
    gc.freeze()

    async def run() -> None:
        await run_until_signal(Server(config), reload if args.config else None)

    failed: list[StartupError] = []
    journal: list[JournalFailed] = []
    try:
        trio.run(run)
    except* StartupError as group:
        # Trio's nurseries wrap it in exception groups: report it plainly.
        failed.extend(e for e in _leaves(group) if isinstance(e, StartupError))
    except* JournalFailed as group:
        # Logged where it happened (event=journal_write_failed): no traceback.
        journal.extend(e for e in _leaves(group) if isinstance(e, JournalFailed))
    if failed:
        logs.print_failure(str(failed[0]))
        return EXIT_FAILURE
    if journal:
        logs.print_failure(
            f"stopped: the journal could not be written ({journal[0]}); changes it "
            "could not take are lost (event=journal_unwritten in the log says how "
            "many bytes); fix the disk (free space, the files in the data "
            "directory), then start phpsess again: it restores what the journal holds"
        )
        return EXIT_FAILURE
    log.info("event=stopped")
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves


def _repair(args: argparse.Namespace) -> int:
    from phpsess.persist import DataDirError, DataDirLock, repair

    lock = DataDirLock(args.data_dir)
    try:
        lock.acquire()
    except (DataDirError, OSError) as exc:
        print(f"phpsess: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        done = repair(args.data_dir)
    except (DataDirError, OSError) as exc:
        print(f"phpsess: repair of {args.data_dir} stopped: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
    for line in done:
        print(line)
    if not done:
        print(f"{args.data_dir}: nothing damaged")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        return _serve(args, argv)
    if args.command == "check-config":
        return _check_config(args, argv)
    if args.command == "repair":
        return _repair(args)
    if args.command in admin.COMMANDS:
        return admin.run(args)
    raise AssertionError(args.command)


def entrypoint() -> None:
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into head (or a pager) that quit early: stop quietly with the
        # status of a process killed by SIGPIPE, as cat does, not a traceback.
        # stdout goes to /dev/null so that the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 128 + signal.SIGPIPE
    sys.exit(status)


if __name__ == "__main__":
    entrypoint()
