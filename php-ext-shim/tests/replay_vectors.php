<?php

/*
 * Replays protocol vectors (protocol/PROTOCOL.md §11) against a running daemon.
 *
 *     php replay_vectors.php <address> <vector.json> [<vector.json> ...]
 *
 * <address> is unix:///abs/path.sock, tcp://HOST:PORT, or the daemon's own
 * forms unix:/abs/path.sock and tcp:HOST:PORT. The caller starts a daemon with
 * the settings in each vector's "daemon" key; this script ignores that key
 * except to allow for its lock_wait_s / lock_lease_s when waiting for replies.
 *
 * Prints "ok <name>" or "FAIL <name>: <detail>" per vector; exits 1 if any
 * vector failed, 2 on bad usage or an unreadable vector file.
 *
 * An "expect" may cover several pipelined replies: they are read one by one
 * (header line, then the payload a DATA header announces) until its length
 * is covered, then compared byte for byte.
 */

declare(strict_types=1);

const NO_REPLY_WINDOW_S = 0.2;   // §11: expect null = nothing within 200 ms
const MIN_REPLY_TIMEOUT_S = 5.0;    // §11: a step waits up to 5 s for replies
const MAX_HEADER_BYTES = 1024;   // §2

final class VectorFailure extends \Exception
{
}

function main(array $argv): int
{
    if (\count($argv) < 3) {
        fwrite(\STDERR, "usage: php replay_vectors.php <address> <vector.json> [<vector.json> ...]\n");

        return 2;
    }
    $address = clientAddress($argv[1]);
    if ($address === null) {
        fwrite(\STDERR, "replay_vectors: bad address \"{$argv[1]}\": expected unix:///abs/path.sock, unix:/abs/path.sock, tcp://HOST:PORT or tcp:HOST:PORT\n");

        return 2;
    }
    $failed = 0;
    foreach (\array_slice($argv, 2) as $file) {
        $text = @file_get_contents($file);
        $vector = $text === false ? null : json_decode($text, true);
        if (!\is_array($vector) || !isset($vector['steps']) || !\is_array($vector['steps'])) {
            fwrite(\STDERR, "replay_vectors: $file is not a readable vector (a JSON object with \"steps\")\n");

            return 2;
        }
        $name = \is_string($vector['name'] ?? null) ? $vector['name'] : basename($file, '.json');
        try {
            replay($address, $vector);
            echo "ok $name\n";
        } catch (VectorFailure $e) {
            echo "FAIL $name: {$e->getMessage()}\n";
            ++$failed;
        }
    }

    return $failed === 0 ? 0 : 1;
}

/** unix:/p and tcp:h:p (the daemon's forms) become unix:///p and tcp://h:p. */
function clientAddress(string $address): ?string
{
    if (preg_match('~\Aunix:(?://)?(/.+)\z~', $address, $m) === 1) {
        return 'unix://' . $m[1];
    }
    if (preg_match('~\Atcp:(?://)?(.+:[0-9]+)\z~', $address, $m) === 1) {
        return 'tcp://' . $m[1];
    }

    return null;
}

/** @param array<string, mixed> $vector */
function replay(string $address, array $vector): void
{
    $daemon = \is_array($vector['daemon'] ?? null) ? $vector['daemon'] : [];
    $timeout = max(
        MIN_REPLY_TIMEOUT_S,
        (float) ($daemon['lock_wait_s'] ?? 0) + 5,
        (float) ($daemon['lock_lease_s'] ?? 0) + 5,
    );
    /** @var array<string, resource> $conns */
    $conns = [];
    try {
        foreach ($vector['steps'] as $i => $step) {
            $where = 'step ' . ($i + 1);
            if (!\is_array($step) || !\is_string($step['conn'] ?? null)) {
                throw new VectorFailure("$where: malformed step (needs a \"conn\" name)");
            }
            $name = $step['conn'];
            $where .= " (conn $name)";
            if (isset($step['sleep_ms'])) {
                usleep((int) ($step['sleep_ms'] * 1000));
            }
            if (!empty($step['hangup'])) {
                if (isset($conns[$name])) {
                    fclose($conns[$name]);
                    unset($conns[$name]);
                }
                continue;
            }
            if (!isset($conns[$name])) {
                $sock = @stream_socket_client($address, $errno, $errstr, 5.0);
                if ($sock === false) {
                    throw new VectorFailure("$where: cannot connect to $address: $errstr");
                }
                $conns[$name] = $sock;
            }
            $sock = $conns[$name];
            if (isset($step['send'])) {
                $bytes = stripcslashes((string) $step['send']);
                if (@fwrite($sock, $bytes) !== \strlen($bytes)) {
                    throw new VectorFailure("$where: could not send \"" . show($bytes) . '"');
                }
            }
            if (!\array_key_exists('expect', $step)) {
                continue;
            }
            if ($step['expect'] === null) {
                expectSilence($sock, $where);
                continue;
            }
            expectReplies($sock, stripcslashes((string) $step['expect']), $timeout, $where);
            if (!empty($step['close'])) {
                expectEof($sock, $where);
                fclose($sock);
                unset($conns[$name]);
            }
        }
    } finally {
        foreach ($conns as $sock) {
            fclose($sock);
        }
    }
}

