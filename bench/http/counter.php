<?php
// The benchmark's counter page.
//   GET /counter.php             session_start(), a 1 KiB value on the first
//                                visit, count++, echo "count=N"
//   GET /counter.php?hold_ms=20  the same, holding the session 20 ms between
//                                session_start() and the (implicit) write
//   GET /counter.php?peek=1      reads the count without changing it
//   GET /counter.php?info=1      the effective configuration, as JSON
if (isset($_GET['info'])) {
    header('Content-Type: application/json');
    $opcache = function_exists('opcache_get_status') ? @opcache_get_status(false) : false;
    echo json_encode([
        'php' => PHP_VERSION,
        'sapi' => PHP_SAPI,
        'opcache' => is_array($opcache) && !empty($opcache['opcache_enabled']),
        'redis' => phpversion('redis'),
        'memcached' => phpversion('memcached'),
        'save_handler' => ini_get('session.save_handler'),
        'save_path' => ini_get('session.save_path'),
        'redis_locking' => ini_get('redis.session.locking_enabled'),
        'memcached_locking' => ini_get('memcached.sess_locking'),
    ]), "\n";
    return;
}
if (isset($_GET['peek'])) {
    if (!session_start(['read_and_close' => true])) {
        http_response_code(500);
        echo "session_start failed\n";
        return;
    }
    if (!isset($_SESSION['count'])) {
        // every pooled session has a count from its first visit: none means the
        // session is gone or was read empty, which must not pass for count=0
        http_response_code(404);
        echo "no count in this session\n";
        return;
    }
    echo 'count=', (int) $_SESSION['count'], "\n";
    return;
}
if (!session_start()) {
    http_response_code(500);
    echo "session_start failed\n";
    return;
}
if (!isset($_SESSION['count'])) {
    $_SESSION['blob'] = str_repeat('x', 1024);
    $_SESSION['count'] = 0;
}
$hold = (int) ($_GET['hold_ms'] ?? 0);
if ($hold > 0) {
    usleep($hold * 1000);
}
$_SESSION['count']++;
echo 'count=', $_SESSION['count'], "\n";
