/*
 * fvwork — FragVisor guest workloads (one static multi-call binary).
 *
 *   fvwork cksum [EXPECT_CPU]        deterministic checksum over a 2 MiB buffer;
 *                                    prints "FV: percpu cpu=N result=0x.. expected=0x.. ok|BAD"
 *   fvwork counter CPULIST K         one thread per CPU in CPULIST (e.g. 0,1,2,3 or 0-3),
 *                                    pinned, each does K lock-xadd increments on one
 *                                    shared counter; prints "FV: counter final=.. expected=.. ok|BAD"
 *   fvwork tscskew CPULIST ROUNDS    for every CPU c != first in CPULIST: rdtsc ping-pong
 *                                    between first and c; prints the offset interval and
 *                                    "FV: tscskew max_bound=<cycles>"
 *   fvwork cmos get IDX | set IDX V  read/write a CMOS NVRAM byte (port 0x70/0x71),
 *                                    used by the reboot test to survive a reset
 *   fvwork marker SEED WCPU RCPU ROUNDS
 *                                    a thread on WCPU fills 16 pages with the text
 *                                    "FVMARK" + SEED reversed, over and over; the main
 *                                    thread on RCPU reads each round back, so the pages
 *                                    cross hosts when the CPUs are on different ones (the
 *                                    link-security test looks for the text on the wire);
 *                                    prints "FV: marker ... ok|BAD"
 *   fvwork pinrun CPULIST CMD ARGS... run CMD; every thread and child process it
 *                                    creates is pinned, as it appears, to the next
 *                                    CPU of CPULIST in turn (the first task itself
 *                                    is not: it is the program's coordinator);
 *                                    prints "FV: pinrun tasks=N elapsed_ms=T rc=R"
 *                                    and exits with CMD's status (bench-scale.sh)
 *
 * Exit status 0 on success, 1 on a wrong result, 2 on usage/system errors.
 * Built with: gcc -O2 -static -pthread -o fvwork fvwork.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <signal.h>
#include <sys/io.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CKSUM_WORDS ((2u << 20) / 8u) /* 2 MiB of uint64_t */
#define CKSUM_PASSES 2
/* Value of cksum_run() for the constants above; checked against the host build
 * in build-initramfs.sh (fvwork cksum on the host must print the same). */
#define CKSUM_EXPECTED 0xee6a3edcc660e027ull

static int parse_cpulist(const char *s, int *out, int max)
{
    int n = 0;
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10), b;
        if (end == s || a < 0)
            return -1;
        b = a;
        if (*end == '-') {
            s = end + 1;
            b = strtol(s, &end, 10);
            if (end == s || b < a)
                return -1;
        }
        for (long c = a; c <= b; c++) {
            if (n >= max)
                return -1;
            out[n++] = (int)c;
        }
        s = end;
        if (*s == ',')
            s++;
        else if (*s)
            return -1;
    }
    return n;
}

