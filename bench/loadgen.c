/*
 * loadgen: a load generator that speaks the phpsess client protocol
 * (protocol/PROTOCOL.md) directly, for the "daemon alone" benchmark.
 *
 * One thread, epoll, non-blocking sockets.  Build:
 *
 *     gcc -std=c11 -O2 -Wall -Wextra -Werror -o loadgen bench/loadgen.c
 *
 * Usage:
 *
 *     loadgen [options] ADDRESS
 *
 * ADDRESS is unix:/abs/path.sock, /abs/path.sock, tcp:HOST:PORT or HOST:PORT.
 *
 * Model.  Each connection runs DEPTH "slots"; a slot runs one cycle at a time
 * on one of the connection's own session IDs (connections use disjoint sets,
 * and a connection never runs two cycles on one ID at once, so nothing ever
 * waits for a lock).  A cycle is a list of steps; the requests of one step are
 * sent together (pipelined) and the next step is sent when all their replies
 * are in.  Mixes:
 *
 *   rw     what PHP's SessionHandler does for one web request on an existing
 *          session: [HELLO + READ <sid> LOCK] then [WRITE <sid> <ttl> <len>]
 *          (WRITE releases the lock, so no CLOSE).  The HELLO in front of the
 *          READ is what a persistent PHP connection sends every web request;
 *          it is sent per cycle only with -H 1 (default: when DEPTH is 1;
 *          with DEPTH > 1 a HELLO would release the locks of the other cycles
 *          in flight on the connection, so the default sends HELLO only once
 *          per connection).
 *   rwc    rw on a new connection per cycle (PHP's default, persistent=0):
 *          connect, [HELLO + READ LOCK], [WRITE], close.  DEPTH must be 1.
 *   read   [READ <sid> NOLOCK]
 *   write  [WRITE <sid> <ttl> <len>]
 *
 * Closed loop by default (a slot starts its next cycle as soon as the last
 * one ends).  With -R RATE, cycles start on a fixed schedule so that RATE
 * requests per second are offered in total; latency is measured from the
 * scheduled start, so a slow daemon cannot hide its queueing delay
 * (no coordinated omission).  A cycle whose time has come waits for a free
 * slot; DEPTH x CONNS bounds the concurrency.
 *
 * --prefill writes every session once (pipelined, --prefill-depth writes in
 * flight per connection) before the timed run; with -d 0 only that is done
 * (the memory test).  The session IDs depend only on -k and the key's index,
 * so a later run with the same -k (and -c dividing it) finds them (--exist).
 *
 * Output: one JSON line on stdout.  Request latency is from sending a request
 * (or, with -R, from the scheduled start of its cycle for the first step) to
 * its reply; cycle latency from the (scheduled) start of the cycle to its last
 * reply.  Errors (any reply that is not the expected one, a closed
 * connection) are counted and the first few printed on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADER_BYTES 1024
#define READ_CHUNK (256 * 1024)
#define NO_SLOT 0xffffu
#define MAX_ERRORS_SHOWN 8

/* ------------------------------------------------------------ utilities */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* --------------------------------------------------------- histogram
 * Log-linear buckets over microseconds: exact below 256 us, then 128 buckets
 * per power of two (under 0.8 % relative error).  Percentiles report the
 * upper edge of their bucket (capped at the exact maximum).
 */

#define H_LIN 256
#define H_SUB 128
#define H_BUCKETS (H_LIN + 48 * H_SUB)

typedef struct {
    uint64_t n;
    uint64_t max;
    double sum;
    uint64_t b[H_BUCKETS];
} hist_t;

static int h_index(uint64_t v)
{
    if (v < H_LIN)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int e = msb - 7;
    int i = H_LIN + (e - 1) * H_SUB + (int)((v >> e) - H_SUB);
    return i < H_BUCKETS ? i : H_BUCKETS - 1;
}

static uint64_t h_upper(int i)
{
    if (i < H_LIN)
        return (uint64_t)i;
    int e = (i - H_LIN) / H_SUB + 1;
    uint64_t m = (uint64_t)((i - H_LIN) % H_SUB + H_SUB);
    return ((m + 1) << e) - 1;
}

static void h_record(hist_t *h, int64_t ns)
{
    uint64_t us = ns <= 0 ? 0 : (uint64_t)((ns + 500) / 1000);
    h->b[h_index(us)]++;
    h->n++;
    h->sum += (double)ns / 1000.0;
    if (us > h->max)
        h->max = us;
}

static uint64_t h_pct(const hist_t *h, double q)
{
    if (h->n == 0)
        return 0;
    uint64_t target = (uint64_t)ceil(q * (double)h->n);
    if (target < 1)
        target = 1;
    uint64_t seen = 0;
    for (int i = 0; i < H_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= target) {
            uint64_t v = h_upper(i);
            return v < h->max ? v : h->max;
        }
    }
    return h->max;
}

/* ------------------------------------------------------------- options */

