<?php

/*
 * phpsess: register the phpsess session handler for every script.
 *
 *     auto_prepend_file = /path/to/php-ext-shim/prepend.php
 *
 * The address comes from the php.ini setting phpsess.address, else from
 * session.save_path when it starts with unix: or tcp:, else
 * unix:///run/phpsess/phpsess.sock (see SessionHandler::fromIni()).
 * Including this file twice does nothing the second time. It never connects:
 * scripts that do not start a session pay only for loading the class.
 * It replaces only PHP's default handler: where session.save_handler names
 * another one (a pool using redis, say), that one stays.
 */

declare(strict_types=1);

// In a closure: the application's global scope gets no variables of ours.
(static function (): void {
    if (\defined('PHPSESS_PREPENDED') || !\function_exists('session_set_save_handler')) {
        return;
    }
    \define('PHPSESS_PREPENDED', true);
    // A pool or virtual host that chose another handler (redis, memcached...)
    // keeps it: phpsess replaces only the default, files.
    if (\ini_get('session.save_handler') !== 'files') {
        return;
    }
    if (\session_status() === \PHP_SESSION_ACTIVE) {
        // session.auto_start started the session with the files handler
        // before this file ran; switching now would only raise a warning.
        // Say so: on a web farm those sessions are not shared.
        \trigger_error('phpsess: session.auto_start is on, so this session was started with the files handler before phpsess could take over; turn session.auto_start off', \E_USER_WARNING);

        return;
    }
    if (!\class_exists(\PhpSess\SessionHandler::class, false)) {
        require __DIR__ . '/src/SessionHandler.php';
    }
    try {
        $handler = \PhpSess\SessionHandler::fromIni();
    } catch (\InvalidArgumentException $e) {
        // A typo in php.ini must not send sessions quietly to the local
        // files handler: on a web farm that splits every user's session
        // across servers.  Scripts that use no session are unaffected;
        // session_start() fails, with this message, until it is fixed.
        // open() succeeds, as the handler's own does: PHP sets up $_SESSION
        // only after open(), so session_start() returns false and leaves
        // $_SESSION = [], as the files handler does with a missing directory.
        $handler = new class ($e->getMessage()) implements \SessionHandlerInterface, \SessionUpdateTimestampHandlerInterface {
            private bool $warned = false;

            public function __construct(private string $why) {}

            public function open(string $path, string $name): bool { return true; }

            public function close(): bool
            {
                $this->warned = false;

                return true;
            }

            public function read(string $id): string|false { return $this->fail(); }

            public function write(string $id, string $data): bool { return $this->fail(); }

            public function destroy(string $id): bool { return $this->fail(); }

            public function gc(int $max_lifetime): int|false { return $this->fail(); }

            public function validateId(string $id): bool { return $this->fail(); }

            public function updateTimestamp(string $id, string $data): bool { return $this->fail(); }

            /** One warning per session_start(), from whichever call comes first. */
            private function fail(): bool
            {
                if (!$this->warned) {
                    $this->warned = true;
                    \trigger_error($this->why . ' (fix phpsess.address or session.save_path)', \E_USER_WARNING);
                }

                return false;
            }
        };
    }
    // PHP records upload progress (session.upload_progress) while it reads
    // the request body, before this file runs, with its files handler and
    // session.save_path: with a phpsess address there it fails (PHP logs
    // "open(unix:///...) failed"), with a directory there the progress goes
    // to local files that $_SESSION here never sees. Say so in the log, for
    // the requests that ask for it (to the log only: displayed, the message
    // would be output that stops the session cookie).
    if (isset($_POST) && $_POST !== [] && \ini_get('session.upload_progress.enabled')
        && \stripos((string) ($_SERVER['CONTENT_TYPE'] ?? ''), 'multipart/form-data') === 0) {
        $field = (string) \ini_get('session.upload_progress.name');
        if ($field !== '' && isset($_POST[$field])) {
            \error_log('phpsess: this request asks for session upload progress (the ' . $field . ' form field), which PHP records with its files handler before phpsess takes over, so it never reaches the phpsess session; set session.upload_progress.enabled = 0 and report upload progress from the browser instead (see php-ext-shim/README.md)');
        }
    }
    // false, as the files handler behaves: PHP writes the session at the
    // very end, after destructors, so $_SESSION changes they make are kept
    // (true would register session_write_close() as a shutdown function,
    // which runs before them). The handler stays usable until then, and
    // releases its lock after fatal errors and exit() too.
    try {
        \session_set_save_handler($handler, false);
    } catch (\Error $e) {
        // PHP 8.2.36 refuses every session handler but its own, and any
        // session ini_set(), while session.upload_progress.enabled is On
        // (the Error's message says so; that PHP's default is Off). Thrown
        // from here, it made every page of the site a fatal error, sessions
        // or not. Sessions stay with PHP's files handler: said in the log on
        // every request (not displayed: output would stop the session
        // cookie), and with a phpsess address in session.save_path the files
        // handler fails at session_start() rather than keep them locally.
        if (!\ini_get('session.upload_progress.enabled')) {
            throw $e;
        }
        \error_log('phpsess: not in use: this PHP refuses session handlers while session.upload_progress.enabled is On ("' . $e->getMessage() . '"), so sessions stay with the files handler; set session.upload_progress.enabled = 0 (see php-ext-shim/README.md)');
    }
})();
