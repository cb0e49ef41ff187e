<?php

declare(strict_types=1);

namespace PhpSess;

/**
 * PHP session save handler that keeps sessions in the local phpsess daemon.
 *
 * Register it with `session_set_save_handler($handler, false)` (prepend.php
 * does this for you): PHP then writes the session at the very end, after
 * object destructors, as with its files handler, so $_SESSION changes they
 * make are kept (`true` writes it in a shutdown function, before them; both
 * work). The wire protocol is protocol/PROTOCOL.md; sections are cited as §n.
 *
 * What a caller must know:
 *
 * - Address: `unix:///abs/path.sock` or `tcp://HOST:PORT`, optionally followed
 *   by `?option=value&...`; the daemon's own forms `unix:/abs/path.sock` and
 *   `tcp:HOST:PORT` (PROTOCOL.md §1), a scheme in any case and surrounding
 *   spaces are accepted too. Query options override the `$options` array.
 *   Options: `timeout` (seconds, connect and I/O, default 5), `lock` (bool,
 *   default true), `lock_wait` (seconds a locking read may wait for the lock,
 *   default 30), `persistent` (bool, default true), `lease` (wall-clock
 *   seconds the daemon lets us hold a lock; default: not sent, so the
 *   daemon's `--lock-lease-s` applies). Unknown options and malformed
 *   addresses throw \InvalidArgumentException. The lease is never derived
 *   from max_execution_time: on Linux that limit counts CPU time only, so a
 *   request waiting on I/O outlives it and would lose its lock (§6.3).
 * - If `session.save_path` starts with `unix:` or `tcp:` (in any case, after
 *   spaces) when open() is called and the `phpsess.address` php.ini setting is
 *   not set, the save path is used instead of the constructor's address (so
 *   per-pool `php_value[session.save_path]` and session_save_path() work); a
 *   malformed one fails the session with a warning naming it. Other save
 *   paths (a files directory) are ignored.
 * - Locking (the default): read() takes the session's lock and waits for it
 *   up to `lock_wait`; write(), updateTimestamp() and destroy() release it;
 *   close() releases whatever is left. A PHP process that dies releases its
 *   locks at once because the daemon sees its connection close.
 * - Round trips: a request for an existing session costs two (read; write or
 *   touch), a new session two (create; write), three with
 *   session.use_strict_mode (exists; read; write); open() and close() cost
 *   none: the connection is made by the first call that needs it, and the
 *   handshake is pipelined with its request.
 * - Timeouts: `timeout` bounds the connect and each socket read or write; a
 *   locking read may take `timeout + lock_wait`.
 * - Failures never throw from the session methods (unless an error handler
 *   turns warnings into exceptions): each raises one E_USER_WARNING naming
 *   the daemon address and the cause, drops the connection if it broke, and
 *   returns false, so session_start() or the write fails as with PHP's files
 *   handler. Session IDs never appear in messages. open() never fails: PHP
 *   sets up $_SESSION only after open() succeeds, so a failing open() would
 *   leave it undefined; a daemon that cannot be reached (or a malformed
 *   address) fails the next call instead, as with phpredis, which connects
 *   lazily. session_start() then returns false and $_SESSION is [].
 * - An unreachable daemon never changes the visitor's cookie. With
 *   session.use_strict_mode, validateId() that cannot ask the daemon says
 *   the ID is valid, so PHP keeps it and sends no Set-Cookie, and the
 *   read() of that ID that follows fails (without asking again):
 *   session_start() returns false. Saying it is invalid would make PHP send
 *   the ID create_sid() makes (an empty one when the daemon is down) before
 *   read() fails, logging the visitor out for good over a daemon restart;
 *   the files handler, whose directory is unusable, does that: it replaces
 *   the cookie with a new ID.
 * - create_sid() returns '' when the daemon cannot make the ID: the read('')
 *   PHP makes next fails and session_start() returns false (a visitor
 *   without a session gets an empty `Set-Cookie` from PHP). Neither it nor
 *   validateId() raises its warning itself: PHP would replace an exception
 *   thrown there (an error handler's) with its own Error; read() raises it,
 *   where the files handler raises its own. Only for session_create_id()
 *   inside a running session does it make the ID itself.
 * - session_regenerate_id(): write() or destroy() of the old session first
 *   has the daemon make (and lock) the new ID, on the same connection. A
 *   daemon that is stopping serves a connection only while it holds a lock
 *   (§10): holding the new ID's lock, the request regenerates and writes the
 *   new session before the daemon stops. If no ID can be had, the old
 *   session is neither written nor destroyed, and session_regenerate_id()
 *   returns false with a warning. If the connection is lost between that and
 *   create_sid() (the daemon killed), create_sid() asks again on a new
 *   connection; if there is none, it fails, and PHP throws an Error there: an
 *   ID made here, which the daemon does not hold, would only fail its write
 *   after the page ran, and the session would be lost.
 * - Reconnecting: a request sent while no lock is held, on a connection the
 *   daemon turned out to have closed (its idle_timeout_s, §10; a restart),
 *   is sent once more on a new connection, also when replies to what
 *   close() sent without waiting were still unread (those are not sent
 *   again). Never while a lock is held: a new connection would not have it.
 *   open() after close() in the same request reuses the connection if it
 *   is still open.
 * - A new session that is closed unwritten (read_and_close,
 *   session_abort()) is stored empty by close(), with a WRITE sent ahead of
 *   its CLOSE without waiting, so with session.use_strict_mode its ID stays
 *   valid, as PHP's files handler creates the file at read. New means made
 *   by create_sid(), or, when locking, found missing by read(): PHP made the
 *   ID itself (behind a wrapper that does not forward create_sid(), such as
 *   Symfony's SessionHandlerProxy) or the visitor brought an unknown one.
 * - A session destroyed by another request (session_destroy(),
 *   session_regenerate_id(true)) while this one waited for its lock stays
 *   destroyed, as with the files handler (whose flock is granted on the
 *   unlinked file): read() returns '' (the daemon says `MISS DESTROYED`,
 *   §4.1; the files handler reads the old data from the unlinked file),
 *   and what this request writes to that ID is dropped, silently, as the
 *   files handler writes it to the unlinked file; it is not stored empty
 *   at close() either. Storing it would bring a logged-out (or
 *   regenerated-away) ID back to life.
 * - With `persistent=1` (the default) PHP keeps one connection per address
 *   per process (a php-fpm worker reuses it for every web request; a new
 *   connection per request costs the daemon twice the CPU). One handler
 *   object at a time uses it: a second one for the same address (say the
 *   application's own, after prepend.php's touched the session) opens a
 *   connection of its own while the first holds the pooled one, and that
 *   connection ends with the request. A shutdown function
 *   (it runs after fatal errors too, unlike destructors) and the destructor
 *   collect the replies to requests close() sent without waiting and
 *   release locks left behind, so the next web request finds the
 *   connection clean; a stale `OK` that still arrives in front of the
 *   reply to its `HELLO` is recognised as such.
 * - session.gc_maxlifetime is each session's lifetime, at most a year
 *   (§4); 0 or less means that year too (the files handler never expires a
 *   session by itself).
 * - Not for concurrent use from several fibers.
 */