enum mix { MIX_RW, MIX_RWC, MIX_READ, MIX_WRITE };
static const char *const MIX_NAMES[] = {"rw", "rwc", "read", "write"};

static struct {
    const char *address;
    int conns;
    double seconds;
    double warmup;
    int depth;
    double rate;
    enum mix mix;
    long keys;
    long vsize;
    int hello_per_cycle; /* -1: auto */
    bool prefill;
    bool exist;
    int prefill_depth;
    long ttl;
    bool verbose;
    const char *sid_suffix; /* appended to every session ID (e.g. "-a-b") */
} opt = {
    .conns = 1,
    .seconds = 10,
    .warmup = 0,
    .depth = 1,
    .rate = 0,
    .mix = MIX_RW,
    .keys = 10000,
    .vsize = 1024,
    .hello_per_cycle = -1,
    .prefill = false,
    .prefill_depth = 64,
    .ttl = 1440,
    .verbose = false,
};

static void usage(FILE *f)
{
    fputs(
        "usage: loadgen [options] ADDRESS\n"
        "  ADDRESS            unix:/path.sock, /path.sock, tcp:HOST:PORT or HOST:PORT\n"
        "  -c CONNS           connections (default 1)\n"
        "  -d SECONDS         measured duration (default 10; 0 with --prefill: fill only)\n"
        "  -w SECONDS         warm-up before measuring (default 0)\n"
        "  -P DEPTH           cycles in flight per connection (default 1 = not pipelined)\n"
        "  -R RATE            offered load in requests/s in total (default 0 = closed loop)\n"
        "  -m MIX             rw | rwc | read | write (default rw)\n"
        "  -k KEYS            distinct session IDs, split evenly over connections (default 10000)\n"
        "  -s BYTES           value size (default 1024)\n"
        "  --sid-suffix STR   append STR to every session ID, e.g. -a-b: in a cluster,\n"
        "                     sessions mastered by node a with their backup on b\n"
        "  -H 0|1             rw: HELLO in front of every READ (default 1 if DEPTH is 1)\n"
        "  -t TTL             WRITE lifetime in seconds (default 1440)\n"
        "  --prefill          write every session once before the run\n"
        "  --prefill-depth N  writes in flight per connection while prefilling (default 64)\n"
        "  --exist            the sessions exist already (written by an earlier --prefill\n"
        "                     with the same -k): a READ that says MISS is an error\n"
        "  -v                 progress on stderr every second\n",
        f);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        die("%s must be a whole number from %ld to %ld, not '%s'", what, lo, hi, s);
    return v;
}

static double parse_double(const char *s, const char *what, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= lo && v <= hi))
        die("%s must be a number from %g to %g, not '%s'", what, lo, hi, s);
    return v;
}

static void parse_options(int argc, char **argv)
{
    static const struct option longs[] = {
        {"prefill", no_argument, NULL, 'F'},
        {"exist", no_argument, NULL, 'E'},
        {"prefill-depth", required_argument, NULL, 'D'},
        {"sid-suffix", required_argument, NULL, 'S'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "c:d:w:P:R:m:k:s:H:t:vh", longs, NULL)) != -1) {
        switch (c) {
        case 'c': opt.conns = (int)parse_long(optarg, "-c", 1, 10000); break;
        case 'd': opt.seconds = parse_double(optarg, "-d", 0, 86400); break;
        case 'w': opt.warmup = parse_double(optarg, "-w", 0, 3600); break;
        case 'P': opt.depth = (int)parse_long(optarg, "-P", 1, 4096); break;
        case 'R': opt.rate = parse_double(optarg, "-R", 0, 1e9); break;
        case 'm': {
            bool found = false;
            for (int i = 0; i < (int)(sizeof MIX_NAMES / sizeof *MIX_NAMES); i++)
                if (strcmp(optarg, MIX_NAMES[i]) == 0) {
                    opt.mix = (enum mix)i;
                    found = true;
                }
            if (!found)
                die("-m must be rw, rwc, read or write, not '%s'", optarg);
            break;
        }
        case 'k': opt.keys = parse_long(optarg, "-k", 1, 1000000000L); break;
        case 's': opt.vsize = parse_long(optarg, "-s", 0, 64L * 1024 * 1024); break;
        case 'H': opt.hello_per_cycle = (int)parse_long(optarg, "-H", 0, 1); break;
        case 't': opt.ttl = parse_long(optarg, "-t", 1, 31536000L); break;
        case 'F': opt.prefill = true; break;
        case 'E': opt.exist = true; break;
        case 'D': opt.prefill_depth = (int)parse_long(optarg, "--prefill-depth", 1, 4096); break;
        case 'S':
            if (strlen(optarg) > 34 || strspn(optarg, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,-") != strlen(optarg))
                die("--sid-suffix must be at most 34 characters from A-Z a-z 0-9 , -");
            opt.sid_suffix = optarg;
            break;
        case 'v': opt.verbose = true; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        exit(2);
    }
    opt.address = argv[optind];
    if (opt.hello_per_cycle < 0)
        opt.hello_per_cycle = (opt.depth == 1 || opt.mix == MIX_RWC) ? 1 : 0;
    if (opt.mix == MIX_READ || opt.mix == MIX_WRITE)
        opt.hello_per_cycle = 0;
    if (opt.mix == MIX_RWC) {
        if (opt.depth != 1)
            die("-m rwc needs -P 1 (one cycle per connection)");
        opt.hello_per_cycle = 1;
    }
    if (opt.keys / opt.conns < opt.depth)
        die("-k %ld gives each of %d connections %ld session IDs, fewer than -P %d",
            opt.keys, opt.conns, opt.keys / opt.conns, opt.depth);
    if (opt.seconds == 0 && !opt.prefill)
        die("-d 0 only makes sense with --prefill");
}

/* ----------------------------------------------------------- addresses */

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static bool g_tcp;

static void resolve_address(const char *a)
{
    memset(&g_addr, 0, sizeof g_addr);
    const char *path = NULL;
    if (strncmp(a, "unix:", 5) == 0)
        path = a + 5;
    else if (a[0] == '/')
        path = a;
    if (path) {
        while (path[0] == '/' && path[1] == '/') /* unix:///x as PHP writes it */
            path++;
        struct sockaddr_un *un = (struct sockaddr_un *)&g_addr;
        if (strlen(path) >= sizeof un->sun_path)
            die("socket path too long: %s", path);
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, path);
        g_addrlen = (socklen_t)sizeof *un;
        g_tcp = false;
        return;
    }
    if (strncmp(a, "tcp://", 6) == 0)
        a += 6;
    else if (strncmp(a, "tcp:", 4) == 0)
        a += 4;
    char host[256];
    const char *colon = strrchr(a, ':');
    if (!colon || colon == a || (size_t)(colon - a) >= sizeof host)
        die("cannot use '%s' as an address (unix:/path.sock or tcp:HOST:PORT)", opt.address);
    memcpy(host, a, (size_t)(colon - a));
    host[colon - a] = '\0';
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = '\0';
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0)
        die("cannot resolve %s: %s", a, gai_strerror(rc));
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen);
    g_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    g_tcp = true;
}

