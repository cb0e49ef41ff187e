<?php
// A stream of web requests on one session: php writer.php <sid> <count>
// Each request increments $_SESSION['n']; after a write PHP reports as
// successful (no warning), prints "ack <n> <unix time>".  Stops at the first
// failure.
declare(strict_types=1);

$warnings = [];
set_error_handler(function (int $no, string $msg) use (&$warnings): bool {
    $warnings[] = $msg;
    return true;
});
for ($i = 0; $i < (int) $argv[2]; $i++) {
    session_id($argv[1]);
    if (!@session_start()) {
        exit(0);
    }
    $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
    $warnings = [];
    session_write_close();
    if ($warnings !== []) {
        exit(0);  // session_write_close() is true even when the write failed
    }
    echo "ack ", $_SESSION['n'], " ", sprintf('%.6f', microtime(true)), "\n";
    flush();
}