/**
 * Reads replies until they cover $expect and compares. An $expect ending in
 * "ERR <CODE> " matches only that prefix of its last reply line (§11).
 */
function expectReplies($sock, string $expect, float $timeout, string $where): void
{
    $exact = $expect;
    $prefix = null;
    if (preg_match('/ERR [A-Z_]+ \z/', $expect, $m, \PREG_OFFSET_CAPTURE) === 1) {
        $exact = substr($expect, 0, $m[0][1]);
        $prefix = $m[0][0];
    }
    $got = '';
    while (\strlen($got) < \strlen($exact)) {
        try {
            $got .= readReply($sock, $timeout, $where);
        } catch (VectorFailure $e) {
            throw new VectorFailure($got === '' ? $e->getMessage() : $e->getMessage() . ' (after the replies "' . show($got) . '")');
        }
        if (strncmp($got, $exact, \strlen($got)) !== 0) {
            break;
        }
    }
    if ($got !== $exact) {
        throw new VectorFailure("$where: expected \"" . show($expect) . '", got "' . show($got) . '"');
    }
    if ($prefix !== null) {
        $reply = readReply($sock, $timeout, $where);
        if (strncmp($reply, $prefix, \strlen($prefix)) !== 0) {
            throw new VectorFailure("$where: expected \"" . show($expect) . '", got "' . show($got . $reply) . '"');
        }
    }
}

/** One reply: the header line and, for DATA <len>, its payload. */
function readReply($sock, float $timeout, string $where): string
{
    setTimeout($sock, $timeout);
    $line = fgets($sock, MAX_HEADER_BYTES + 1);
    if ($line === false || !str_ends_with($line, "\n")) {
        $meta = stream_get_meta_data($sock);
        $why = $meta['timed_out'] ? "no reply within {$timeout} s" : 'the connection was closed';
        $partial = $line === false ? '' : ' after "' . show($line) . '"';
        throw new VectorFailure("$where: $why$partial");
    }
    if (preg_match('/\ADATA (0|[1-9][0-9]*)[ \n]/', $line, $m) !== 1) {
        return $line;
    }
    $length = (int) $m[1];
    $payload = '';
    while (\strlen($payload) < $length) {
        $chunk = fread($sock, $length - \strlen($payload));
        if ($chunk === false || $chunk === '') {
            throw new VectorFailure("$where: payload cut short after " . \strlen($payload) . " of $length bytes");
        }
        $payload .= $chunk;
    }

    return $line . $payload;
}

function expectSilence($sock, string $where): void
{
    $read = [$sock];
    $write = $except = null;
    $seconds = (int) NO_REPLY_WINDOW_S;
    $n = stream_select($read, $write, $except, $seconds, (int) ((NO_REPLY_WINDOW_S - $seconds) * 1e6));
    if ($n === 0) {
        return;
    }
    setTimeout($sock, 0.05);
    $got = fread($sock, 4096);
    throw new VectorFailure($got === '' || $got === false
        ? "$where: expected no reply yet, but the daemon closed the connection"
        : "$where: expected no reply yet, got \"" . show($got) . '"');
}

function expectEof($sock, string $where): void
{
    setTimeout($sock, 2.0);
    $got = fread($sock, 4096);
    if ($got === '' || $got === false) {
        if (feof($sock)) {
            return;
        }
        throw new VectorFailure("$where: expected the daemon to close the connection; it stayed open");
    }
    throw new VectorFailure("$where: expected the daemon to close the connection, got \"" . show($got) . '"');
}

function setTimeout($sock, float $timeout): void
{
    $seconds = (int) $timeout;
    stream_set_timeout($sock, $seconds, (int) (($timeout - $seconds) * 1e6));
}

function show(string $bytes): string
{
    if (\strlen($bytes) > 200) {
        $bytes = substr($bytes, 0, 200) . '...';
    }

    return addcslashes($bytes, "\0..\37\177..\377\\\"");
}

exit(main($argv));