static int open_socket(void)
{
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    for (int attempt = 0;; attempt++) {
        if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) == 0)
            break;
        /* A full accept backlog on a unix socket says EAGAIN: retry a little. */
        if ((errno == EAGAIN || errno == EINTR) && attempt < 2000) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        die("connect to %s: %s", opt.address, strerror(errno));
    }
    if (g_tcp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    return fd;
}

/* ---------------------------------------------------------- connections */

enum kind { K_HELLO, K_READ, K_WRITE };
static const char *const KIND_NAMES[] = {"HELLO", "READ", "WRITE"};

typedef struct {
    int64_t t_ref; /* latency is measured from here */
    uint16_t slot;
    uint8_t kind;
} pend_t;

typedef struct {
    int64_t t_cycle; /* (scheduled) start of the cycle */
    uint32_t key;    /* index into the connection's keys */
    uint8_t step;
    uint8_t outstanding;
    bool active;
} slot_t;

typedef struct {
    int fd;
    int id;
    bool dead;
    bool dirty;
    bool want_out;
    char *wbuf;
    size_t wlen, woff, wcap;
    char *rbuf;
    size_t rstart, rend, rcap;
    pend_t *pq;
    uint32_t pq_head, pq_tail, pq_mask;
    slot_t *slots;
    int nslots;
    long key_base;  /* global index of the first key */
    uint32_t nkeys; /* keys of this connection */
    uint32_t cursor;
    uint8_t *key_busy;
    uint32_t fill_next; /* prefill: next key to write */
} conn_t;

enum phase { PH_HELLO, PH_FILL, PH_RUN };

static conn_t *g_conns;
static int g_epfd;
static int g_timerfd = -1;
static char *g_value;
static conn_t **g_dirty;
static int g_ndirty;
static enum phase g_phase;
static int64_t g_measure_start, g_end;
static bool g_stopping;
static bool g_expect_hit; /* sessions were prefilled: a READ must find them */

static hist_t g_hreq, g_hcycle;
static uint64_t g_requests, g_cycles, g_errors, g_reconnects;
static uint64_t g_phase_replies; /* replies in the current phase (hello/fill) */
static uint64_t *g_per_sec;
static long g_nsec;
static int g_live_conns;

/* rate mode: free slots (conn << 16 | slot) waiting for a scheduled cycle */
static uint32_t *g_freeq;
static uint32_t g_fq_head, g_fq_tail, g_fq_mask;

#define SID_MAX 67 /* 32 characters, a suffix of up to 34, NUL */

