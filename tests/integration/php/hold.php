<?php
// A web request that holds its session: php hold.php <sid> <hold_ms> [hang]
// Increments $_SESSION['n'] while holding the session lock for hold_ms.
// With "hang" it reports LOCKED on stdout and then hangs until killed.
declare(strict_types=1);

session_id($argv[1]);
$ok = session_start();
if (!$ok) {
    fwrite(STDERR, "session_start failed\n");
    exit(3);
}
$t = microtime(true);
if (($argv[3] ?? '') === 'hang') {
    echo "LOCKED\n";
    sleep(120);
}
usleep((int) $argv[2] * 1000);
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
echo sprintf("started=%.6f n=%d\n", $t, $_SESSION['n']);
if (!session_write_close()) {
    fwrite(STDERR, "session_write_close failed\n");
    exit(4);
}
