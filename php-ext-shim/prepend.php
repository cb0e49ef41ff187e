<?php

/*
 * phpsess: register the phpsess session handler for every script.
 *
 *     auto_prepend_file = /path/to/php-ext-shim/prepend.php
 *
 * The address comes from the php.ini setting phpsess.address, else from
 * session.save_path when it is a unix:// or tcp:// address, else
 * unix:///run/phpsess/phpsess.sock (see SessionHandler::fromIni()).
 * Including this file twice does nothing the second time. It never connects:
 * scripts that do not start a session pay only for loading the class.
 */

declare(strict_types=1);

if (!\defined('PHPSESS_PREPENDED') && \function_exists('session_set_save_handler')) {
    \define('PHPSESS_PREPENDED', true);
    if (!\class_exists(\PhpSess\SessionHandler::class, false)) {
        require __DIR__ . '/src/SessionHandler.php';
    }
    // With session.auto_start the session is already running with another
    // handler; changing it now would only raise a warning.
    if (\session_status() !== \PHP_SESSION_ACTIVE) {
        try {
            \session_set_save_handler(\PhpSess\SessionHandler::fromIni(), true);
        } catch (\InvalidArgumentException $e) {
            // A typo in php.ini must not take down every script on the server.
            \trigger_error($e->getMessage() . ' (phpsess is not registered: sessions use session.save_handler)', \E_USER_WARNING);
        }
    }
}