static void sid_of(long gkey, char out[SID_MAX])
{
    /* 32 characters from 0-9a-v like PHP's defaults (sid_length 32, 5 bits):
       the first 13 encode a bijection of the index (unique), the rest filler. */
    static const char alphabet[] = "0123456789abcdefghijklmnopqrstuv";
    uint64_t a = splitmix64((uint64_t)gkey);
    uint64_t b = splitmix64((uint64_t)gkey ^ 0x5bd1e9955bd1e995ULL);
    for (int i = 0; i < 13; i++) {
        out[i] = alphabet[a & 31];
        a >>= 5;
    }
    for (int i = 13; i < 32; i++) {
        if (i == 25)
            b = splitmix64(b);
        out[i] = alphabet[b & 31];
        b >>= 5;
    }
    out[32] = '\0';
    if (opt.sid_suffix != NULL)
        strcat(out, opt.sid_suffix);
}

static void error_report(conn_t *c, const char *what, const char *detail, size_t dlen)
{
    g_errors++;
    if (g_errors <= MAX_ERRORS_SHOWN) {
        if (dlen > 200)
            dlen = 200;
        fprintf(stderr, "loadgen: error on connection %d: %s: ", c->id, what);
        for (size_t i = 0; i < dlen; i++) {
            unsigned char ch = (unsigned char)detail[i];
            if (ch >= 0x20 && ch < 0x7f)
                fputc(ch, stderr);
            else
                fprintf(stderr, "\\x%02x", ch);
        }
        fputc('\n', stderr);
    } else if (g_errors == MAX_ERRORS_SHOWN + 1) {
        fputs("loadgen: more errors follow; not shown\n", stderr);
    }
}

static void mark_dirty(conn_t *c)
{
    if (!c->dirty) {
        c->dirty = true;
        g_dirty[g_ndirty++] = c;
    }
}

static void wreserve(conn_t *c, size_t more)
{
    if (c->woff > 0 && c->woff == c->wlen)
        c->woff = c->wlen = 0;
    if (c->wlen + more <= c->wcap)
        return;
    if (c->woff > 0) {
        memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
        c->wlen -= c->woff;
        c->woff = 0;
        if (c->wlen + more <= c->wcap)
            return;
    }
    size_t cap = c->wcap ? c->wcap : 4096;
    while (cap < c->wlen + more)
        cap *= 2;
    c->wbuf = realloc(c->wbuf, cap);
    if (!c->wbuf)
        die("out of memory");
    c->wcap = cap;
}

static void wput(conn_t *c, const char *data, size_t n)
{
    wreserve(c, n);
    memcpy(c->wbuf + c->wlen, data, n);
    c->wlen += n;
    mark_dirty(c);
}

static void push_pending(conn_t *c, enum kind k, uint16_t slot, int64_t t_ref)
{
    if (c->pq_tail - c->pq_head > c->pq_mask)
        die("internal: pending queue overflow");
    pend_t *p = &c->pq[c->pq_tail++ & c->pq_mask];
    p->kind = (uint8_t)k;
    p->slot = slot;
    p->t_ref = t_ref;
}

static void send_hello(conn_t *c, uint16_t slot, int64_t t_ref, bool php_like)
{
    char line[128];
    int n;
    if (php_like) /* what SessionHandler::helloLine() sends */
        n = snprintf(line, sizeof line,
                     "HELLO 1 wait_ms=30000 lease_ms=35000 client=php:%d\n", 10000 + c->id);
    else
        n = snprintf(line, sizeof line, "HELLO 1 client=loadgen:%d\n", c->id);
    wput(c, line, (size_t)n);
    push_pending(c, K_HELLO, slot, t_ref);
}

static void send_read(conn_t *c, uint16_t slot, uint32_t key, bool lock, int64_t t_ref)
{
    char line[96], sid[SID_MAX];
    sid_of(c->key_base + key, sid);
    int n = snprintf(line, sizeof line, "READ %s %s\n", sid, lock ? "LOCK" : "NOLOCK");
    wput(c, line, (size_t)n);
    push_pending(c, K_READ, slot, t_ref);
}

static void send_write(conn_t *c, uint16_t slot, uint32_t key, int64_t t_ref)
{
    char line[128], sid[SID_MAX];
    sid_of(c->key_base + key, sid);
    int n = snprintf(line, sizeof line, "WRITE %s %ld %ld\n", sid, opt.ttl, opt.vsize);
    wreserve(c, (size_t)n + (size_t)opt.vsize);
    memcpy(c->wbuf + c->wlen, line, (size_t)n);
    memcpy(c->wbuf + c->wlen + (size_t)n, g_value, (size_t)opt.vsize);
    c->wlen += (size_t)n + (size_t)opt.vsize;
    mark_dirty(c);
    push_pending(c, K_WRITE, slot, t_ref);
}

static void conn_close_fd(conn_t *c)
{
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->woff = c->wlen = 0;
    c->rstart = c->rend = 0;
    c->pq_head = c->pq_tail = 0;
    c->want_out = false;
}

