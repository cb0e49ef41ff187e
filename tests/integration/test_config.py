"""--config with a real daemon: precedence, check-config, SIGHUP reload."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.__main__ import main
from phpsess.client import Client
from tests.conftest import ROOT, free_port, free_tcp_port


def _config(path: Path, max_session_bytes: int, extra: str = "", limits: str = "") -> None:
    path.write_text(
        f"[limits]\nmax_session_bytes = {max_session_bytes}\nlock_wait_s = 7\n{limits}"
        f"[storage]\nmemory_only = true\n{extra}"
    )


def _wait_for(daemon: Any, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


def test_file_settings_apply_and_flags_win(start_daemon: Any, workdir: Path) -> None:
    conf = workdir / "phpsess.toml"
    _config(conf, 100)
    daemon = start_daemon("--config", str(conf), "--lock-wait-s", "0")
    with Client(daemon.address) as a, Client(daemon.address) as b:
        reply = a.request(p.Write("s", 60, b"x" * 101))  # the file's limit
        assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE
        assert a.request(p.Read("s")) == p.MISS
        started = time.monotonic()
        reply = b.request(p.Read("s"))  # the flag's 0 s wait, not the file's 7 s
        assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_TIMEOUT
        assert time.monotonic() - started < 5


def test_sighup_reloads_limits_and_names_what_needs_a_restart(
    start_daemon: Any, workdir: Path
) -> None:
    conf = workdir / "phpsess.toml"
    _config(conf, 100)
    daemon = start_daemon("--config", str(conf))
    with Client(daemon.address) as c:
        reply = c.request(p.Write("s", 60, b"x" * 200))
        assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE
    # (--listen on the command line wins over the file, so it is not "changed".)
    _config(conf, 1000, '[daemon]\nlog_level = "debug"\nmetrics_listen = "127.0.0.1:1"\n')
    daemon.signal(signal.SIGHUP)
    _wait_for(daemon, "event=reload_needs_restart changed=metrics_listen")
    assert "event=reloaded log_level=debug applied=limits" in daemon.log()
    with Client(daemon.address) as c:  # a new connection sees the new limit
        assert c.request(p.Write("s", 60, b"x" * 200)) == p.OK
    conf.write_text("[limits]\nmax_sesion_bytes = 5\n")  # a typo keeps the old settings
    daemon.signal(signal.SIGHUP)
    _wait_for(daemon, "event=reload_failed")
    assert "max_sesion_bytes" in daemon.log()
    with Client(daemon.address) as c:
        assert c.request(p.Write("s", 60, b"x" * 200)) == p.OK


def test_sighup_limits_apply_to_open_connections(start_daemon: Any, workdir: Path) -> None:
    # php-fpm keeps its connections open (persistent=1): a reload must not
    # wait for them to reconnect.  c's HELLO asked for a longer lease than
    # the daemon gives.
    conf = workdir / "phpsess.toml"
    _config(conf, 100)
    daemon = start_daemon("--config", str(conf))
    with (
        Client(daemon.address) as a, Client(daemon.address) as b,
        Client(daemon.address, lease_ms=600_000) as c,
    ):
        reply = c.request(p.Write("big", 60, b"x" * 200))
        assert isinstance(reply, p.Error) and reply.code is p.Code.TOO_LARGE
        _config(conf, 1000, limits="lock_lease_s = 0.5\n")
        conf.write_text(conf.read_text().replace("lock_wait_s = 7", "lock_wait_s = 0"))
        daemon.signal(signal.SIGHUP)
        _wait_for(daemon, "event=reloaded")
        assert c.request(p.Write("big", 60, b"x" * 200)) == p.OK  # the new size limit
        assert a.request(p.Read("s")) == p.MISS  # a holds the lock of s
        started = time.monotonic()
        reply = b.request(p.Read("s"))  # the new 0 s wait, not the old 7 s
        assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_TIMEOUT
        assert time.monotonic() - started < 5
        assert c.request(p.Read("t")) == p.MISS
        time.sleep(1.5)  # past the new 0.5 s lease, far from the old 300 s
        # Revoked once another request asks for the lock (PROTOCOL.md §6.3).
        assert b.request(p.Read("t")) == p.MISS
        reply = c.request(p.Write("t", 60, b"late"))
        assert isinstance(reply, p.Error) and reply.code is p.Code.LOCK_LOST, reply


def test_sighup_applies_max_outgoing_bytes(start_daemon: Any, workdir: Path) -> None:
    # The bound on what clients that do not read their replies hold
    # (PROTOCOL.md §10) is read from the file and changes while running.
    conf = workdir / "phpsess.toml"
    _config(conf, 100, limits="max_outgoing_bytes = 1000000\n")
    daemon = start_daemon("--config", str(conf))
    _config(conf, 100, limits="max_outgoing_bytes = 2000000\n")
    daemon.signal(signal.SIGHUP)
    _wait_for(daemon, "event=reloaded log_level=info applied=max_outgoing_bytes\n")
    with Client(daemon.address) as c:
        stats = c.request(p.Stats())
        assert isinstance(stats, p.Data) and b'"outgoing_bytes": 0' in stats.data, stats


def test_sighup_names_the_keys_that_need_a_restart(start_daemon: Any, workdir: Path) -> None:
    conf = workdir / "phpsess.toml"
    data_dir = f'data_dir = "{workdir}/data"\n'
    conf.write_text('[storage]\nfsync = "interval"\n' + data_dir)
    daemon = start_daemon("--config", str(conf))
    conf.write_text(
        '[daemon]\nmetrics_listen = "127.0.0.1:1"\n'
        '[storage]\nfsync = "never"\nfsync_interval_ms = 50\ncompact_min_bytes = 1000\n'
        + data_dir
    )
    daemon.signal(signal.SIGHUP)
    _wait_for(
        daemon, "event=reload_needs_restart "
        "changed=fsync,fsync_interval_ms,compact_min_bytes,metrics_listen detail="
    )
    conf.write_text("[storage]\nmemory_only = true\n")
    daemon.signal(signal.SIGHUP)
    # The detail is one logfmt value: quoted, since it has spaces.
    _wait_for(daemon, "event=reload_needs_restart changed=memory_only detail=\"these settings "
              "apply only after a restart (systemctl restart phpsess: in a cluster it drains "
              'first by itself)"\n')


def test_sighup_applies_peers_when_other_cluster_keys_changed_and_names_log_level(
    start_daemon: Any, workdir: Path
) -> None:
    (workdir / "secret").write_text("s" * 32)
    conf = workdir / "cluster.toml"
    port = free_tcp_port()

    def write(heartbeat_ms: int, peers: str, log_level: str = "info") -> None:
        conf.write_text(
            f'[daemon]\nlog_level = "{log_level}"\n'
            f'[cluster]\nnode = "a"\nlisten = "127.0.0.1:{port}"\n'
            f'secret_file = "{workdir}/secret"\nheartbeat_ms = {heartbeat_ms}\n'
            # Short: it waits as long for its peers before it listens.
            "dead_after_ms = 600\nprobe_ms = 100\n"
            f"[cluster.peers]\n{peers}"
        )

    write(200, 'b = "127.0.0.1:1"\n')
    daemon = start_daemon("--config", str(conf), "--memory-only")
    write(100, 'b = "127.0.0.1:1"\nc = "127.0.0.1:2"\n')
    daemon.signal(signal.SIGHUP)
    _wait_for(daemon, "event=reload_needs_restart changed=cluster.heartbeat_ms detail=")
    assert "event=peers_reloaded added=c removed=-" in daemon.log()
    assert "event=reloaded log_level=info applied=cluster.peers\n" in daemon.log()
    write(100, 'b = "127.0.0.1:1"\nc = "127.0.0.1:2"\n', "debug")
    daemon.signal(signal.SIGHUP)
    _wait_for(daemon, "event=reloaded log_level=debug applied=log_level\n")


def test_sighup_refuses_a_zero_idle_timeout(start_daemon: Any, workdir: Path) -> None:
    # 0 would drop every connection at once and sweep without a pause.
    conf = workdir / "phpsess.toml"
    _config(conf, 1000)
    daemon = start_daemon("--config", str(conf))
    with Client(daemon.address) as c:
        _config(conf, 1000, limits="idle_timeout_s = 0\n")
        daemon.signal(signal.SIGHUP)
        _wait_for(daemon, "event=reload_failed")
        assert f"{conf}:4: idle_timeout_s (--idle-timeout-s) must be positive" in daemon.log()
        time.sleep(0.5)
        assert c.request(p.Read("s", lock=False)) == p.MISS  # still connected


def test_a_readable_config_file_holding_the_database_password_is_warned_about(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # www-data is in the daemon's group (DEPLOYMENT.md): a group-readable
    # file with the password in it gives PHP the database password.
    conf = workdir / "sql.toml"
    conf.write_text('[storage]\nurl = "mysql://u@localhost/db"\npassword = "p"\n')
    conf.chmod(0o640)
    assert main(["check-config", str(conf)]) == 0
    err = capsys.readouterr().err
    assert f"phpsess: warning: {conf} holds the database password" in err
    assert "(mode 0640): chmod 0600 it, or use [storage] password_file" in err
    conf.chmod(0o600)
    assert main(["check-config", str(conf)]) == 0
    assert capsys.readouterr().err == ""


def _cluster_conf(where: Path) -> tuple[Path, Path]:
    """A cluster secret and a configuration naming it, in ``where``."""
    secret = where / "cluster.secret"
    secret.write_text("s" * 32)
    conf = where / "cluster.toml"
    conf.write_text(
        f'[cluster]\nnode = "a"\nlisten = "127.0.0.1:1"\nsecret_file = "{secret}"\n'
        '[cluster.peers]\nb = "127.0.0.1:2"\n'
    )
    return secret, conf


def test_a_readable_cluster_secret_or_password_file_is_warned_about(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whoever reads the cluster secret can act as a peer and read every
    # session (DEPLOYMENT.md §4); www-data is in the daemon's group.  It
    # was read without a look at its mode, as was the password file.
    secret, conf = _cluster_conf(workdir)
    password = workdir / "db.password"
    password.write_text("p\n")
    sql = workdir / "sql.toml"
    sql.write_text(
        f'[storage]\nurl = "mysql://u@localhost/db"\npassword_file = "{password}"\n'
    )
    for path, config, holds in ((secret, conf, "the cluster secret"),
                                (password, sql, "the database password")):
        path.chmod(0o644)
        assert main(["check-config", str(config)]) == 0
        err = capsys.readouterr().err
        assert f"phpsess: warning: {path} holds {holds}" in err
        assert "(mode 0644): chmod 0400 it" in err
        path.chmod(0o400)
        assert main(["check-config", str(config)]) == 0
        assert capsys.readouterr().err == ""


def test_check_config_as_root_warns_about_files_the_daemons_user_cannot_read(
    capsys: pytest.CaptureFixture[str]
) -> None:
    # Run as root, check-config read a secret made by root with mode 0400
    # and said "ok"; the daemon, started as its own user, could not.  (The
    # suite runs as root: scripts/test installs packages.)
    assert os.geteuid() == 0
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="phpsess-user-"))
    try:
        top.chmod(0o755)  # others may pass: only the files' own modes count
        secret = top / "cluster.secret"
        secret.write_text("s" * 32)
        secret.chmod(0o400)
        data = top / "data"
        data.mkdir(mode=0o700)
        conf = top / "cluster.toml"
        conf.write_text(
            f'[storage]\ndata_dir = "{data}"\n'
            f'[cluster]\nnode = "a"\nlisten = "127.0.0.1:1"\nsecret_file = "{secret}"\n'
            '[cluster.peers]\nb = "127.0.0.1:2"\n'
        )
        assert main(["check-config", "--user", "nobody", str(conf)]) == 0
        err = capsys.readouterr().err
        assert f"{secret}: user nobody, who runs the daemon" in err
        assert f"{data}: user nobody" in err and "cannot write to it" in err
        assert f"{conf}:" not in err.replace(f"{conf}: ok", "")  # others may read it
        os.chown(secret, nobody.pw_uid, nobody.pw_gid)
        os.chown(data, nobody.pw_uid, nobody.pw_gid)
        assert main(["check-config", "--user", "nobody", str(conf)]) == 0
        assert capsys.readouterr().err == ""
        assert main(["check-config", "--user", "no-such-user-x", str(conf)]) == 0
        assert "--user no-such-user-x: no such user" in capsys.readouterr().err
    finally:
        shutil.rmtree(top)


def test_check_config_says_when_it_cannot_check_as_the_daemons_user() -> None:
    # --user was silently ignored when check-config ran as another user than
    # root; and a root without the capability to take on the user (a
    # hardened unit's bounding set, a container) had every file reported
    # unreadable by the daemon, a false alarm.
    top = Path(tempfile.mkdtemp(prefix="phpsess-user-"))
    try:
        top.chmod(0o755)  # nobody may pass
        secret, conf = _cluster_conf(top)
        check = [sys.executable, "-m", "phpsess", "check-config", str(conf), "--user"]

        secret.chmod(0o444)  # for nobody
        proc = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *check,
             "daemon"], capture_output=True, text=True, cwd=ROOT, timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert "--user daemon: check-config runs as another user, not root, so it cannot " \
            "check as daemon: run it as root (sudo)" in proc.stderr, proc.stderr

        secret.chmod(0o400)  # root's alone: nobody cannot read it, and is not asked
        proc = subprocess.run(["setpriv", "--bounding-set", "-setuid,-setgid", *check, "nobody"],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert "user nobody: check-config could not take on this user (setuid failed): the " \
            "daemon's access to its files is not checked" in proc.stderr, proc.stderr
        assert "cannot read it" not in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(top)


def test_serve_logs_its_configuration_warnings_with_the_warning_priority(
    start_daemon: Any, workdir: Path
) -> None:
    # They were printed, not logged: no level, no priority prefix, so
    # journalctl -p warning (DEPLOYMENT.md §6) hid them.
    password = workdir / "db.password"
    password.write_text("p\n")
    password.chmod(0o644)
    url = f"mysql://u@127.0.0.1:{free_tcp_port()}/db"  # nothing listens: served UNAVAILABLE
    daemon = start_daemon("--storage", url, "--storage-password-file", str(password))
    _wait_for(daemon, "level=warning event=config_warning detail=")
    assert f"{password} holds the database password" in daemon.log()
    assert "phpsess: warning:" not in daemon.log()


def test_memory_only_with_settings_of_a_data_directory_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # memory_only = true beside data_dir and fsync = "always" was taken
    # silently: the operator believed every write was on disk.
    conf = workdir / "mo.toml"
    conf.write_text(
        f'[storage]\nmemory_only = true\ndata_dir = "{workdir}/d"\nfsync = "always"\n'
    )
    assert main(["check-config", str(conf)]) == 2
    assert capsys.readouterr().err == (
        f"phpsess: {conf}:2: memory_only (--memory-only) keeps nothing on disk, so "
        "data_dir (--data-dir) and fsync (--fsync) would do nothing: remove them, or "
        "memory_only (--memory-only)\n"
    )
    assert main(["serve", "--memory-only", "--fsync-interval-ms", "50"]) == 2
    assert ("memory_only (--memory-only) keeps nothing on disk, so fsync_interval_ms "
            "(--fsync-interval-ms) would do nothing: remove it") in capsys.readouterr().err
    conf.write_text("[storage]\nmemory_only = true\n")
    assert main(["check-config", str(conf)]) == 0
    assert not (workdir / "d").exists()
    # The shipped template lists every key at its default: that asks for
    # nothing, with memory_only set in it or given as a flag (which wins
    # over the file's keys, as flags do).
    template = (ROOT / "deploy" / "phpsess.toml").read_text()
    assert "\nmemory_only = false" in template and '\nfsync = "interval" ' in template
    memory_only = template.replace("\nmemory_only = false", "\nmemory_only = true")
    conf.write_text(memory_only)
    assert main(["check-config", str(conf)]) == 0
    assert main(["check-config", str(ROOT / "deploy" / "phpsess.toml"), "--memory-only"]) == 0
    conf.write_text(memory_only.replace('\nfsync = "interval" ', '\nfsync = "always" '))
    assert main(["check-config", str(conf)]) == 2
    assert "so fsync (--fsync) would do nothing" in capsys.readouterr().err


def test_check_config(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = workdir / "good.toml"
    _config(good, 1000)
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    bad = workdir / "bad.toml"
    bad.write_text('[storage]\nfsync = "sometimes"\n')
    assert main(["check-config", str(bad)]) == 2
    assert "fsync (--fsync) must be one of always, interval, never" in capsys.readouterr().err
    # A value of the right type but out of range is named as the file and
    # the flag both name it, whichever the operator used, with its file and
    # line like any other mistake in the file.
    (workdir / "secret").write_text("s" * 32)
    cluster = f'[cluster]\nnode = "a"\nlisten = "127.0.0.1:1"\nsecret_file = "{workdir}/secret"\n'
    for text, message in (
        ('[daemon]\nlog_level = "loud"\n', ":2: log_level (--log-level) must be one of"),
        ('[daemon]\nlog_level = "INFO"\n', ":2: log_level (--log-level) must be one of"),
        ('[daemon]\nlisten = ["bogus:x"]\n',
         ":2: listen (--listen): 'bogus:x' is not an address"),
        ('[daemon]\nmetrics_listen = "nohost"\n', ":2: metrics_listen (--metrics-listen): "),
        ('[storage]\n\nfsync = "sometimes"\n', ":3: fsync (--fsync) must be one of"),
        ("[limits]\nlock_lease_s = 0\n", ":2: lock_lease_s (--lock-lease-s) must be positive"),
        ("[limits]\n\nmax_connections = 0\n", ":3: max_connections (--max-connections) must be"),
        ("[limits]\nmax_incoming_bytes = 1000\n",
         ":2: max_incoming_bytes (--max-incoming-bytes) must be at least max_session_bytes"),
        ("[limits]\n\nmax_outgoing_bytes = 0\n",
         ":3: max_outgoing_bytes (--max-outgoing-bytes) must be at least 1"),
        ("[limits]\nidle_timeout_s = 0\n", ":2: idle_timeout_s (--idle-timeout-s) must be "
         "positive"),
        ("[limits]\nidle_timeout_s = -1\n", ":2: idle_timeout_s (--idle-timeout-s) must be "
         "positive"),
        (f"{cluster}heartbeat_ms = 3000\n", ":5: heartbeat_ms (--heartbeat-ms), 3000, must be "
         "less than dead_after_ms (--dead-after-ms), 3000"),
        (f"{cluster}probe_ms = 3000\n", ":5: probe_ms (--probe-ms), 3000, must be less "
         "than dead_after_ms (--dead-after-ms), 3000"),
        (f'{cluster}[cluster.peers]\na = "127.0.0.1:2"\n', ":5: peer names must be unique"),
        # TCP-only settings: named, quoted as written, no unix: advice.
        (f'{cluster}[cluster.peers]\nb = "db.example:7701"\n', ":5: --peer "
         "'b=db.example:7701': 'db.example:7701': give an IP address (or localhost), not a "
         "host name"),
        ('[daemon]\nmetrics_listen = "9464"\n', ":2: metrics_listen (--metrics-listen): "
         "'9464': expected HOST:PORT (an IP address or localhost, and a port)"),
        ('[daemon]\nmetrics_listen = "127.0.0.1: 9"\n', ":2: metrics_listen "
         "(--metrics-listen): '127.0.0.1: 9': expected HOST:PORT (an IP address or "
         "localhost, and a port)"),
        # A copied config: the node itself as a peer, or two peers at one place.
        (f'{cluster}[cluster.peers]\nb = "127.0.0.1:1"\n', ":5: peer b's address "
         "tcp:127.0.0.1:1 is this node's own cluster listen address: a node is not its own "
         "peer"),
        (f'{cluster}[cluster.peers]\nb = "localhost:1"\n', ":5: peer b's address "
         "tcp:localhost:1 is this node's own cluster listen address"),
        (f'{cluster}[cluster.peers]\nb = "127.0.0.1:2"\nc = "127.0.0.1:2"\n',
         ":5: peers b and c have the same address tcp:127.0.0.1:2"),
        ('[cluster]\nnode = "a-b"\nlisten = "127.0.0.1:1"\nsecret_file = "/x"\n',
         ":2: node name 'a-b' must be"),
    ):
        bad.write_text(text)
        assert main(["check-config", str(bad)]) == 2, text
        assert f"phpsess: {bad}{message}" in capsys.readouterr().err, text
    # A flag's value is the flag's: no file, no line.
    assert main(["check-config", str(good), "--idle-timeout-s", "0"]) == 2
    assert capsys.readouterr().err == (
        "phpsess: idle_timeout_s (--idle-timeout-s) must be positive: how long a silent "
        "connection holding no lock is kept open\n"
    )
    bad.write_text("[limits]\nidle_timeout_s = 0\n")
    assert main(["check-config", str(bad), "--idle-timeout-s", "5"]) == 0
    capsys.readouterr()
    # No peers: allowed (a first node, peers added by reload), not silently.
    bad.write_text(cluster)
    (workdir / "secret").chmod(0o400)
    assert main(["check-config", str(bad)]) == 0
    assert capsys.readouterr().err == (
        "phpsess: warning: a cluster node with no peers ([cluster.peers] or --peer) keeps a "
        "single copy of every session: name the other nodes\n"
    )


def _refused_at_start(bad: Path, text: str, message: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """check-config refuses ``text`` (written to ``bad``) with an error that
    begins ``phpsess: <bad><message>``."""
    bad.write_text(text)
    assert main(["check-config", str(bad)]) == 2, text
    err = capsys.readouterr().err
    assert err.startswith(f"phpsess: {bad}{message}"), (text, err)


def test_storage_and_cluster_mistakes_name_the_file_line_and_both_names(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = workdir / "bad.toml"
    url = 'url = "mysql://u@localhost/db"\n'
    for text, message in (
        (f"[storage]\n{url}pool_size = 1\n",
         ":3: [storage] pool_size (--storage-pool-size) must be at least 2"),
        ('[storage]\nurl = "http://x"\n',
         ":2: [storage] url (--storage): storage 'http://x' is not mysql://"),
        (f'[storage]\n{url}table = "a-b"\n',
         ":3: [storage] table (--storage-table): table name 'a-b' must be"),
        (f'[storage]\n{url}engine = "x;y"\n',
         ":3: [storage] engine (--storage-engine): storage engine 'x;y' must be"),
        (f'[storage]\n{url}password = "p"\npassword_file = "/p"\n',
         ":3: give the database password once: [storage] password or [storage] "
         "password_file (--storage-password-file)"),
        (f'[storage]\n{url}password_file = "{workdir}/nope"\n',
         f":3: cannot read the storage password file {workdir}/nope, [storage] password_file "
         "(--storage-password-file): No such file"),
        (f"[storage]\n{url}memory_only = true\n",
         ":2: [storage] url (--storage) and memory_only (--memory-only) are alternatives"),
        ('[cluster]\n\nnode = "a"\n',
         ":3: a cluster needs [cluster] listen (--cluster-listen), [cluster] secret_file "
         "(--cluster-secret-file) as well"),
        (f'[storage]\n{url}[cluster]\nnode = "a"\n',
         ":2: [storage] url (--storage) and a cluster (node (--node)) are alternatives"),
    ):
        _refused_at_start(bad, text, message, capsys)
    # The flag refuses a pool too small for SqlConfig itself.
    good = workdir / "good.toml"
    _config(good, 1000)
    with pytest.raises(SystemExit) as exited:
        main(["check-config", str(good), "--storage-pool-size", "1"])
    assert exited.value.code == 2
    assert "--storage-pool-size: '1' must be at least 2" in capsys.readouterr().err


def test_an_empty_or_repeated_listen_address_is_a_mistake(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = workdir / "bad.toml"
    for text, message in (
        ("[daemon]\nlisten = []\n", ":2: listen (--listen) is empty: give at least one"),
        ('[daemon]\nlisten = ["unix:/x.sock", "tcp:127.0.0.1:1", "unix:///x.sock"]\n',
         ":2: listen (--listen): unix:/x.sock is listed twice ('unix:///x.sock')"),
        ('[daemon]\nlisten = ["unix:/run/x.sock", "unix:/run//x.sock"]\n',
         ":2: listen (--listen): unix:/run/x.sock is listed twice"),
    ):
        _refused_at_start(bad, text, message, capsys)
    good = workdir / "good.toml"
    _config(good, 1000)
    assert main(["check-config", str(good), "--listen", "tcp:127.0.0.1:1",
                 "--listen", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == (
        "phpsess: listen (--listen): tcp:127.0.0.1:1 is listed twice ('tcp://127.0.0.1:1'); "
        "give each address once\n"
    )
    # Port 0 twice is two ports.
    assert main(["check-config", str(good), "--listen", "tcp:127.0.0.1:0",
                 "--listen", "tcp:127.0.0.1:0"]) == 0
    capsys.readouterr()


def test_serve_with_a_bad_file_exits_2_naming_the_line(workdir: Path) -> None:
    bad = workdir / "bad.toml"
    bad.write_text("[daemon]\nlisten = []\n[limits]\nmax_conections = 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert proc.returncode == 2
    assert f"{bad}:4: unknown key 'max_conections' in [limits]" in proc.stderr


def test_serve_tags_a_bad_file_with_the_error_priority_for_the_journal(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd ``journalctl -p err`` shows why the service did not start."""
    monkeypatch.setattr("phpsess.logs.stderr_is_journal", lambda: True)
    bad = workdir / "bad.toml"
    bad.write_text("[limits]\nmax_conections = 5\n")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"<3>phpsess: {bad}:2: unknown key 'max_conections' in [limits]")