static int pin_to(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        printf("FV: error: cannot pin to cpu %d: %s\n", cpu, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---------------- cksum ---------------- */

static uint64_t cksum_run(void)
{
    uint64_t *buf = malloc(CKSUM_WORDS * sizeof(uint64_t));
    uint64_t x = 0x9e3779b97f4a7c15ull, h = 0xcbf29ce484222325ull;
    if (!buf)
        return 0;
    for (uint32_t i = 0; i < CKSUM_WORDS; i++) { /* xorshift64 fill */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
    for (int p = 0; p < CKSUM_PASSES; p++) /* strided read-modify-write passes */
        for (uint32_t i = 0; i < CKSUM_WORDS; i++) {
            uint32_t j = (i * 2654435761u + (uint32_t)p) % CKSUM_WORDS;
            buf[j] = buf[j] * 6364136223846793005ull + buf[i];
            h = (h ^ buf[j]) * 0x100000001b3ull;
        }
    free(buf);
    return h;
}

static int cmd_cksum(int argc, char **argv)
{
    int want = argc > 2 ? atoi(argv[2]) : -1;
    uint64_t r = cksum_run();
    int cpu = sched_getcpu();
    int ok = r == CKSUM_EXPECTED && (want < 0 || cpu == want);
    printf("FV: percpu cpu=%d result=0x%016llx expected=0x%016llx %s\n", cpu,
           (unsigned long long)r, (unsigned long long)CKSUM_EXPECTED, ok ? "ok" : "BAD");
    return ok ? 0 : 1;
}

/* ---------------- counter ---------------- */

static volatile uint64_t shared_counter __attribute__((aligned(64)));
static volatile int start_flag;
static volatile int ready_count;

struct cthread {
    pthread_t t;
    int cpu;
    long k;
    int err;
};

static void *counter_thread(void *arg)
{
    struct cthread *c = arg;
    if (pin_to(c->cpu) != 0) {
        c->err = 1;
        __atomic_fetch_add(&ready_count, 1, __ATOMIC_SEQ_CST);
        return NULL;
    }
    __atomic_fetch_add(&ready_count, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&start_flag, __ATOMIC_ACQUIRE))
        ;
    for (long i = 0; i < c->k; i++)
        __atomic_fetch_add(&shared_counter, 1, __ATOMIC_SEQ_CST); /* lock xadd */
    return NULL;
}

static int cmd_counter(int argc, char **argv)
{
    int cpus[256], n;
    long k;
    if (argc < 4 || (n = parse_cpulist(argv[2], cpus, 256)) <= 0 || (k = atol(argv[3])) <= 0) {
        fprintf(stderr, "usage: fvwork counter CPULIST K\n");
        return 2;
    }
    struct cthread th[256];
    memset(th, 0, sizeof(th));
    for (int i = 0; i < n; i++) {
        th[i].cpu = cpus[i];
        th[i].k = k;
        if (pthread_create(&th[i].t, NULL, counter_thread, &th[i]) != 0) {
            printf("FV: error: pthread_create failed\n");
            return 2;
        }
    }
    while (__atomic_load_n(&ready_count, __ATOMIC_ACQUIRE) < n)
        sched_yield();
    __atomic_store_n(&start_flag, 1, __ATOMIC_RELEASE);
    int err = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i].t, NULL);
        err |= th[i].err;
    }
    uint64_t expected = (uint64_t)n * (uint64_t)k;
    int ok = !err && shared_counter == expected;
    printf("FV: counter threads=%d cpus=%s k=%ld final=%llu expected=%llu %s\n", n, argv[2], k,
           (unsigned long long)shared_counter, (unsigned long long)expected, ok ? "ok" : "BAD");
    return ok ? 0 : 1;
}

/* ---------------- marker ---------------- */

#define MARKER_PAGES 16
#define MARKER_BYTES (MARKER_PAGES * 4096)

static struct {
    char text[64];
    size_t len;
    int cpu;
    long rounds;
    char *buf;
    int err;
} mk;
/* Written by both threads; on a cache line (and a page) of its own. */
static volatile long mk_round __attribute__((aligned(4096)));
static volatile long mk_read __attribute__((aligned(64)));

static void *marker_writer(void *arg)
{
    (void)arg;
    if (pin_to(mk.cpu) != 0) {
        mk.err = 1;
        __atomic_store_n(&mk_round, -1, __ATOMIC_RELEASE);
        return NULL;
    }
    for (long r = 1; r <= mk.rounds; r++) {
        while (__atomic_load_n(&mk_read, __ATOMIC_ACQUIRE) != r - 1)
            ;
        for (size_t off = 0; off + mk.len <= MARKER_BYTES; off += mk.len)
            memcpy(mk.buf + off, mk.text, mk.len);
        __atomic_store_n(&mk_round, r, __ATOMIC_RELEASE);
    }
    return NULL;
}

static int cmd_marker(int argc, char **argv)
{
    int rcpu;
    if (argc < 6 || strlen(argv[2]) < 8 || strlen(argv[2]) > 40) {
        fprintf(stderr, "usage: fvwork marker SEED(8..40 chars) WCPU RCPU ROUNDS\n");
        return 2;
    }
    size_t n = strlen(argv[2]);
    memcpy(mk.text, "FVMARK", 6);
    for (size_t i = 0; i < n; i++)
        mk.text[6 + i] = argv[2][n - 1 - i];
    mk.len = 6 + n;
    mk.cpu = atoi(argv[3]);
    rcpu = atoi(argv[4]);
    mk.rounds = atol(argv[5]);
    mk.buf = aligned_alloc(4096, MARKER_BYTES);
    if (!mk.buf || mk.rounds <= 0 || pin_to(rcpu) != 0)
        return 2;
    memset(mk.buf, 0, MARKER_BYTES);
    pthread_t t;
    if (pthread_create(&t, NULL, marker_writer, NULL) != 0)
        return 2;
    long bad = 0;
    for (long r = 1; r <= mk.rounds; r++) {
        long got;
        while ((got = __atomic_load_n(&mk_round, __ATOMIC_ACQUIRE)) != r && got >= 0)
            ;
        if (got < 0)
            break;
        for (size_t off = 0; off + mk.len <= MARKER_BYTES; off += mk.len)
            bad += memcmp(mk.buf + off, mk.text, mk.len) != 0;
        /* Take the pages back, so the writer faults them over again. */
        for (size_t off = 0; off < MARKER_BYTES; off += 4096)
            mk.buf[off + 4095] = 0;
        __atomic_store_n(&mk_read, r, __ATOMIC_RELEASE);
    }
    pthread_join(t, NULL);
    int ok = !mk.err && !bad;
    printf("FV: marker pages=%d rounds=%ld wcpu=%d rcpu=%d mismatches=%ld %s\n", MARKER_PAGES,
           mk.rounds, mk.cpu, rcpu, bad, ok ? "ok" : "BAD");
    return ok ? 0 : 1;
}