static void conn_open_fd(conn_t *c)
{
    c->fd = open_socket();
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void conn_kill(conn_t *c, const char *why)
{
    if (c->dead)
        return;
    error_report(c, "connection lost", why, strlen(why));
    conn_close_fd(c);
    c->dead = true;
    g_live_conns--;
    for (int i = 0; i < c->nslots; i++)
        c->slots[i].active = false;
}

/* ------------------------------------------------------------- cycles */

static uint32_t pick_key(conn_t *c)
{
    for (;;) {
        uint32_t k = c->cursor++;
        if (c->cursor >= c->nkeys)
            c->cursor = 0;
        if (!c->key_busy[k]) {
            c->key_busy[k] = 1;
            return k;
        }
    }
}

/* Sends step `s->step` of the slot's cycle. */
static void send_step(conn_t *c, uint16_t si, int64_t t_ref)
{
    slot_t *s = &c->slots[si];
    if (g_phase == PH_FILL) {
        send_write(c, si, s->key, t_ref);
        s->outstanding = 1;
        return;
    }
    switch (opt.mix) {
    case MIX_RW:
    case MIX_RWC:
        if (s->step == 0) {
            s->outstanding = 1;
            if (opt.hello_per_cycle) {
                send_hello(c, si, t_ref, true);
                s->outstanding = 2;
            }
            send_read(c, si, s->key, true, t_ref);
        } else {
            send_write(c, si, s->key, t_ref);
            s->outstanding = 1;
        }
        break;
    case MIX_READ:
        send_read(c, si, s->key, false, t_ref);
        s->outstanding = 1;
        break;
    case MIX_WRITE:
        send_write(c, si, s->key, t_ref);
        s->outstanding = 1;
        break;
    }
}

static int steps_per_cycle(void)
{
    return (opt.mix == MIX_RW || opt.mix == MIX_RWC) ? 2 : 1;
}

static int requests_per_cycle(void)
{
    if (opt.mix == MIX_RW || opt.mix == MIX_RWC)
        return 2 + (opt.hello_per_cycle ? 1 : 0);
    return 1;
}

static void start_cycle(conn_t *c, uint16_t si, int64_t t_start)
{
    slot_t *s = &c->slots[si];
    if (g_phase == PH_FILL) {
        s->key = c->fill_next++;
    } else {
        s->key = pick_key(c);
    }
    s->step = 0;
    s->active = true;
    s->t_cycle = t_start;
    if (opt.mix == MIX_RWC && g_phase == PH_RUN && c->fd < 0 && !c->dead) {
        conn_open_fd(c);
        g_reconnects++;
    }
    send_step(c, si, t_start);
}

static void freeq_push(conn_t *c, uint16_t si)
{
    g_freeq[g_fq_tail++ & g_fq_mask] = ((uint32_t)c->id << 16) | si;
}

static void slot_done(conn_t *c, uint16_t si, int64_t t)
{
    slot_t *s = &c->slots[si];
    s->active = false;
    if (g_phase == PH_FILL) {
        if (c->fill_next < c->nkeys)
            start_cycle(c, si, t);
        return;
    }
    c->key_busy[s->key] = 0;
    if (t >= g_measure_start && t < g_end) {
        g_cycles++;
        h_record(&g_hcycle, t - s->t_cycle);
    }
    if (opt.mix == MIX_RWC) /* PHP (persistent=0) closes at the end of the request */
        conn_close_fd(c);
    if (g_stopping || c->dead)
        return;
    if (opt.rate > 0)
        freeq_push(c, si);
    else
        start_cycle(c, si, t);
}

/* ------------------------------------------------------------- replies */

static bool header_is(const char *h, size_t n, const char *want)
{
    return n == strlen(want) && memcmp(h, want, n) == 0;
}

/* One complete reply: header h[0..hn) without the LF, payload pl[0..pn). */
static void on_reply(conn_t *c, const char *h, size_t hn, const char *pl, size_t pn, int64_t t)
{
    if (c->pq_head == c->pq_tail) {
        error_report(c, "reply to no request", h, hn);
        return;
    }
    pend_t p = c->pq[c->pq_head++ & c->pq_mask];
    bool ok;
    switch (p.kind) {
    case K_HELLO:
        ok = header_is(h, hn, "OK 1");
        break;
    case K_READ:
        if (header_is(h, hn, "MISS"))
            ok = !g_expect_hit;
        else
            ok = hn > 5 && memcmp(h, "DATA ", 5) == 0 && pn == (size_t)opt.vsize &&
                 memcmp(pl, g_value, pn) == 0;
        break;
    default:
        ok = header_is(h, hn, "OK");
        break;
    }
    if (!ok) {
        char what[64];
        snprintf(what, sizeof what, "unexpected reply to %s", KIND_NAMES[p.kind]);
        error_report(c, what, h, hn);
    }
    if (g_phase == PH_RUN) {
        if (t >= g_measure_start && t < g_end) {
            g_requests++;
            h_record(&g_hreq, t - p.t_ref);
            long sec = (long)((t - g_measure_start) / 1000000000);
            if (sec < g_nsec)
                g_per_sec[sec]++;
        }
    } else {
        g_phase_replies++;
    }
    if (p.slot == NO_SLOT)
        return;
    slot_t *s = &c->slots[p.slot];
    if (!s->active || s->outstanding == 0)
        die("internal: reply for an idle slot");
    if (--s->outstanding > 0)
        return;
    s->step++;
    if (g_phase == PH_RUN && s->step < steps_per_cycle()) {
        send_step(c, p.slot, t);
        return;
    }
    slot_done(c, p.slot, t);
}

static size_t parse_len(const char *s, size_t n, bool *bad)
{
    size_t v = 0, i = 0;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
        v = v * 10 + (size_t)(s[i] - '0');
        if (v > (size_t)1 << 40)
            break;
    }
    *bad = i == 0 || (i < n && s[i] != ' ') || v > (size_t)1 << 40;
    return v;
}

