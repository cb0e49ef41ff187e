<?php

/*
 * phpsess demo: counts your visits in $_SESSION.
 *
 * Serve it with php-fpm (or `php -S`) with
 *     auto_prepend_file = /path/to/php-ext-shim/prepend.php
 * and a running daemon. Without the prepend it runs on PHP's own handler,
 * which the page says.
 */

declare(strict_types=1);

$action = ($_SERVER['REQUEST_METHOD'] ?? 'GET') === 'POST' ? (string) ($_POST['action'] ?? '') : '';
$started = session_start();

if ($started && $action === 'regenerate') {
    session_regenerate_id(true);
} elseif ($started && $action === 'destroy') {
    $_SESSION = [];
    session_destroy();
    $params = session_get_cookie_params();
    setcookie(session_name(), '', [
        'expires' => 1,
        'path' => $params['path'],
        'domain' => $params['domain'],
        'secure' => $params['secure'],
        'httponly' => $params['httponly'],
        'samesite' => $params['samesite'] ?: 'Lax',
    ]);
}
if ($action !== '') {
    // Post/redirect/get: reloading the page must not repeat the action. A
    // relative target built from the script name, never from the request URI.
    header('Location: ' . rawurlencode(basename((string) ($_SERVER['SCRIPT_NAME'] ?? 'index.php'))), true, 303);
    exit;
}

if ($started) {
    $_SESSION['visits'] = ($_SESSION['visits'] ?? 0) + 1;
}
$visits = $started ? (int) $_SESSION['visits'] : 0;
$sessionId = $started ? session_id() : '';
$module = session_module_name();
$phpsess = $module === 'user' && defined('PHPSESS_PREPENDED') && class_exists(\PhpSess\SessionHandler::class, false);
$handler = $phpsess ? 'phpsess (PhpSess\\SessionHandler)' : ($module === 'user' ? 'a user-defined handler' : 'PHP built-in: ' . $module);
$address = get_cfg_var('phpsess.address');
$savePath = (string) ini_get('session.save_path');
session_write_close();

function e(string $s): string
{
    return htmlspecialchars($s, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}
?>
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>phpsess demo</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40em; margin: 2em auto; line-height: 1.5; }
  dt { font-weight: bold; }
  dd { margin: 0 0 .6em 0; font-family: monospace; word-break: break-all; }
  form { display: inline; }
  .error { color: #a00; }
</style>
</head>
<body>
<h1>phpsess demo</h1>
<?php if (!$started): ?>
<p class="error">session_start() failed: see the PHP error log (is the phpsess daemon running?).</p>
<?php endif; ?>
<p>You have visited this page <strong><?= $visits ?></strong> time<?= $visits === 1 ? '' : 's' ?> in this session.</p>
<dl>
  <dt>Session ID</dt>
  <dd><?= $sessionId !== '' ? e($sessionId) : '(none)' ?></dd>
  <dt>Save handler</dt>
  <dd><?= e($handler) ?></dd>
  <dt>phpsess.address (php.ini)</dt>
  <dd><?= is_string($address) && $address !== '' ? e($address) : '(not set)' ?></dd>
  <dt>session.save_path</dt>
  <dd><?= $savePath !== '' ? e($savePath) : '(empty)' ?></dd>
</dl>
<form method="post"><button name="action" value="regenerate">Regenerate session ID</button></form>
<form method="post"><button name="action" value="destroy">Destroy session</button></form>
<p><a href="">Reload</a></p>
</body>
</html>