def _serve_fails(workdir: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "phpsess", "serve", "--listen",
         f"unix:{workdir}/s.sock", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert proc.returncode in (1, 2), proc
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_startup_failures_are_one_clear_line(workdir: Path) -> None:
    # The metrics port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = _serve_fails(workdir, "--memory-only", "--metrics-listen", f"127.0.0.1:{port}")
    assert f"cannot serve metrics on tcp:127.0.0.1:{port}: Address already in use" in err, err
    # The data directory's lock file cannot be opened (a directory in its place
    # stands in for an unwritable one: the test runs as root).
    data = workdir / "data"
    (data / "lock").mkdir(parents=True)
    err = _serve_fails(workdir, "--data-dir", str(data))
    assert f"cannot restore from {data}: {data}/lock: Is a directory" in err, err
    # The cluster secret file is missing.
    err = _serve_fails(workdir, "--memory-only", "--node", "a", "--cluster-listen",
                       "127.0.0.1:0", "--cluster-secret-file", f"{workdir}/nope")
    assert f"cannot read the cluster secret file {workdir}/nope" in err, err


# Runs `phpsess serve` with os.<call>(<path>) failing with EACCES: the test
# runs as root, which no directory permission stops.
_DENIED = """
import os, sys
from phpsess.__main__ import main
path, call = sys.argv[1], sys.argv[2]
real = getattr(os, call)
def denied(p, *args, **kwargs):
    if os.fspath(p) == path:
        raise PermissionError(13, "Permission denied", p)
    return real(p, *args, **kwargs)
setattr(os, call, denied)
sys.exit(main(["serve", "--memory-only", "--listen", "unix:" + path]))
"""


def test_a_socket_path_it_may_not_look_up_or_remove_is_one_clear_line(
    workdir: Path,
) -> None:
    path = workdir / "run" / "x.sock"
    path.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", _DENIED, str(path), "lstat"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"phpsess: cannot look up {path} for unix:{path}: Permission denied" in proc.stderr
    # A stale socket (its daemon died) that the daemon may not remove.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    proc = subprocess.run([sys.executable, "-c", _DENIED, str(path), "unlink"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"phpsess: cannot remove the old socket {path} (no daemon answered on it) for " \
        f"unix:{path}: Permission denied" in proc.stderr
    assert path.exists()


def test_cluster_timings_from_the_file_and_flags_reach_the_daemon(
    start_daemon: Any, workdir: Path
) -> None:
    # The timings in effect are logged at start (CLUSTER.md §3): the file's,
    # a flag winning over it.
    port = free_port(udp=True)  # the cluster's TCP and UDP
    (workdir / "secret").write_text("s" * 32)
    conf = workdir / "cluster.toml"
    conf.write_text(
        f'[cluster]\nnode = "a"\nlisten = "127.0.0.1:{port}"\n'
        f'secret_file = "{workdir}/secret"\nheartbeat_ms = 200\ndead_after_ms = 2000\n'
        "probe_ms = 1200\n"
    )
    daemon = start_daemon("--config", str(conf), "--memory-only")
    _wait_for(daemon, "heartbeat_ms=200 dead_after_ms=2000 probe_ms=1200")
    daemon.stop()
    daemon = start_daemon("--config", str(conf), "--memory-only", "--probe-ms", "900")
    _wait_for(daemon, "heartbeat_ms=200 dead_after_ms=2000 probe_ms=900")