/* Consumes every complete reply in the read buffer. */
static void parse_replies(conn_t *c, int64_t t)
{
    while (!c->dead && c->fd >= 0 && c->rstart < c->rend) {
        char *h = c->rbuf + c->rstart;
        size_t avail = c->rend - c->rstart;
        char *lf = memchr(h, '\n', avail < MAX_HEADER_BYTES ? avail : MAX_HEADER_BYTES);
        if (!lf) {
            if (avail >= MAX_HEADER_BYTES)
                conn_kill(c, "reply header longer than 1024 bytes");
            return;
        }
        size_t hn = (size_t)(lf - h);
        size_t pn = 0;
        if (hn > 5 && memcmp(h, "DATA ", 5) == 0) {
            bool bad;
            pn = parse_len(h + 5, hn - 5, &bad);
            if (bad) {
                error_report(c, "bad DATA header", h, hn);
                conn_kill(c, "cannot frame the reply stream");
                return;
            }
        }
        if (avail < hn + 1 + pn) {
            size_t need = hn + 1 + pn;
            if (need > c->rcap) { /* a payload bigger than the buffer */
                if (c->rstart > 0) {
                    memmove(c->rbuf, h, avail);
                    c->rend = avail;
                    c->rstart = 0;
                }
                c->rcap = need + READ_CHUNK;
                c->rbuf = realloc(c->rbuf, c->rcap);
                if (!c->rbuf)
                    die("out of memory");
            }
            return;
        }
        c->rstart += hn + 1 + pn;
        bool fatal = hn >= 4 && memcmp(h, "ERR ", 4) == 0 &&
                     (strncmp(h + 4, "BAD_FRAME", 9) == 0 || strncmp(h + 4, "HEADER_TOO_LONG", 15) == 0 ||
                      strncmp(h + 4, "BUSY", 4) == 0 || strncmp(h + 4, "SHUTTING_DOWN", 13) == 0 ||
                      strncmp(h + 4, "INTERNAL", 8) == 0);
        on_reply(c, h, hn, lf + 1, pn, t);
        if (fatal)
            conn_kill(c, "fatal error reply");
    }
    if (c->rstart == c->rend)
        c->rstart = c->rend = 0;
}

static void on_readable(conn_t *c, int64_t t)
{
    if (c->rcap - c->rend < READ_CHUNK / 4 && c->rstart > 0) {
        memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
        c->rend -= c->rstart;
        c->rstart = 0;
    }
    if (c->rcap - c->rend < READ_CHUNK / 4) {
        c->rcap *= 2;
        c->rbuf = realloc(c->rbuf, c->rcap);
        if (!c->rbuf)
            die("out of memory");
    }
    ssize_t n = recv(c->fd, c->rbuf + c->rend, c->rcap - c->rend, 0);
    if (n > 0) {
        c->rend += (size_t)n;
        parse_replies(c, t);
    } else if (n == 0) {
        conn_kill(c, "the daemon closed the connection");
    } else if (errno != EAGAIN && errno != EINTR) {
        conn_kill(c, strerror(errno));
    }
}

static void flush(conn_t *c)
{
    c->dirty = false;
    if (c->fd < 0 || c->dead)
        return;
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        conn_kill(c, n < 0 ? strerror(errno) : "send returned 0");
        return;
    }
    bool want = c->woff < c->wlen;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0u), .data.ptr = c};
        epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    if (!want)
        c->woff = c->wlen = 0;
}

static void flush_dirty(void)
{
    for (int i = 0; i < g_ndirty; i++)
        flush(g_dirty[i]);
    g_ndirty = 0;
}

/* -------------------------------------------------------------- loop */

static uint64_t outstanding_total(void)
{
    uint64_t n = 0;
    for (int i = 0; i < opt.conns; i++)
        if (!g_conns[i].dead)
            n += g_conns[i].pq_tail - g_conns[i].pq_head;
    return n;
}