final class SessionHandler implements \SessionHandlerInterface, \SessionIdInterface, \SessionUpdateTimestampHandlerInterface
{
    public const DEFAULT_ADDRESS = 'unix:///run/phpsess/phpsess.sock';

    private const OPTION_DEFAULTS = [
        'timeout' => 5.0,
        'lock' => true,
        'lock_wait' => 30.0,
        'persistent' => true,
        'lease' => null,
    ];

    private const MAX_ID_LENGTH = 256;          // §5
    // strspn() compares every byte with the alphabet one by one in PHP 8.2
    // (268 ns for a 32-character ID, 1.3 % of all CPU under the HTTP
    // benchmark, perf); PCRE's compiled, cached pattern: 51 ns.
    private const ID_PATTERN = '/\A[A-Za-z0-9,-]+\z/';
    private const MAX_HEADER_BYTES = 1024;      // §2
    private const MAX_TTL_S = 31536000;         // §4
    private const MAX_WAIT_S = 3600.0;          // §3.2 wait_ms
    private const MAX_LEASE_S = 86400.0;        // §3.2 lease_ms
    private const FATAL_CODES = ['BAD_FRAME', 'HEADER_TOO_LONG', 'BUSY', 'SHUTTING_DOWN', 'INTERNAL']; // §9
    private const EPERM = 1;                    // errno values stream_socket_client() reports
    private const EACCES = 13;

    private string $ctorAddress;
    /** @var array<string, mixed> */
    private array $ctorOptions;
    private bool $followSavePath;

    /** The address (with its query string) the fields below were derived from. */
    private string $configuredFrom = '';
    /** For stream_socket_client and for messages: the address without its query. */
    private string $address = '';
    private bool $tcp = false;
    private float $timeout = 5.0;
    private bool $locking = true;
    private float $lockWait = 30.0;
    private bool $persistent = false;
    /** Whether the connection is PHP's pooled one for the address: see connect(). */
    private bool $pooled = false;
    private ?float $lease = null;

    /** @var resource|null */
    private $sock = null;
    /** A HELLO line to send in front of the next request (§3.2), or ''. */
    private string $hello = '';
    /**
     * Verbs (CLOSE, WRITE) of requests close() sent without waiting (§3.1,
     * §4.6), oldest first: their replies are read before the next reply.
     *
     * @var list<string>
     */
    private array $pending = [];
    /** True between sending a request and consuming its whole reply. */
    private bool $busy = false;
    private float $sockTimeout = -1.0;
    /** @var array<string, true> Session IDs whose lock this connection holds. */
    private array $locks = [];
    /**
     * The ID create_sid() made in this session cycle, or a locking read()
     * found missing, and nobody has written: it has no data (locked by us,
     * unless the daemon made it without a lock). close() stores it empty.
     */
    private ?string $newId = null;
    /** create_sid() failed and returned '': the read('') that follows fails, with the warning in $deferred. */
    private bool $createFailed = false;
    /**
     * The ID validateId() could not ask the daemon about (session_start() in
     * strict mode) and let PHP keep, or null: read() of it fails with the
     * warning validateId() kept. Saying false would make PHP replace the
     * visitor's cookie with the ID create_sid() makes (or with an empty one,
     * if the daemon cannot make one either) before read() fails: one
     * unreachable moment (a restart) would log every visitor out for good.
     * It is not read afterwards either: the daemon may be back by then, and
     * an ID nobody vouched for must not start a session in strict mode.
     */
    private ?string $unvalidated = null;
    /**
     * The ID whose locking read() the daemon answered `MISS DESTROYED`
     * (§4.1): another request destroyed the session (session_destroy(),
     * session_regenerate_id(true)) while this one waited for its lock. It
     * stays destroyed, as a file unlinked while PHP's files handler waited
     * for its flock: what this request writes to it is dropped (write()
     * sends DESTROY instead, which only releases the lock), and close() does
     * not store it empty as a new session.
     */
    private ?string $deadId = null;
    /**
     * Per address, when its daemon refused READ's DESTROYED token (one older
     * than this handler, or a cluster node forwarding to one): read() sends
     * plain READs there for PLAIN_READ_S from then on, in every request this
     * process serves (prepend.php makes a handler per request: one extra
     * round trip a minute, not one a request), and asks with the token
     * again after that (the daemon may have been upgraded).
     *
     * @var array<string, int>
     */
    private static array $plainRead = [];
    /** @var array<string, \WeakReference<self>> the handler using each address's pooled connection */
    private static array $poolUsers = [];
    private const PLAIN_READ_S = 60;
    /** A connection was dropped while it held locks: no new one (it would not hold them) until the next open(). */
    private bool $locksLost = false;
    /** While true, warn() is silent. */
    private bool $quiet = false;
    /**
     * While true, warn() keeps its first message in $deferred instead of
     * raising it: in validateId() and create_sid() of session_start(). PHP
     * replaces an exception thrown there (an error handler that turns
     * warnings into exceptions) with its own Error ("Session id must be a
     * string") and leaves $_SESSION undefined; read(''), which PHP calls
     * next, raises it instead, where the files handler raises its own.
     */
    private bool $deferring = false;
    /** The warning validateId() or create_sid() kept for read(), or ''. */
    private string $deferred = '';
    /**
     * The request is ending: our shutdown function or the destructor ran.
     * Nothing runs after PHP's own final write and close() (at module
     * shutdown, after destructors), so close() then reads the replies to
     * what it sends itself instead of leaving them to a later request.
     */
    private bool $ending = false;
    /** settle() is registered as a shutdown function of this request. */
    private bool $settling = false;
    /** Why the address open() was given cannot be used, or null: each call fails with it. */
    private ?string $unusable = null;
    /**
     * The new ID write() or destroy() had the daemon make (and lock, when
     * locking) inside session_regenerate_id(), for the create_sid() that
     * follows close() and open(). Not in $locks: close() must not release it.
     */
    private ?string $prepared = null;
    /** read() ran in this session cycle (create_sid() is then session_create_id()). */
    private bool $readDone = false;
    /** read() returned $newId: it now exists for validateId(), as a files session would. */
    private bool $newIdRead = false;

    /**
     * @param array<string, mixed> $options see the class comment
     *
     * @throws \InvalidArgumentException for a malformed address or an unknown or invalid option
     */
    public function __construct(string $address = self::DEFAULT_ADDRESS, array $options = [])
    {
        $this->ctorAddress = $address;
        $this->ctorOptions = $options;
        $cfg = get_cfg_var('phpsess.address');
        $this->followSavePath = !(\is_string($cfg) && $cfg !== '');
        $this->configure($address);
    }

