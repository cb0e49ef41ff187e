<?php
// Web requests spread round-robin over several daemons (a non-sticky load
// balancer): php roundrobin.php <sid> <count> <addr1,addr2,...> [hold_ms]
// Each request increments $_SESSION['n'] and prints "ack <n>" once PHP says
// the write succeeded.  Stops at the first failure unless PHPSESS_RETRY=1.
declare(strict_types=1);

require __DIR__ . '/../../../php-ext-shim/src/SessionHandler.php';

$addresses = explode(',', $argv[3]);
$hold = (int) ($argv[4] ?? 0);
$retry = getenv('PHPSESS_RETRY') === '1';
$warnings = [];
set_error_handler(function (int $no, string $msg) use (&$warnings): bool {
    $warnings[] = $msg;
    return true;
});
$offset = (int) getenv('PHPSESS_OFFSET');
for ($i = 0; $i < (int) $argv[2]; $i++) {
    $address = $addresses[($i + $offset) % count($addresses)];
    session_set_save_handler(new PhpSess\SessionHandler($address, ['lock_wait' => 30]), true);
    session_id($argv[1]);
    $warnings = [];
    if (!session_start()) {
        if ($retry) { usleep(50000); continue; }
        fwrite(STDERR, "start failed at $address: " . implode(' | ', $warnings) . "\n");
        exit(0);
    }
    if ($hold > 0) {
        usleep($hold * 1000);
    }
    $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
    session_write_close();
    if ($warnings !== []) {
        if ($retry) { usleep(50000); continue; }
        fwrite(STDERR, "write failed at $address: " . implode(' | ', $warnings) . "\n");
        exit(0);
    }
    echo "ack {$_SESSION['n']}\n"; // one write: a line is printed whole or not at all
    flush();
}