static void arm_timer(int64_t at)
{
    struct itimerspec its = {0};
    if (at > 0) {
        its.it_value.tv_sec = at / 1000000000;
        its.it_value.tv_nsec = at % 1000000000;
    }
    timerfd_settime(g_timerfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* Runs the event loop until done() is true or the deadline passes. */
static void event_loop(bool (*done)(void), int64_t deadline, void (*tick)(int64_t))
{
    struct epoll_event evs[256];
    int64_t next_report = now_ns() + 1000000000;
    for (;;) {
        int64_t t = now_ns();
        if (tick)
            tick(t);
        flush_dirty();
        if (done() || g_live_conns == 0)
            return;
        if (deadline && t >= deadline)
            return;
        if (opt.verbose && t >= next_report) {
            fprintf(stderr, "loadgen: phase %d requests %" PRIu64 " replies %" PRIu64
                    " errors %" PRIu64 "\n", (int)g_phase, g_requests, g_phase_replies, g_errors);
            next_report += 1000000000;
        }
        int timeout = 1000;
        if (deadline) {
            int64_t ms = (deadline - t + 999999) / 1000000;
            if (ms < timeout)
                timeout = (int)ms;
        }
        int n = epoll_wait(g_epfd, evs, (int)(sizeof evs / sizeof *evs), timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        t = now_ns();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) { /* the timer */
                uint64_t x;
                if (read(g_timerfd, &x, sizeof x) < 0 && errno != EAGAIN)
                    die("timerfd read: %s", strerror(errno));
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            if (c->dead || c->fd < 0)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c, t);
            if (!c->dead && c->fd >= 0 && (evs[i].events & EPOLLOUT))
                mark_dirty(c);
        }
    }
}

static bool hello_done(void) { return outstanding_total() == 0; }

static bool fill_done(void)
{
    if (outstanding_total() != 0)
        return false;
    for (int i = 0; i < opt.conns; i++)
        if (!g_conns[i].dead && g_conns[i].fill_next < g_conns[i].nkeys)
            return false;
    return true;
}

static bool run_done(void) { return false; }

/* rate mode */
static int64_t g_t0;
static double g_interval_ns;
static uint64_t g_k;

static bool g_announced;

/* Tells a supervisor (bench/daemon.py) when the measured window starts. */
static void announce(int64_t t)
{
    if (!g_announced && t >= g_measure_start) {
        g_announced = true;
        fputs("loadgen: measuring\n", stderr);
    }
}

static void rate_tick(int64_t t)
{
    announce(t);
    if (t >= g_end) {
        g_stopping = true;
        return;
    }
    for (;;) {
        int64_t due = g_t0 + (int64_t)((double)g_k * g_interval_ns);
        if (due >= g_end)
            return;
        if (due > t) {
            if (g_fq_head != g_fq_tail)
                arm_timer(due);
            return;
        }
        if (g_fq_head == g_fq_tail)
            return; /* late: the cycle waits for a slot, its latency counts from `due` */
        uint32_t e = g_freeq[g_fq_head++ & g_fq_mask];
        conn_t *c = &g_conns[e >> 16];
        if (c->dead)
            continue;
        start_cycle(c, (uint16_t)(e & 0xffff), due);
        g_k++;
    }
}

static void closed_tick(int64_t t)
{
    announce(t);
    if (t >= g_end)
        g_stopping = true;
}

/* -------------------------------------------------------------- main */

static void print_hist(FILE *f, const char *prefix, const hist_t *h)
{
    fprintf(f, ",\"%sp50_us\":%" PRIu64 ",\"%sp90_us\":%" PRIu64 ",\"%sp99_us\":%" PRIu64
            ",\"%sp999_us\":%" PRIu64 ",\"%smax_us\":%" PRIu64 ",\"%smean_us\":%.1f",
            prefix, h_pct(h, 0.50), prefix, h_pct(h, 0.90), prefix, h_pct(h, 0.99),
            prefix, h_pct(h, 0.999), prefix, h->max, prefix, h->n ? h->sum / (double)h->n : 0.0);
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    resolve_address(opt.address);

    g_value = xmalloc((size_t)opt.vsize + 1);
    /* Binary on purpose: NUL, LF and 0xFF all occur. */
    uint64_t r = 0x1234567;
    for (long i = 0; i < opt.vsize; i++) {
        r = splitmix64(r);
        g_value[i] = (char)(r & 0xff);
    }

    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g_epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    g_timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (g_timerfd < 0)
        die("timerfd_create: %s", strerror(errno));
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(g_epfd, EPOLL_CTL_ADD, g_timerfd, &tev);

    int nslots = opt.depth > opt.prefill_depth ? opt.depth : opt.prefill_depth;
    uint32_t pq_size = 1;
    while (pq_size < (uint32_t)(2 * nslots + 8))
        pq_size <<= 1;
    long per_conn = opt.keys / opt.conns;
    g_conns = xmalloc(sizeof *g_conns * (size_t)opt.conns);
    g_dirty = xmalloc(sizeof *g_dirty * (size_t)opt.conns);
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &g_conns[i];
        c->id = i;
        c->fd = -1;
        c->rcap = READ_CHUNK;
        c->rbuf = xmalloc(c->rcap);
        c->pq_mask = pq_size - 1;
        c->pq = xmalloc(sizeof *c->pq * pq_size);
        c->nslots = nslots;
        c->slots = xmalloc(sizeof *c->slots * (size_t)nslots);
        c->key_base = (long)i * per_conn;
        c->nkeys = (uint32_t)per_conn;
        c->key_busy = xmalloc((size_t)per_conn);
        conn_open_fd(c);
        g_live_conns++;
    }

    /* Handshake once per connection. */
    g_phase = PH_HELLO;
    for (int i = 0; i < opt.conns; i++)
        send_hello(&g_conns[i], NO_SLOT, now_ns(), false);
    event_loop(hello_done, now_ns() + 30 * 1000000000LL, NULL);
    if (!hello_done())
        die("no reply to HELLO within 30 s");

    g_expect_hit = opt.exist;
    double fill_s = 0;
    uint64_t filled = 0;
    if (opt.prefill) {
        g_phase = PH_FILL;
        g_phase_replies = 0;
        int64_t t = now_ns();
        for (int i = 0; i < opt.conns; i++) {
            conn_t *c = &g_conns[i];
            for (int s = 0; s < opt.prefill_depth && c->fill_next < c->nkeys; s++)
                start_cycle(c, (uint16_t)s, t);
        }
        event_loop(fill_done, 0, NULL);
        filled = g_phase_replies;
        fill_s = (double)(now_ns() - t) / 1e9;
        g_expect_hit = true;
        fprintf(stderr, "loadgen: prefilled %" PRIu64 " sessions in %.2f s (%.0f writes/s)\n",
                filled, fill_s, fill_s > 0 ? (double)filled / fill_s : 0.0);
        for (int i = 0; i < opt.conns; i++)
            for (int s = 0; s < nslots; s++)
                g_conns[i].slots[s].active = false;
    }

    double measured = 0;
    if (opt.seconds > 0) {
        g_phase = PH_RUN;
        int64_t t = now_ns();
        g_measure_start = t + (int64_t)(opt.warmup * 1e9);
        g_end = g_measure_start + (int64_t)(opt.seconds * 1e9);
        g_nsec = (long)ceil(opt.seconds) + 1;
        g_per_sec = xmalloc(sizeof *g_per_sec * (size_t)g_nsec);
        if (opt.mix == MIX_RWC)
            for (int i = 0; i < opt.conns; i++)
                conn_close_fd(&g_conns[i]); /* every cycle opens its own */
        if (opt.rate > 0) {
            uint32_t fq = 1;
            while (fq < (uint32_t)(opt.conns * opt.depth))
                fq <<= 1;
            g_fq_mask = fq - 1;
            g_freeq = xmalloc(sizeof *g_freeq * fq);
            for (int s = 0; s < opt.depth; s++)
                for (int i = 0; i < opt.conns; i++)
                    freeq_push(&g_conns[i], (uint16_t)s);
            g_t0 = t;
            g_interval_ns = 1e9 * requests_per_cycle() / opt.rate;
            event_loop(run_done, g_end, rate_tick);
        } else {
            for (int i = 0; i < opt.conns; i++)
                for (int s = 0; s < opt.depth; s++)
                    start_cycle(&g_conns[i], (uint16_t)s, t);
            event_loop(run_done, g_end, closed_tick);
        }
        int64_t stop = now_ns();
        fputs("loadgen: measured\n", stderr);
        measured = (double)((stop < g_end ? stop : g_end) - g_measure_start) / 1e9;
        if (measured <= 0)
            measured = 1e-9;
    }

    printf("{\"mix\":\"%s\",\"conns\":%d,\"depth\":%d,\"hello_per_cycle\":%s,\"rate\":%.0f,"
           "\"value_bytes\":%ld,\"keys\":%ld",
           MIX_NAMES[opt.mix], opt.conns, opt.depth, opt.hello_per_cycle ? "true" : "false",
           opt.rate, opt.vsize, per_conn * opt.conns);
    printf(",\"prefilled\":%" PRIu64 ",\"prefill_s\":%.3f", filled, fill_s);
    printf(",\"requests\":%" PRIu64 ",\"seconds\":%.3f,\"rps\":%.1f,\"cycles\":%" PRIu64
           ",\"cps\":%.1f,\"errors\":%" PRIu64 ",\"reconnects\":%" PRIu64,
           g_requests, measured, measured > 0 ? (double)g_requests / measured : 0.0, g_cycles,
           measured > 0 ? (double)g_cycles / measured : 0.0, g_errors, g_reconnects);
    print_hist(stdout, "", &g_hreq);
    print_hist(stdout, "cycle_", &g_hcycle);
    printf(",\"per_sec\":[");
    for (long i = 0; i < g_nsec && (double)i < opt.seconds; i++)
        printf("%s%" PRIu64, i ? "," : "", g_per_sec[i]);
    printf("]}\n");
    fflush(stdout);
    for (int i = 0; i < opt.conns; i++)
        if (g_conns[i].fd >= 0)
            close(g_conns[i].fd);
    return g_live_conns == 0 ? 1 : 0;
}
