<?php
// One "web request" for test_php_handler_edges.py.  Usage:
//   php handler_edges.php counter <sid> <seconds|dir>      start, n += 1, wait, write, read n back
//   php handler_edges.php regenerate <sid> <0|1> <dir> [slow-close|pause-close]
//                                         start, wait, session_regenerate_id(delete), wait
//                                         (pause-close: its close() waits at ready3 for go3)
//   php handler_edges.php new <sid|""> <rac|abort>         start (new ID) and close unwritten
//   php handler_edges.php strict <sid>                     start with an ID, print what happened
//   php handler_edges.php first-visit <dir> [<sid>]        start a new session (or regenerate
//                                         <sid>), put its ID in <dir>/sid, wait, write
//   php handler_edges.php fresh | create-id <sid> | reset | scope   (see below)
//   php handler_edges.php twice                          session_start() twice, no ID
//   php handler_edges.php two-sessions <dir> <same|new>  a session, wait, a second one
//   php handler_edges.php failed-start [<sid>]           what a failed start leaves in $_SESSION
// <dir>: the script touches <dir>/ready, then waits (at most 30 s) until the
// test creates <dir>/go, so the test can act on the daemon at that moment
// (the second wait uses ready2 and go2, the pause in close() ready3 and go3).
declare(strict_types=1);

// Buffer output: in CLI, printed output counts as "headers sent", which would
// make session_regenerate_id() refuse to work.
ob_start();

function out(string $label, mixed $value): void
{
    echo $label, ': ', is_string($value) ? $value : json_encode($value), "\n";
}

function wait_for_test(string $arg, string $suffix = ''): void
{
    if (is_numeric($arg)) {
        usleep((int) ((float) $arg * 1e6)); // a slow API call: wall time, no CPU
        return;
    }
    touch("$arg/ready$suffix");
    $deadline = microtime(true) + 30;
    while (!file_exists("$arg/go$suffix")) {
        if (microtime(true) > $deadline) {
            out('wait', 'the test never said go');
            exit(3);
        }
        usleep(10000);
    }
}

/**
 * The phpsess handler, with a pause in close(): gives the daemon time to
 * close the connection between the close() and the open() that
 * session_regenerate_id() makes. With a directory, the close() inside
 * session_regenerate_id() waits for the test instead (ready3, go3).
 */
final class SlowClose implements SessionHandlerInterface, SessionIdInterface, SessionUpdateTimestampHandlerInterface
{
    public function __construct(private \PhpSess\SessionHandler $inner, private string $dir = '') {}
    public function open(string $path, string $name): bool { return $this->inner->open($path, $name); }
    public function close(): bool
    {
        $ok = $this->inner->close();
        if ($this->dir === '') {
            usleep(200000);
        } elseif (in_array('session_regenerate_id', array_column(debug_backtrace(DEBUG_BACKTRACE_IGNORE_ARGS), 'function'), true)) {
            wait_for_test($this->dir, '3');
        }
        return $ok;
    }
    public function read(string $id): string|false { return $this->inner->read($id); }
    public function write(string $id, string $data): bool { return $this->inner->write($id, $data); }
    public function destroy(string $id): bool { return $this->inner->destroy($id); }
    public function gc(int $max_lifetime): int|false { return $this->inner->gc($max_lifetime); }
    public function create_sid(): string { return $this->inner->create_sid(); }
    public function validateId(string $id): bool { return $this->inner->validateId($id); }
    public function updateTimestamp(string $id, string $data): bool { return $this->inner->updateTimestamp($id, $data); }
}

switch ($argv[1]) {
    case 'counter':
        session_id($argv[2]);
        out('start', session_start());
        $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
        wait_for_test($argv[3]);
        out('write-close', session_write_close());
        session_id($argv[2]);
        out('restart', session_start());
        out('n', $_SESSION['n'] ?? null);
        break;

    case 'regenerate':
        if (($argv[5] ?? '') === 'slow-close') {
            session_set_save_handler(new SlowClose(\PhpSess\SessionHandler::fromIni()), true);
        } elseif (($argv[5] ?? '') === 'pause-close') {
            session_set_save_handler(new SlowClose(\PhpSess\SessionHandler::fromIni(), $argv[4]), true);
        }
        session_id($argv[2]);
        out('start', session_start());
        $_SESSION['user'] = 'alice';
        wait_for_test($argv[4]);
        try {
            out('regenerate', session_regenerate_id($argv[3] === '1'));
        } catch (\Throwable $e) {
            out('thrown', get_class($e) . ': ' . $e->getMessage());
        }
        out('status', session_status());
        out('new-sid', session_id());
        wait_for_test($argv[4], '2'); // then PHP writes the new session
        break;

    case 'new':
        if ($argv[2] !== '') {
            session_id($argv[2]);
        }
        if ($argv[3] === 'rac') {
            out('start', session_start(['read_and_close' => true]));
        } else {
            out('start', session_start());
            session_abort();
        }
        out('sid', session_id());
        break;

    case 'fresh': // a new visitor
        out('start', session_start());
        out('status', session_status());
        break;

    case 'twice': // a new visitor; code that tries session_start() again
        out('start', session_start());
        out('start2', session_start());
        out('status', session_status());
        break;

    case 'two-sessions': // a session; the test acts on the daemon; another session
        out('start', session_start());
        $first = session_id();
        $_SESSION['a'] = 1;
        out('write-close', session_write_close());
        wait_for_test($argv[2]);
        session_id($argv[3] === 'same' ? $first : '');
        out('start2', session_start());
        out('status', session_status());
        out('session', $_SESSION);
        break;

    case 'failed-start': // what code that goes on after a failed start finds
        if (($argv[2] ?? '') !== '') {
            session_id($argv[2]);
        }
        out('start', session_start());
        out('status', session_status());
        out('session', isset($_SESSION) ? $_SESSION : 'undefined');
        try {
            out('logged-in', array_key_exists('user', $_SESSION));
        } catch (\Throwable $e) {
            out('thrown', get_class($e));
        }
        break;

    case 'create-id': // session_create_id() inside a running session
        session_id($argv[2]);
        out('start', session_start());
        out('created', session_create_id('pfx-'));
        $_SESSION['a'] = 1;
        out('write-close', session_write_close());
        break;

    case 'reset': // strict mode: session_reset() of a session started this request
        out('start', session_start());
        $first = session_id();
        out('reset', session_reset());
        out('same-id', $first === session_id());
        break;

    case 'scope': // what prepend.php leaves behind
        out('globals', array_values(array_diff(array_keys($GLOBALS), ['_GET', '_POST', '_COOKIE', '_FILES', '_SERVER', '_ENV', '_REQUEST', 'argv', 'argc'])));
        out('handler', ini_get('session.save_handler'));
        break;

    case 'strict':
        session_id($argv[2]);
        out('start', session_start());
        out('status', session_status());
        out('kept-given-id', session_id() === $argv[2]);
        out('session', $_SESSION);
        break;

    case 'first-visit': // publishes its new ID before its first write
        if (($argv[3] ?? '') !== '') {
            session_id($argv[3]);
            out('start', session_start());
            out('regenerate', session_regenerate_id(true));
        } else {
            out('start', session_start());
        }
        file_put_contents("$argv[2]/sid.tmp", session_id());
        rename("$argv[2]/sid.tmp", "$argv[2]/sid");
        wait_for_test($argv[2]);
        $_SESSION['first'] = 1;
        out('write-close', session_write_close());
        break;
}
ob_end_flush();