    /**
     * Builds the handler from the configuration: the php.ini setting
     * `phpsess.address` if set, else `session.save_path` if it starts with
     * unix: or tcp: (see isAddress()), else DEFAULT_ADDRESS.
     *
     * @throws \InvalidArgumentException when that address is malformed
     */
    public static function fromIni(): self
    {
        $cfg = get_cfg_var('phpsess.address');
        if (\is_string($cfg) && $cfg !== '') {
            return new self($cfg);
        }
        $path = (string) ini_get('session.save_path');

        return new self(self::isAddress($path) ? $path : self::DEFAULT_ADDRESS);
    }

    /** The daemon address in use, without its query string. */
    public function getAddress(): string
    {
        return $this->address;
    }

    public function open(string $path, string $name): bool
    {
        // Never false. PHP sets up $_SESSION only after open() succeeds, so a
        // failing open() leaves it undefined (code that reads it after a
        // failed session_start() dies with a TypeError), and inside
        // session_regenerate_id() it is an Error. The first call that needs
        // the daemon connects (or reports why not), and fails as a read
        // from a missing directory does with the files handler.
        $want = $this->followSavePath && self::isAddress($path) ? $path : $this->ctorAddress;
        $this->unusable = null;
        if ($want !== $this->configuredFrom) {
            try {
                $this->configure($want);
            } catch (\InvalidArgumentException $e) {
                $this->unusable = $e->getMessage();
            }
        }
        $this->unvalidated = null;
        $this->deadId = null;
        $this->locksLost = false; // a new read takes the lock afresh
        // Reusing our own connection (open after close in this request). Unread
        // bytes or EOF mean it is out of step or gone: the next call makes a
        // new one.
        if ($this->sock !== null && ($this->busy || ($this->pending === [] && !self::isQuiet($this->sock)))) {
            $this->discard();
        }

        return true;
    }

    public function close(): bool
    {
        $newId = $this->newId;
        $this->newId = null;
        $this->createFailed = false;
        $this->unvalidated = null;
        $this->deadId = null;
        $this->deferred = '';
        $this->readDone = false;
        $this->newIdRead = false;
        // $prepared stays: inside session_regenerate_id() this close() comes
        // between the write (or destroy) that made it and create_sid().
        try {
            $this->release($newId);
        } finally {
            $this->locksLost = false; // the next session starts afresh
        }

        return true;
    }

    /** close() without its bookkeeping: stores $newId empty if set, releases the locks. */
    private function release(?string $newId): void
    {
        if ($this->sock === null) {
            return;
        }
        // A new ID closed unwritten (read_and_close, session_abort()) is stored
        // empty, as PHP's files handler creates the file at read: otherwise
        // session.use_strict_mode would refuse it and make a new one next time.
        $write = '';
        if ($newId !== null && !$this->busy && $this->hello === '') {
            $write = 'WRITE ' . $newId . ' ' . self::ttl() . " 0\n";
            unset($this->locks[$newId]); // §4.2: the WRITE releases it
        }
        if ($write === '' && $this->locks === []) {
            return;
        }
        if ($this->busy) {
            // Closing the connection releases its locks (§6.1) at no cost.
            $this->locks = [];
            $this->discard();
        } elseif (!$this->pooled) {
            if ($write !== '') {
                // One round trip: the connection ends with the request, and an
                // unanswered request might not be carried out. A failure costs
                // only the ID, so it is not worth a warning.
                $this->quiet = true;
                try {
                    $this->exchange($write, 'close');
                } finally {
                    $this->quiet = false;
                }
            }
            if ($this->locks !== []) {
                $this->locks = [];
                $this->discard(); // releases the locks at no cost
            }
        } else {
            // Sent without waiting (§3.1): the next request, or settle() at
            // the end of this one, reads the replies; once the request is
            // ending (PHP's final write and close() come after everything
            // else), they are read here.
            $request = $write . ($this->locks !== [] ? "CLOSE\n" : '');
            $this->locks = [];
            if (@fwrite($this->sock, $request) === \strlen($request)) {
                if ($write !== '') {
                    $this->pending[] = 'WRITE';
                }
                if ($request !== $write) {
                    $this->pending[] = 'CLOSE';
                }
                if ($this->ending) {
                    $this->collectPending();
                }
            } else {
                $this->discard(); // releases the locks too
            }
        }
    }

    /**
     * At the end of the request, a failed write, touch or destroy releases
     * the locks before it warns: an error handler may turn the warning into
     * an exception, PHP then never calls close(), and nothing of this
     * request runs after it (a persistent connection would carry the locks
     * into the worker's next request).
     */
    private function releaseIfEnding(): void
    {
        if ($this->ending && $this->pooled && $this->locks !== [] && !$this->busy) {
            $this->release(null);
        }
    }