/* ---------------- tscskew ---------------- */

static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

/* One cache line each way. seq odd = message from A, even = message from B. */
static struct {
    volatile uint64_t seq __attribute__((aligned(64)));
    volatile uint64_t tsc;
} mbox;
static volatile int pp_ready;

struct pp {
    int cpu;
    long rounds;
    int64_t min_fwd; /* min(tB_recv - tA_send) > d  (d = TSC_B - TSC_A) */
    int64_t min_bwd; /* min(tA_recv - tB_send) > -d */
    int err;
};

static void *pp_b(void *arg)
{
    struct pp *p = arg;
    if (pin_to(p->cpu) != 0) {
        p->err = 1;
        __atomic_store_n(&pp_ready, 1, __ATOMIC_RELEASE);
        return NULL;
    }
    __atomic_store_n(&pp_ready, 1, __ATOMIC_RELEASE);
    for (long r = 0; r < p->rounds; r++) {
        uint64_t want = 2 * (uint64_t)r + 1;
        while (__atomic_load_n(&mbox.seq, __ATOMIC_ACQUIRE) != want)
            ;
        uint64_t now = rdtsc_ordered();
        int64_t fwd = (int64_t)(now - mbox.tsc);
        if (fwd < p->min_fwd)
            p->min_fwd = fwd;
        mbox.tsc = rdtsc_ordered();
        __atomic_store_n(&mbox.seq, want + 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

static int cmd_tscskew(int argc, char **argv)
{
    int cpus[256], n;
    long rounds;
    if (argc < 4 || (n = parse_cpulist(argv[2], cpus, 256)) < 2 || (rounds = atol(argv[3])) <= 0) {
        fprintf(stderr, "usage: fvwork tscskew CPULIST(>=2 cpus) ROUNDS\n");
        return 2;
    }
    int64_t max_bound = 0;
    int err = 0;
    if (pin_to(cpus[0]) != 0)
        return 2;
    for (int i = 1; i < n; i++) {
        struct pp p = {.cpu = cpus[i], .rounds = rounds, .min_fwd = INT64_MAX, .min_bwd = INT64_MAX};
        pthread_t t;
        mbox.seq = 0;
        pp_ready = 0;
        if (pthread_create(&t, NULL, pp_b, &p) != 0)
            return 2;
        while (!__atomic_load_n(&pp_ready, __ATOMIC_ACQUIRE))
            sched_yield();
        for (long r = 0; r < rounds && !p.err; r++) {
            mbox.tsc = rdtsc_ordered();
            __atomic_store_n(&mbox.seq, 2 * (uint64_t)r + 1, __ATOMIC_RELEASE);
            while (__atomic_load_n(&mbox.seq, __ATOMIC_ACQUIRE) != 2 * (uint64_t)r + 2)
                ;
            uint64_t now = rdtsc_ordered();
            int64_t bwd = (int64_t)(now - mbox.tsc);
            if (bwd < p.min_bwd)
                p.min_bwd = bwd;
        }
        pthread_join(t, NULL);
        if (p.err) {
            err = 1;
            continue;
        }
        /* -min_bwd < d < min_fwd */
        int64_t lo = -p.min_bwd, hi = p.min_fwd;
        int64_t bound = (lo < 0 ? -lo : lo) > (hi < 0 ? -hi : hi) ? (lo < 0 ? -lo : lo) : (hi < 0 ? -hi : hi);
        int consistent = lo <= hi;
        printf("FV: tscskew cpu%d->cpu%d rounds=%ld offset_lo=%lld offset_hi=%lld bound=%lld%s\n",
               cpus[0], cpus[i], rounds, (long long)lo, (long long)hi, (long long)bound,
               consistent ? "" : " INCONSISTENT");
        if (bound > max_bound)
            max_bound = bound;
    }
    printf("FV: tscskew max_bound=%lld cycles\n", (long long)max_bound);
    return err ? 2 : 0;
}

/* ---------------- cmos ---------------- */

static int cmd_cmos(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: fvwork cmos get IDX | cmos set IDX VAL\n");
        return 2;
    }
    int idx = (int)strtol(argv[3], NULL, 0);
    if (idx < 0x0e || idx > 0x7f || ioperm(0x70, 2, 1) != 0) {
        fprintf(stderr, "fvwork: cmos: bad index or ioperm failed: %s\n", strerror(errno));
        return 2;
    }
    if (!strcmp(argv[2], "get")) {
        outb((unsigned char)idx, 0x70);
        printf("%d\n", inb(0x71));
        return 0;
    }
    if (!strcmp(argv[2], "set") && argc > 4) {
        outb((unsigned char)idx, 0x70);
        outb((unsigned char)strtol(argv[4], NULL, 0), 0x71);
        return 0;
    }
    return 2;
}

/* ---------------- pinrun ---------------- */

#define PIN_MAX 4096

/* The parent pid of process `pid`, or -1. */
static int ppid_of(int pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the name may hold spaces */
    int ppid;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1)
        return -1;
    return ppid;
}

static int in_tree(int pid, int root)
{
    for (int depth = 0; depth < 16 && pid > 1; depth++) {
        if (pid == root)
            return 1;
        pid = ppid_of(pid);
    }
    return 0;
}

static int seen[PIN_MAX], nseen;

static int was_seen(int tid)
{
    for (int i = 0; i < nseen; i++)
        if (seen[i] == tid)
            return 1;
    return 0;
}

/* Pin every task of the tree rooted at `root` not seen before; returns how
 * many it pinned. */
static int pin_new_tasks(int root, const int *cpus, int ncpu)
{
    DIR *proc = opendir("/proc");
    struct dirent *p;
    int before = nseen;
    if (!proc)
        return 0;
    while ((p = readdir(proc))) {
        int pid = atoi(p->d_name);
        if (pid <= 0 || !in_tree(pid, root))
            continue;
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/task", pid);
        DIR *tasks = opendir(path);
        struct dirent *t;
        if (!tasks)
            continue;
        while ((t = readdir(tasks))) {
            int tid = atoi(t->d_name);
            if (tid <= 0 || tid == root || was_seen(tid) || nseen >= PIN_MAX)
                continue;
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[nseen % ncpu], &set);
            seen[nseen++] = tid;
            sched_setaffinity(tid, sizeof(set), &set);
        }
        closedir(tasks);
    }
    closedir(proc);
    return nseen - before;
}

