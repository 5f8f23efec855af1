/* Per-call syscall latency distribution for vmwatch's BENCHMARKS.md (paper
 * 001's experiment: getpid and read latency in one VM while others load the
 * host).
 *
 *   latency getpid N          time N getpid calls one by one
 *   latency read N FILE       time N pread64 calls (1 byte at offset 0) of FILE
 *   latency readloop FILE     pread64 FILE forever (the load in the other VMs)
 *
 * Prints "avg median p99 max" in ns, each call timed with CLOCK_MONOTONIC
 * inside the guest. Raw syscall() so libc adds nothing. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s getpid N | read N FILE | readloop FILE\n", argv[0]);
        return 2;
    }
    const char *op = argv[1];
    char buf[1];
    if (!strcmp(op, "readloop")) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, argv[2], O_RDONLY);
        if (fd < 0) {
            perror(argv[2]);
            return 1;
        }
        for (;;)
            syscall(SYS_pread64, fd, buf, 1, 0);
    }
    long n = atol(argv[2]);
    if (n <= 0 || n > 10000000) {
        fprintf(stderr, "N must be 1..10000000\n");
        return 2;
    }
    int fd = -1;
    if (!strcmp(op, "read")) {
        if (argc < 4) {
            fprintf(stderr, "read needs a FILE\n");
            return 2;
        }
        fd = (int)syscall(SYS_openat, AT_FDCWD, argv[3], O_RDONLY);
        if (fd < 0) {
            perror(argv[3]);
            return 1;
        }
    } else if (strcmp(op, "getpid")) {
        fprintf(stderr, "unknown op %s\n", op);
        return 2;
    }
    long long *t = malloc(sizeof(long long) * (size_t)n);
    if (!t) return 1;
    for (long i = 0; i < n; i++) {
        long long a = now_ns();
        if (fd >= 0) {
            if (syscall(SYS_pread64, fd, buf, 1, 0) != 1) return 1;
        } else {
            syscall(SYS_getpid);
        }
        t[i] = now_ns() - a;
    }
    long long sum = 0;
    for (long i = 0; i < n; i++) sum += t[i];
    qsort(t, (size_t)n, sizeof(long long), cmp);
    printf("%lld %lld %lld %lld\n", sum / n, t[n / 2], t[(n * 99) / 100], t[n - 1]);
    return 0;
}