    public function read(#[\SensitiveParameter] string $id): string|false
    {
        if (!self::isValidId($id)) {
            if ($id === '' && $this->createFailed) {
                // validateId() or create_sid() could not reach the daemon and
                // kept its warning for here, where the files handler warns.
                $this->createFailed = false;
                $this->warnDeferred();

                return false;
            }
            $this->deferred = '';
            $this->warnBadId();

            return false;
        }
        $unvalidated = $this->unvalidated;
        $this->unvalidated = null;
        // validateId() failed (or could not ask the daemon), and a wrapper
        // without create_sid() had PHP make the new ID itself: no read('')
        // comes, the warning is raised here.
        $this->warnDeferred();
        if ($id === $unvalidated) {
            return false; // see $unvalidated: session_start() fails, the cookie stays
        }
        $this->readDone = true;
        if ($id === $this->newId) {
            $this->newIdRead = true;

            return ''; // created and locked by CREATE: nothing to read (§4.8)
        }
        if (!$this->locking) {
            $line = $this->exchange('READ ' . $id . " NOLOCK\n", 'read');
        } elseif (time() - (self::$plainRead[$this->address] ?? -self::PLAIN_READ_S) < self::PLAIN_READ_S) {
            $line = $this->exchange('READ ' . $id . " LOCK\n", 'read', true);
        } else {
            $line = $this->exchange('READ ' . $id . " LOCK DESTROYED\n", 'read', true);
            if ($line !== null && strncmp($line, 'ERR BAD_REQUEST ', 16) === 0) {
                // A daemon older than the DESTROYED token (§4.1): ask as before.
                self::$plainRead[$this->address] = time();
                $line = $this->exchange('READ ' . $id . " LOCK\n", 'read', true);
            }
        }
        if ($line === null) {
            return false;
        }
        if (strncmp($line, 'DATA ', 5) === 0) {
            $data = $this->payload($line, 'read');
            if ($data === null) {
                return false;
            }
        } elseif ($line === "MISS\n" || ($this->locking && $line === "MISS DESTROYED\n")) {
            $data = '';
        } else {
            $this->failed('read', $line);

            return false;
        }
        if ($this->locking) {
            $this->locks[$id] = true;
            if ($line === "MISS DESTROYED\n") {
                // Destroyed while we waited for its lock: see $deadId.
                $this->deadId = $id;
            } elseif ($line === "MISS\n") {
                // A new session: PHP made the ID itself (a wrapper that does
                // not forward create_sid(), such as Symfony's
                // SessionHandlerProxy) or the visitor brought an unknown one
                // (strict mode off). As with create_sid(), close() stores it
                // empty if nothing writes it, as the files handler creates
                // the file at read; we hold its lock, so nothing else wrote it
                // meanwhile. A write or destroy in this cycle sends nothing
                // more: no round trip is added.
                $this->newId = $id;
                $this->newIdRead = true;
            }
        }

        return $data;
    }

    public function write(#[\SensitiveParameter] string $id, string $data): bool
    {
        if (!self::isValidId($id)) {
            $this->warnBadId();

            return false;
        }
        if (self::inRegenerate() && !$this->prepare()) {
            return false; // PHP: "Session write failed", regenerate returns false
        }
        if ($id === $this->deadId) {
            // Destroyed while we waited for its lock (see $deadId): the data
            // is dropped, as the files handler writes it to the unlinked
            // file. DESTROY costs the round trip the WRITE would have, and
            // releases this lock only (CLOSE would release the new ID's of
            // session_regenerate_id() too).
            $request = 'DESTROY ' . $id . "\n";
        } else {
            $request = 'WRITE ' . $id . ' ' . self::ttl() . ' ' . \strlen($data) . "\n" . $data;
        }
        $line = $this->exchange($request, 'write');
        if ($line === "OK\n") {
            unset($this->locks[$id]); // §4.2: WRITE releases the lock (DESTROY too, §4.5)
            if ($id === $this->deadId) {
                $this->deadId = null;
            }
            if ($id === $this->newId) {
                $this->newId = null;
            }

            return true;
        }

        $this->unprepare();
        if ($line !== null) {
            $this->disown($id, $line);
            $this->releaseIfEnding();
            $this->failed('write', $line);
        }

        return false;
    }

    /**
     * A write or destroy of the new session was refused because its lock is
     * no longer ours (the lease ran out, §6.3; LOCK_LOST is reported once,
     * then the daemon forgets it): close() must not store it empty over what
     * the request that got the lock since has written.
     */
    private function disown(string $id, string $line): void
    {
        if ($id === $this->newId && strncmp($line, 'ERR ', 4) === 0
            && \in_array(strtok(substr($line, 4), " \n"), ['LOCK_LOST', 'LOCKED'], true)) {
            $this->newId = null;
        }
    }

    public function updateTimestamp(#[\SensitiveParameter] string $id, string $data): bool
    {
        if (!self::isValidId($id)) {
            $this->warnBadId();

            return false;
        }
        if ($id === $this->newId || $id === $this->deadId) {
            return $this->write($id, $data); // it has no data: TOUCH would say MISS
        }
        $line = $this->exchange('TOUCH ' . $id . ' ' . self::ttl() . "\n", 'updateTimestamp');
        if ($line === "OK\n") {
            unset($this->locks[$id]);

            return true;
        }
        if ($line === "MISS\n") {
            return $this->write($id, $data); // §4.3: the lock is kept on MISS
        }

        if ($line !== null) {
            $this->releaseIfEnding();
            $this->failed('updateTimestamp', $line);
        }

        return false;
    }

    public function validateId(#[\SensitiveParameter] string $id): bool
    {
        if (!self::isValidId($id)) {
            return false;
        }
        if ($id === $this->newId) {
            // Before read(): session_regenerate_id() asking whether the ID it
            // just made collides (it is ours: no). After: session_reset() in
            // strict mode, and the session exists, as its file would.
            return $this->newIdRead;
        }
        // In session_start() (and session_reset()) PHP calls read() next,
        // which raises the warning (see $deferring). In session_create_id()
        // nothing follows: warn here.
        $this->deferring = !$this->readDone;
        try {
            $line = $this->exchange('EXISTS ' . $id . "\n", 'validateId');
            if ($line === "OK 1\n") {
                return true;
            }
            if ($line === "OK 0\n") {
                return false;
            }
            if ($line !== null) {
                $this->failed('validateId', $line);
            }
        } finally {
            $this->deferring = false;
        }
        if (!$this->readDone) {
            // session_start() (session_reset()): the visitor's ID stays, and
            // read() of it fails (see $unvalidated), so PHP sends no cookie.
            $this->unvalidated = $id;

            return true;
        }

        return false;
    }

    public function destroy(#[\SensitiveParameter] string $id): bool
    {
        if (!self::isValidId($id)) {
            $this->warnBadId();

            return false;
        }
        if (self::inRegenerate() && !$this->prepare()) {
            return false; // the old session stays; regenerate returns false
        }
        $line = $this->exchange('DESTROY ' . $id . "\n", 'destroy');
        if ($line === "OK\n") {
            unset($this->locks[$id]);
            if ($id === $this->newId) {
                $this->newId = null;
            }
            if ($id === $this->deadId) {
                $this->deadId = null;
            }

            return true;
        }

        $this->unprepare();
        if ($line !== null) {
            $this->disown($id, $line);
            $this->releaseIfEnding();
            $this->failed('destroy', $line);
        }

        return false;
    }

    public function gc(int $max_lifetime): int|false
    {
        $max = $max_lifetime < 1 ? self::MAX_TTL_S : min($max_lifetime, self::MAX_TTL_S); // as ttl()
        $line = $this->exchange('GC ' . $max . "\n", 'gc');
        if ($line === null) {
            return false;
        }
        if (strncmp($line, 'OK ', 3) === 0 && self::isDigits($count = substr($line, 3, -1))) {
            return (int) $count;
        }

        $this->failed('gc', $line);

        return false;
    }

    public function create_sid(): string
    {
        // The interface allows only a string, and throwing makes
        // session_start() throw an Error ("Session id must be a string"),
        // so no warning is raised here either (an error handler may turn it
        // into an exception). '' makes the read('') PHP calls next fail with
        // the warning kept for it: session_start() returns false (inside
        // session_regenerate_id(), PHP throws an Error).
        [$length, $bits] = self::idShape();
        if ($this->readDone) {
            // session_create_id() inside a running session: an ID for the
            // application to use later, not this cycle's session (PHP checks
            // it with validateId() and may prefix it). Nothing is created or
            // locked, as with files.
            return $this->localId($length, $bits);
        }
        if ($this->prepared !== null) {
            // session_regenerate_id(): made by write() or destroy() of the old ID.
            $sid = $this->prepared;
            $this->prepared = null;

            return $this->created($sid);
        }
        // session_start(), or session_regenerate_id() whose connection (and
        // with it the new ID's lock) was lost since write() or destroy(): if
        // the daemon cannot make the ID, fail rather than start a session
        // whose write is bound to fail after the page has run. A second
        // session_start() in the same request fails alike.
        // A warning is kept for the read('') that follows (see $deferring).
        $this->deferring = true;
        try {
            $line = $this->exchange('CREATE ' . $length . ' ' . $bits . ($this->locking ? "\n" : " NOLOCK\n"), 'create_sid');
            if ($line !== null && strncmp($line, 'OK ', 3) === 0 && self::isValidId($sid = substr($line, 3, -1))) {
                return $this->created($sid);
            }
            if ($line !== null) {
                $this->failed('create_sid', $line);
            }
        } finally {
            $this->deferring = false;
        }
        $this->createFailed = true;

        return '';
    }

    /**
     * Inside session_regenerate_id(), before the old session is written or
     * destroyed: has the daemon make (and lock) the new ID on this
     * connection, for create_sid() to return after PHP's close() and open().
     * While the connection holds a lock, a daemon that is stopping keeps
     * serving it (PROTOCOL.md §10), so the new session is written before it
     * stops; without the lock the connection would be closed between the two.
     * False, after a warning, when no ID can be had: the old session is then
     * left as it is.
     */
    private function prepare(): bool
    {
        $this->unprepare();
        [$length, $bits] = self::idShape();
        $line = $this->exchange('CREATE ' . $length . ' ' . $bits . ($this->locking ? "\n" : " NOLOCK\n"), 'session_regenerate_id');
        if ($line !== null && strncmp($line, 'OK ', 3) === 0 && self::isValidId($sid = substr($line, 3, -1))) {
            $this->prepared = $sid;

            return true;
        }
        if ($line !== null) {
            $this->failed('session_regenerate_id', $line);
        }

        return false;
    }

    /** The old session's write or destroy failed: close() releases the new ID's lock. */
    private function unprepare(): void
    {
        if ($this->prepared !== null) {
            if ($this->locking && $this->sock !== null) {
                $this->locks[$this->prepared] = true;
            }
            $this->prepared = null;
        }
    }

    /**
     * PHP's session.sid_length and session.sid_bits_per_character, within
     * what CREATE accepts (§4.8).
     *
     * @return array{int, int}
     */
    private static function idShape(): array
    {
        // PHP 8.4 deprecates these two settings; reading them is harmless.
        $length = (int) @ini_get('session.sid_length');
        if ($length < 22 || $length > self::MAX_ID_LENGTH) {
            $length = 32;
        }
        $bits = (int) @ini_get('session.sid_bits_per_character');
        if ($bits < 4 || $bits > 6) {
            $bits = 5;
        }

        return [$length, $bits];
    }

    /**
     * Whether PHP is calling us from session_regenerate_id(). Its write (or
     * destroy), close(), open(), create_sid() look exactly like
     * session_write_close() (or session_destroy()) followed by
     * session_start(): only the caller tells them apart. The first
     * session_*() function without a class up the stack is PHP's own, however
     * many handler objects wrap this one.
     */
    private static function inRegenerate(): bool
    {
        foreach (debug_backtrace(\DEBUG_BACKTRACE_IGNORE_ARGS, 16) as $frame) {
            if (!isset($frame['class']) && str_starts_with($frame['function'], 'session_')) {
                return $frame['function'] === 'session_regenerate_id';
            }
        }

        return false;
    }

    /** Bookkeeping for an ID the daemon made (and locked, when locking). */
    private function created(string $sid): string
    {
        $this->newId = $sid;
        $this->newIdRead = false;
        if ($this->locking) {
            $this->locks[$sid] = true;
        }
        $this->createFailed = false;

        return $sid;
    }

    /** A random ID made here, or '' (createFailed) if random_bytes() fails. */
    private function localId(int $length, int $bits): string
    {
        try {
            $sid = self::randomId($length, $bits);
        } catch (\Exception $e) {
            $this->warn('phpsess: create_sid failed: the daemon at ' . $this->address . ' made no session ID and random_bytes() failed: ' . self::clean($e->getMessage()));
            $this->createFailed = true;

            return '';
        }
        $this->createFailed = false;

        return $sid;
    }

    /**
     * Settles a persistent connection for the next web request in this
     * process: see settle(). Runs before PHP's final write and close() when
     * the session is still open (prepend.php registers the handler with
     * session_set_save_handler($handler, false), so changes that
     * destructors make to $_SESSION are saved, as with the files handler).
     */
    public function __destruct()
    {
        $this->settle();
    }

    /**
     * Settles a persistent connection for the next web request in this
     * process: reads the replies to requests close() sent without waiting
     * and releases locks left behind (a write() that threw means PHP never
     * called close()). The connection itself stays open unless it is out of
     * step. Runs as a shutdown function (registered by connect(); these run
     * after fatal errors too, when destructors do not) and from the
     * destructor; afterwards close() reads its own replies ($ending).
     */
    private function settle(): void
    {
        $this->ending = true;
        if (!$this->pooled || $this->sock === null) {
            return; // non-persistent connections end with the request
        }
        if (session_status() === \PHP_SESSION_ACTIVE) {
            // Still ours to write: PHP's final write and close() follow.
            // Only replies that no request collected are read (none, unless
            // the session was started without asking the daemon anything).
            if (!$this->busy) {
                $this->collectPending();
            }

            return;
        }
        if ($this->busy) {
            $this->discard();

            return;
        }
        $this->unprepare(); // a new ID create_sid() never took: release its lock
        if ($this->locks !== [] || $this->newId !== null) {
            $this->close(); // reads its replies: $ending is set
        }
        $this->collectPending();
    }

    /** Reads the replies to requests close() sent without waiting; a wrong one drops the connection. */
    private function collectPending(): void
    {
        if ($this->pending === [] || $this->sock === null) {
            return;
        }
        $this->setTimeout($this->timeout);
        while ($this->pending !== []) {
            $verb = array_shift($this->pending);
            if (!self::isPendingReply($verb, @fgets($this->sock, self::MAX_HEADER_BYTES + 1))) {
                $this->discard();

                return;
            }
        }
    }

    /**
     * Sends one request, preceded by the queued HELLO, and returns the header
     * line of its reply (with its LF). A DATA reply leaves the connection busy
     * until payload() has read the data. Returns null after a warning when the
     * connection failed; the connection is then discarded.
     *
     * Without a connection (the first call after open(), or after one was
     * dropped), one is made first, unless one holding our locks was lost in
     * this cycle: a new one would not hold them.
     *
     * A connection the daemon closed while we held no lock (its
     * idle_timeout_s, §10; a restart) is replaced, and the request sent once
     * more, with a fresh HELLO. That holds too when replies to requests
     * close() sent without waiting (read_and_close, session_abort()) were
     * still unread: their CLOSE released nothing the closed connection did
     * not release, and the empty WRITE of a new ID is not sent again (it may
     * have been carried out, and the ID used since). Never while a lock is
     * held: the new connection would not have it (§6.1), and a write would
     * go through without it.
     */
    private function exchange(#[\SensitiveParameter] string $request, string $method, bool $mayWait = false): ?string
    {
        if ($this->unusable !== null) {
            $this->warn($this->unusable . ' (fix phpsess.address or session.save_path)');

            return null;
        }
        if ($this->sock === null) {
            if ($this->locksLost) {
                $this->warn('phpsess: ' . $method . ' failed: the connection to ' . $this->address . ' was lost earlier in this request, and with it the session lock');

                return null;
            }
            $line = $this->connect() ? $this->send($request, $method, $mayWait, false) : null;

            return $line === false ? null : $line;
        }
        // The lock of an ID the daemon made for session_regenerate_id() is not in $locks.
        $mayRetry = $this->locks === [] && ($this->prepared === null || !$this->locking);
        $line = $this->send($request, $method, $mayWait, $mayRetry);
        if ($line === false) {
            $line = $this->connect() ? $this->send($request, $method, $mayWait, false) : null;
        }

        return $line === false ? null : $line;
    }

    /**
     * exchange() once. With $mayRetry, returns false without a warning when
     * the connection turns out closed before the reply to this request came
     * (it is discarded).
     */
    private function send(#[\SensitiveParameter] string $request, string $method, bool $mayWait, bool $mayRetry): string|false|null
    {
        $sock = $this->sock;
        if ($sock === null) {
            return null; // exchange() connects first; not reached
        }
        if ($this->busy) {
            // An earlier call stopped half-way (an exception from an error handler):
            // the replies on this connection are out of step with our requests.
            $this->discard();
            $this->warn('phpsess: ' . $method . ' failed: the connection to ' . $this->address . ' was left in the middle of a request and has been dropped');

            return null;
        }
        // A locking read may wait lock_wait for the lock: the socket must wait longer.
        $timeout = $mayWait ? $this->timeout + $this->lockWait : $this->timeout;
        if ($timeout !== $this->sockTimeout) {
            $this->setTimeout($timeout);
        }
        $hello = $this->hello;
        if ($hello !== '') {
            $this->hello = '';
            $request = $hello . $request;
        }
        $this->busy = true;
        if (@fwrite($sock, $request) !== \strlen($request)) {
            if ($mayRetry && !self::timedOut($sock)) {
                $this->discard();

                return false;
            }
            $this->lost($method, 'sending the request');

            return null;
        }
        while ($this->pending !== []) {
            $verb = array_shift($this->pending);
            $line = @fgets($sock, self::MAX_HEADER_BYTES + 1);
            if (!self::isPendingReply($verb, $line)) {
                if ($line === false) {
                    if ($mayRetry && !self::timedOut($sock)) {
                        $this->discard(); // see exchange(): the request is sent again, not the earlier one

                        return false;
                    }
                    $this->lost($method, 'reading the reply to an earlier ' . $verb);
                } elseif (self::isFatal($line)) {
                    $this->failed($method, $line); // §9: the daemon closes the connection
                } else {
                    $this->outOfStep($method, $verb, $line);
                }

                return null;
            }
        }
        if ($hello !== '') {
            $line = @fgets($sock, self::MAX_HEADER_BYTES + 1);
            // A reused persistent connection can still bring the replies to
            // requests an earlier web request sent without waiting and could
            // not collect (a CLOSE, when a fatal error in another shutdown
            // function kept settle() from running): each is "OK", which
            // HELLO never answers, so it is not mistaken for HELLO's reply.
            for ($stale = 0; $line === "OK\n" && $stale < 64; ++$stale) {
                $line = @fgets($sock, self::MAX_HEADER_BYTES + 1);
            }
            if ($line !== "OK 1\n") {
                if ($line === false) {
                    if ($mayRetry && !self::timedOut($sock)) {
                        $this->discard();

                        return false;
                    }
                    $this->lost($method, 'reading the reply to HELLO');

                    return null;
                }
                if (strncmp($line, 'ERR ', 4) === 0) {
                    $this->discard();
                    $this->warn('phpsess: ' . $method . ' failed: the daemon at ' . $this->address . ' refused the handshake: ' . self::clean(substr($line, 4)));

                    return null;
                }

                $this->outOfStep($method, 'HELLO', $line);

                return null;
            }
        }
        $line = @fgets($sock, self::MAX_HEADER_BYTES + 1);
        if ($line === false) {
            if ($mayRetry && !self::timedOut($sock)) {
                $this->discard();

                return false;
            }
            $this->lost($method, 'waiting for the reply');

            return null;
        }
        if ($line[-1] !== "\n") {
            if (\strlen($line) >= self::MAX_HEADER_BYTES) {
                $this->outOfStep($method, $method, $line); // no LF within MAX_HEADER_BYTES
            } else {
                $this->lost($method, 'reading the reply');
            }

            return null;
        }
        if ($line[0] !== 'D') {
            $this->busy = false;
        }

        return $line;
    }

    /** Reads the payload announced by a `DATA <len> ...` header line (§2, §8). */
    private function payload(string $line, string $method): ?string
    {
        $digits = strspn($line, '0123456789', 5);
        $after = $line[5 + $digits] ?? '';
        if ($digits === 0 || $digits > 10 || ($after !== "\n" && $after !== ' ') || ($digits > 1 && $line[5] === '0')) {
            $this->outOfStep($method, $method, $line);

            return null;
        }
        $length = (int) substr($line, 5, $digits);
        $data = '';
        while (($left = $length - \strlen($data)) > 0) {
            $chunk = @fread($this->sock, $left);
            if ($chunk === false || $chunk === '') {
                $this->lost($method, 'reading the session data');

                return null;
            }
            $data .= $chunk;
        }
        $this->busy = false;

        return $data;
    }

    private function connect(): bool
    {
        $flags = \STREAM_CLIENT_CONNECT;
        $context = null;
        $this->pooled = $this->persistent;
        if ($this->pooled) {
            // PHP keys persistent sockets by address, so each address has one
            // per process. A second handler object for the address (the
            // application's own, after prepend.php's touched the session)
            // would share it and read the other's replies: while another one
            // uses it, this one opens a connection of its own, which ends
            // with the request.
            $user = (self::$poolUsers[$this->address] ?? null)?->get();
            if ($user !== null && $user !== $this && $user->sock !== null) {
                $this->pooled = false;
            } else {
                self::$poolUsers[$this->address] = \WeakReference::create($this);
            }
        }
        if ($this->pooled) {
            $flags |= \STREAM_CLIENT_PERSISTENT;
        }
        if ($this->tcp) {
            // A CLOSE sent without waiting must not hold up the next request (Nagle).
            $context = stream_context_create(['socket' => ['tcp_nodelay' => true]]);
        }
        $errno = 0;
        $errstr = '';
        $sock = @stream_socket_client($this->address, $errno, $errstr, $this->timeout, $flags, $context);
        if ($sock !== false && $this->pooled && !self::isQuiet($sock)) {
            // A pooled connection with unread bytes or EOF: the previous web request
            // left it mid-conversation or the daemon closed it. fclose() ends it.
            @fclose($sock);
            $sock = @stream_socket_client($this->address, $errno, $errstr, $this->timeout, $flags, $context);
        }
        if ($sock === false) {
            $why = $errstr !== '' ? $errstr : 'error ' . $errno;
            if ($errno === self::EACCES || $errno === self::EPERM) {
                // The daemon is there; this PHP process may not use its socket.
                $user = self::processUser();
                $hint = ' (this PHP process' . ($user !== '' ? ' (' . $user . ')' : '') . ' may not use this socket or enter its directory: add its user to the socket\'s group, which the daemon\'s --socket-mode, 0660 by default, lets in)';
            } else {
                $hint = ' (is the phpsess daemon running?)';
            }
            $this->warn('phpsess: cannot connect to ' . $this->address . ': ' . $why . $hint);

            return false;
        }
        $this->sock = $sock;
        $this->sockTimeout = -1.0;
        $this->busy = false;
        $this->pending = [];
        $this->locks = [];
        $this->hello = $this->helloLine();
        if ($this->pooled && !$this->settling) {
            // Shutdown functions run after fatal errors too, destructors do not.
            $this->settling = true;
            register_shutdown_function(function (): void {
                $this->settle();
            });
        }

        return true;
    }

    private function helloLine(): string
    {
        $line = 'HELLO 1 wait_ms=' . (int) round($this->lockWait * 1000);
        // The lease is wall-clock time (§6.3). Without the option the daemon's
        // --lock-lease-s applies; never max_execution_time, which on Linux
        // counts CPU time only, so a request waiting on I/O outlives it.
        if ($this->lease !== null) {
            $line .= ' lease_ms=' . min(max((int) round($this->lease * 1000), 1), (int) (self::MAX_LEASE_S * 1000));
        }

        return $line . ' client=php:' . (int) getmypid() . "\n";
    }

    private function setTimeout(float $timeout): void
    {
        if ($this->sock !== null) {
            $seconds = (int) $timeout;
            stream_set_timeout($this->sock, $seconds, (int) (($timeout - $seconds) * 1e6));
        }
        $this->sockTimeout = $timeout;
    }

    /**
     * Drops the connection; the daemon releases its locks (§6.1). A new ID
     * stays new: it still has no data.
     */
    private function discard(): void
    {
        if ($this->sock !== null) {
            @fclose($this->sock); // also ends a persistent connection
        }
        if ($this->locks !== []) {
            $this->locksLost = true;
        }
        $this->prepared = null; // its lock, if any, goes with the connection: create_sid() asks anew
        $this->sock = null;
        $this->hello = '';
        $this->pending = [];
        $this->busy = false;
        $this->sockTimeout = -1.0;
        $this->locks = [];
    }

    /** The connection broke or timed out: discard it and warn. */
    private function lost(string $method, string $doing): void
    {
        $timedOut = $this->sock !== null && (stream_get_meta_data($this->sock)['timed_out'] ?? false);
        $why = $timedOut
            ? sprintf('no answer within %g s', $this->sockTimeout)
            : 'the connection was closed';
        $this->discard();
        $this->warn('phpsess: ' . $method . ' failed: lost the connection to ' . $this->address . ' while ' . $doing . ' (' . $why . ')');
    }

    /** A reply we cannot have asked for: discard the connection and warn. */
    private function outOfStep(string $method, string $verb, string $line): void
    {
        $this->discard();
        $this->warn('phpsess: ' . $method . ' failed: unexpected reply to ' . strtoupper($verb) . ' from ' . $this->address . ': "' . self::clean(substr($line, 0, 120)) . '" (is it a phpsess daemon speaking protocol 1?)');
    }

    /** Warns about an ERR reply, or a reply that makes no sense here. */
    private function failed(string $method, string $line): void
    {
        if (strncmp($line, 'ERR ', 4) !== 0) {
            $this->outOfStep($method, $method, $line);

            return;
        }
        if (self::isFatal($line)) {
            $this->discard(); // §9: the daemon closes the connection after these
        }
        $this->warn('phpsess: ' . $method . ' failed at ' . $this->address . ': ' . self::clean(substr($line, 4)));
    }

    private function warnBadId(): void
    {
        $this->warn('phpsess: Session ID is too long or contains illegal characters. Only the A-Z, a-z, 0-9, "-", and "," characters are allowed');
    }

    private function warn(string $message): void
    {
        if ($this->quiet) {
            return;
        }
        if ($this->deferring) {
            if ($this->deferred === '') {
                $this->deferred = $message;
            }

            return;
        }
        trigger_error($message, \E_USER_WARNING);
    }

    /** Raises the warning validateId() or create_sid() kept for read(), if any. */
    private function warnDeferred(): void
    {
        $message = $this->deferred;
        $this->deferred = '';
        if ($message !== '') {
            $this->warn($message);
        }
    }

    /**
     * Parses an address and merges its query options over the constructor's.
     *
     * @throws \InvalidArgumentException
     */
    private function configure(string $address): void
    {
        $options = $this->ctorOptions;
        $given = $address;
        $address = self::canonical($address);
        $base = $address;
        $q = strpos($address, '?');
        if ($q !== false) {
            $base = substr($address, 0, $q);
            foreach (explode('&', substr($address, $q + 1)) as $pair) {
                if ($pair !== '') {
                    $kv = explode('=', $pair, 2);
                    $options[rawurldecode($kv[0])] = isset($kv[1]) ? rawurldecode($kv[1]) : '1';
                }
            }
        }
        if (str_starts_with($base, 'unix://')) {
            $path = substr($base, 7);
            if ($path === '' || $path[0] !== '/' || $path === '/' || str_contains($path, "\0")) {
                throw self::badAddress($given);
            }
            $tcp = false;
        } elseif (preg_match('/\Atcp:\/\/(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})\z/', $base, $m) === 1
            && (int) $m[1] >= 1 && (int) $m[1] <= 65535) {
            $tcp = true;
        } else {
            throw self::badAddress($given);
        }

        $unknown = array_diff(array_keys($options), array_keys(self::OPTION_DEFAULTS));
        if ($unknown !== []) {
            throw new \InvalidArgumentException(sprintf(
                'phpsess: unknown option "%s" for %s; the options are %s',
                (string) reset($unknown),
                $base,
                implode(', ', array_keys(self::OPTION_DEFAULTS)),
            ));
        }
        $options += self::OPTION_DEFAULTS;
        $timeout = self::number($options['timeout'], 'timeout', 0.001, self::MAX_WAIT_S);
        $locking = self::flag($options['lock'], 'lock');
        $lockWait = self::number($options['lock_wait'], 'lock_wait', 0.0, self::MAX_WAIT_S);
        $persistent = self::flag($options['persistent'], 'persistent');
        $lease = $options['lease'] === null || $options['lease'] === ''
            ? null
            : self::number($options['lease'], 'lease', 0.001, self::MAX_LEASE_S);

        if ($this->sock !== null && ($base !== $this->address || $persistent !== $this->persistent)) {
            $this->discard();
        }
        $this->configuredFrom = $given;
        $this->address = $base;
        $this->tcp = $tcp;
        $this->timeout = $timeout;
        $this->locking = $locking;
        $this->lockWait = $lockWait;
        $this->persistent = $persistent;
        $this->lease = $lease;
    }

    private static function badAddress(string $address): \InvalidArgumentException
    {
        return new \InvalidArgumentException(sprintf(
            'phpsess: cannot use "%s" as the daemon address; expected unix:///absolute/path.sock or tcp://HOST:PORT, optionally followed by ?option=value&...',
            self::clean($address),
        ));
    }

    private static function number(mixed $value, string $name, float $min, float $max): float
    {
        if ((\is_int($value) || \is_float($value) || (\is_string($value) && is_numeric($value)))
            && is_finite((float) $value) && (float) $value >= $min && (float) $value <= $max) {
            return (float) $value;
        }
        throw new \InvalidArgumentException(sprintf(
            'phpsess: option "%s" must be a number of seconds from %g to %g, got %s',
            $name,
            $min,
            $max,
            self::clean(var_export($value, true)),
        ));
    }

    private static function flag(mixed $value, string $name): bool
    {
        if (\is_bool($value)) {
            return $value;
        }
        if (\is_int($value) || \is_string($value)) {
            $v = strtolower((string) $value);
            if (\in_array($v, ['1', 'true', 'on', 'yes'], true)) {
                return true;
            }
            if (\in_array($v, ['0', 'false', 'off', 'no'], true)) {
                return false;
            }
        }
        throw new \InvalidArgumentException(sprintf(
            'phpsess: option "%s" must be 1 or 0 (true/false, on/off, yes/no), got %s',
            $name,
            self::clean(var_export($value, true)),
        ));
    }

    /**
     * Whether a session.save_path is meant for us: it starts with unix: or
     * tcp: in any case, after spaces. Anything else (a files directory,
     * `N;/path`) belongs to another handler and is ignored.
     */
    private static function isAddress(string $path): bool
    {
        return preg_match('/\A\s*(?:unix|tcp):/i', $path) === 1;
    }

    /**
     * $address as configure() parses it: surrounding spaces trimmed, the
     * scheme in lower case, the daemon's own forms `unix:/abs/path.sock` and
     * `tcp:HOST:PORT` (PROTOCOL.md §1) written as PHP's. Other values are
     * returned trimmed, for configure() to refuse.
     */
    private static function canonical(string $address): string
    {
        $address = trim($address, " \t\n\r\v\f");
        if (preg_match('/\A(unix|tcp):(\/\/)?/i', $address, $m) !== 1) {
            return $address;
        }
        $scheme = strtolower($m[1]);
        $rest = substr($address, \strlen($m[0]));
        if (($m[2] ?? '') === '' && ($scheme === 'tcp' ? !str_starts_with($rest, '/') : str_starts_with($rest, '/'))) {
            return $scheme . '://' . $rest; // unix:/path -> unix:///path, tcp:HOST:PORT -> tcp://HOST:PORT
        }

        return $scheme . ':' . ($m[2] ?? '') . $rest;
    }

    /** The user this PHP process runs as, for messages ('' if the posix extension is missing). */
    private static function processUser(): string
    {
        if (!\function_exists('posix_geteuid')) {
            return '';
        }
        $uid = posix_geteuid();
        $user = \function_exists('posix_getpwuid') ? posix_getpwuid($uid) : false;

        return \is_array($user) ? 'user ' . self::clean((string) $user['name']) : 'uid ' . $uid;
    }

    /** §5: 1-256 characters from [A-Za-z0-9,-]. */
    private static function isValidId(string $id): bool
    {
        $length = \strlen($id);

        return $length !== 0 && $length <= self::MAX_ID_LENGTH && preg_match(self::ID_PATTERN, $id) === 1;
    }

    /** True if nothing is waiting to be read: no leftover bytes, no EOF. */
    private static function isQuiet(mixed $sock): bool
    {
        $read = [$sock];
        $write = null;
        $except = null;

        return @stream_select($read, $write, $except, 0) === 0;
    }

    /** An `ERR <CODE> ...` line whose code makes the daemon close the connection (§9). */
    private static function isFatal(string $line): bool
    {
        return strncmp($line, 'ERR ', 4) === 0
            && \in_array(strtok(substr($line, 4), " \n"), self::FATAL_CODES, true);
    }

    /**
     * Whether $line is a fitting reply to a request close() sent without
     * waiting: `OK`, or for the empty WRITE of a new ID any non-fatal error
     * (it only costs that ID).
     */
    private static function isPendingReply(string $verb, string|false $line): bool
    {
        return $line === "OK\n"
            || ($verb === 'WRITE' && \is_string($line) && str_ends_with($line, "\n")
                && strncmp($line, 'ERR ', 4) === 0 && !self::isFatal($line));
    }

    /** Whether the last read or write on $sock gave up waiting (rather than finding it closed). */
    private static function timedOut(mixed $sock): bool
    {
        return (bool) (stream_get_meta_data($sock)['timed_out'] ?? false);
    }

    /**
     * A session ID made here as PHP makes its own (ext/session
     * bin_to_readable): $length characters of $bits random bits each.
     *
     * @throws \Exception when no random bytes can be had
     */
    private static function randomId(int $length, int $bits): string
    {
        $alphabet = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,-';
        $bytes = random_bytes(intdiv($length * $bits + 7, 8));
        $mask = (1 << $bits) - 1;
        $id = '';
        $word = 0;
        $have = 0;
        $next = 0;
        for ($i = 0; $i < $length; ++$i) {
            if ($have < $bits) {
                $word |= \ord($bytes[$next++]) << $have;
                $have += 8;
            }
            $id .= $alphabet[$word & $mask];
            $word >>= $bits;
            $have -= $bits;
        }

        return $id;
    }

    /** Decimal digits only (ctype is optional in PHP builds). */
    private static function isDigits(string $s): bool
    {
        return $s !== '' && strspn($s, '0123456789') === \strlen($s);
    }

    /**
     * session.gc_maxlifetime as a lifetime the daemon takes (§4: 1 s to a
     * year). 0 or less, which PHP's files handler never expires by itself
     * (only its gc() does, which Debian never runs), is the longest there
     * is, a year, as is anything longer; silently: this runs on every
     * request.
     */
    private static function ttl(): int
    {
        $value = (string) ini_get('session.gc_maxlifetime');
        if (self::isDigits(ltrim($value, '-')) || !\function_exists('ini_parse_quantity')) {
            $ttl = (int) $value;
        } else {
            $ttl = @ini_parse_quantity($value); // "1k", "1e3" as PHP reads them (8.2+)
        }

        return $ttl < 1 || $ttl > self::MAX_TTL_S ? self::MAX_TTL_S : $ttl;
    }

    /** Printable ASCII for messages: strips the LF, escapes the rest. */
    private static function clean(string $text): string
    {
        return addcslashes(rtrim($text, "\n"), "\0..\37\177..\377\\\"");
    }
}