static int cmd_pinrun(int argc, char **argv)
{
    int cpus[1024], ncpu;
    if (argc < 4 || (ncpu = parse_cpulist(argv[2], cpus, 1024)) <= 0) {
        fprintf(stderr, "usage: fvwork pinrun CPULIST CMD [ARGS...]\n");
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t child = fork();
    if (child < 0) {
        printf("FV: error: fork: %s\n", strerror(errno));
        return 2;
    }
    if (child == 0) {
        execvp(argv[3], argv + 3);
        printf("FV: error: cannot run %s: %s\n", argv[3], strerror(errno));
        _exit(127);
    }
    /* The scanner itself stays on the first CPU (the origin's, in a
     * cluster) instead of wandering across hosts, and scans less often
     * while no new task appears: 2 ms after a new one, up to 10 ms (so the
     * end of CMD is seen within 10 ms). */
    cpu_set_t self;
    CPU_ZERO(&self);
    CPU_SET(cpus[0], &self);
    sched_setaffinity(0, sizeof(self), &self);
    int status = 0;
    useconds_t delay = 2000;
    for (;;) {
        if (pin_new_tasks(child, cpus, ncpu) > 0)
            delay = 2000;
        else
            delay = delay * 2 > 10000 ? 10000 : delay * 2;
        pid_t w = waitpid(child, &status, WNOHANG);
        if (w == child)
            break;
        if (w < 0) {
            printf("FV: error: waitpid: %s\n", strerror(errno));
            return 2;
        }
        usleep(delay);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("FV: pinrun tasks=%d elapsed_ms=%ld rc=%d\n", nseen, ms, rc);
    return rc;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        goto usage;
    if (!strcmp(argv[1], "cksum"))
        return cmd_cksum(argc, argv);
    if (!strcmp(argv[1], "counter"))
        return cmd_counter(argc, argv);
    if (!strcmp(argv[1], "tscskew"))
        return cmd_tscskew(argc, argv);
    if (!strcmp(argv[1], "cmos"))
        return cmd_cmos(argc, argv);
    if (!strcmp(argv[1], "marker"))
        return cmd_marker(argc, argv);
    if (!strcmp(argv[1], "pinrun"))
        return cmd_pinrun(argc, argv);
usage:
    fprintf(stderr, "usage: fvwork cksum [CPU] | counter CPULIST K | tscskew CPULIST ROUNDS | cmos get|set IDX [V] | marker SEED WCPU RCPU ROUNDS | pinrun CPULIST CMD...\n");
    return 2;
}
