<?php
// A page for `php -S -t` (one worker process: every request reuses the same
// persistent phpsess connection).  ?op=count|abort|fatal|read_and_close&sid=...
declare(strict_types=1);

session_id($_GET['sid']);
session_start($_GET['op'] === 'read_and_close' ? ['read_and_close' => true] : []);
switch ($_GET['op']) {
    case 'count':
        $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
        echo $_SESSION['n'];
        break;
    case 'abort':
        $_SESSION['n'] = 1000;
        session_abort();
        echo 'aborted';
        break;
    case 'read_and_close':
        echo $_SESSION['n'] ?? 0;
        break;
    case 'fatal':
        echo 'dying';
        no_such_function();
}
