<?php
// One "web request" of a session scenario.  Usage:
//   php scenario.php <scenario> <step> [session-id]
// Prints one line per observation; the Python test runs the same steps with
// PHP's files handler and with phpsess and compares the transcripts.
declare(strict_types=1);

// Buffer output: in CLI, printed output counts as "headers sent", which would
// make session_regenerate_id() and friends refuse to work.
ob_start();

$scenario = $argv[1];
$step = (int) $argv[2];
$sid = $argv[3] ?? '';

$warnings = [];
set_error_handler(function (int $no, string $msg) use (&$warnings): bool {
    $warnings[] = $msg;
    return true;
});

function out(string $label, mixed $value): void
{
    echo $label, ': ', is_string($value) ? $value : json_encode($value), "\n";
}

function start(array $options = []): bool
{
    $ok = session_start($options);
    out('start', $ok);
    out('status', session_status());
    return $ok;
}

class Cart
{
    private array $items = [];
    protected string $owner = "o\0wner";
    public ?Cart $self = null;
    public function add(string $item): void { $this->items[] = $item; }
    public function items(): array { return $this->items; }
}

if ($sid !== '') {
    session_id($sid);
}

switch ($scenario) {
    case 'counter':
        start();
        $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
        out('n', $_SESSION['n']);
        out('sid', session_id());
        break;

    case 'rich':
        // Objects, private and protected properties (NUL bytes), references,
        // binary strings and a 2 MiB value, in any serialize handler.
        start();
        if ($step === 0) {
            $cart = new Cart();
            $cart->add("book");
            $cart->self = $cart;
            $_SESSION['cart'] = $cart;
            $_SESSION['bin'] = "\0\x01\xff|;:\"\n\r";
            $_SESSION['big'] = str_repeat("0123456789abcdef", 131072); // 2 MiB
            $shared = ['x' => 1];
            $_SESSION['a'] = &$shared;
            $_SESSION['b'] = &$shared;
        } else {
            $s = $_SESSION;
            out('cart-items', $s['cart']->items());
            out('cart-self-is-cart', $s['cart']->self === $s['cart']);
            out('bin', bin2hex($s['bin']));
            out('big-md5', md5($s['big']));
            $_SESSION['a']['x'] = 2;
            out('reference-kept', $_SESSION['b']['x']);
            out('keys', array_map('strval', array_keys($_SESSION)));
        }
        out('sid', session_id());
        break;

    case 'regenerate':
        start();
        if ($step === 0) {
            $_SESSION['v'] = 'old';
        } elseif ($step === 1) {
            $delete = ($argv[4] ?? '') === 'delete';
            out('regenerate', session_regenerate_id($delete));
            $_SESSION['v'] = 'new';
            out('new-sid', session_id());
        } else {
            out('v', $_SESSION['v'] ?? null);
        }
        out('sid', session_id());
        break;

    case 'destroy':
        start();
        if ($step === 0) {
            $_SESSION['v'] = 'x';
        } elseif ($step === 1) {
            out('destroy', session_destroy());
            out('status-after', session_status());
        } else {
            out('session', $_SESSION);
        }
        out('sid', session_id());
        break;

    case 'abort':
        start();
        if ($step === 0) {
            $_SESSION['v'] = 'kept';
        } elseif ($step === 1) {
            $_SESSION['v'] = 'changed';
            out('abort', session_abort());
            out('status-after', session_status());
        } else {
            out('v', $_SESSION['v'] ?? null);
        }
        out('sid', session_id());
        break;

    case 'reset':
        start();
        if ($step === 0) {
            $_SESSION['v'] = 'stored';
        } else {
            $_SESSION['v'] = 'changed';
            out('reset', session_reset());
            out('v', $_SESSION['v'] ?? null);
            out('status-after', session_status());
        }
        out('sid', session_id());
        break;

    case 'read_and_close':
        if ($step === 0) {
            start();
            $_SESSION['v'] = 'one';
        } elseif ($step === 1) {
            start(['read_and_close' => true]);
            out('v', $_SESSION['v'] ?? null);
            $_SESSION['v'] = 'lost';
        } else {
            start();
            out('v', $_SESSION['v'] ?? null);
        }
        out('sid', session_id());
        break;

    case 'strict':
        ini_set('session.use_strict_mode', '1');
        start();
        out('kept-given-id', session_id() === $sid);
        $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
        out('n', $_SESSION['n']);
        out('sid', session_id());
        break;

    case 'lazy':
        ini_set('session.lazy_write', '1');
        start();
        if ($step === 0) {
            $_SESSION['v'] = 'same';
        }
        out('v', $_SESSION['v']);
        out('sid', session_id());
        break;

    case 'invalid':
        // session_id() reaches the handler unchecked (PHP-SESSIONS.md).
        $ok = start();
        out('session', $_SESSION ?? null);
        if ($ok) {
            $_SESSION['v'] = 'should not be stored';
        }
        break;

    case 'empty':
        start();
        out('session', $_SESSION);
        out('sid-length', strlen(session_id()));
        out('sid-alphabet-ok', preg_match('/^[0-9a-v]+$/', session_id()) === 1);
        out('sid', session_id());
        break;

    default:
        fwrite(STDERR, "unknown scenario $scenario\n");
        exit(2);
}

session_write_close();
out('warned', $warnings !== []);
