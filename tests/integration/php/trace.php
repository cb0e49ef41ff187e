<?php
// Golden transcript: which handler calls PHP makes, in which order, with
// which results, for a sequence of session operations in one process.
// Usage: php trace.php <phpsess-address>   (compared with golden/trace.expected)
declare(strict_types=1);

ob_start();
require __DIR__ . '/../../../php-ext-shim/src/SessionHandler.php';

final class Trace implements SessionHandlerInterface, SessionIdInterface, SessionUpdateTimestampHandlerInterface
{
    private array $ids = [];

    public function __construct(private PhpSess\SessionHandler $inner) {}

    private function id(string $id): string
    {
        // Stable names for random IDs so the transcript is reproducible.
        if (!isset($this->ids[$id])) {
            $this->ids[$id] = preg_match('/^[0-9a-v]{32}$/', $id) ? 'NEW' . (count($this->ids) + 1) : $id;
        }
        return $this->ids[$id];
    }

    private function log(string $call, mixed $result): mixed
    {
        echo $call, ' -> ', var_export($result, true), "\n";
        return $result;
    }

    public function open(string $path, string $name): bool { return $this->log("open($name)", $this->inner->open($path, $name)); }
    public function close(): bool { return $this->log('close()', $this->inner->close()); }
    public function read(string $id): string|false { return $this->log('read(' . $this->id($id) . ')', $this->inner->read($id)); }
    public function write(string $id, string $data): bool { return $this->log('write(' . $this->id($id) . ", '$data')", $this->inner->write($id, $data)); }
    public function destroy(string $id): bool { return $this->log('destroy(' . $this->id($id) . ')', $this->inner->destroy($id)); }
    public function gc(int $max): int|false { return $this->log("gc($max)", $this->inner->gc($max)); }
    public function create_sid(): string { $id = $this->inner->create_sid(); $this->log('create_sid()', $this->id($id)); return $id; }
    public function validateId(string $id): bool { return $this->log('validateId(' . $this->id($id) . ')', $this->inner->validateId($id)); }
    public function updateTimestamp(string $id, string $data): bool { return $this->log('updateTimestamp(' . $this->id($id) . ", '$data')", $this->inner->updateTimestamp($id, $data)); }
}

ini_set('session.use_cookies', '0');
ini_set('session.use_strict_mode', '1');
ini_set('session.lazy_write', '1');
ini_set('session.sid_length', '32');
ini_set('session.sid_bits_per_character', '5');
session_set_save_handler(new Trace(new PhpSess\SessionHandler($argv[1])), true);

function step(string $what): void { echo "# $what\n"; }

step('session_start() with no id');
session_start();
$_SESSION['n'] = 1;
step('session_write_close()');
session_write_close();

step('session_start() again, unchanged (lazy_write)');
session_start();
session_write_close();

step('session_regenerate_id(false)');
session_start();
session_regenerate_id(false);
$_SESSION['n'] = 2;
session_write_close();

step('session_regenerate_id(true)');
session_start();
session_regenerate_id(true);
session_write_close();

step('read_and_close');
session_start(['read_and_close' => true]);

step('session_abort()');
session_start();
$_SESSION['n'] = 99;
session_abort();

step('session_reset()');
session_start();
$_SESSION['n'] = 98;
session_reset();
echo "n = {$_SESSION['n']}\n";

step('session_destroy()');
session_destroy();

step('strict mode, unknown id');
session_id('unknownsessionid0123456789');
session_start();
session_write_close();
step('done');
