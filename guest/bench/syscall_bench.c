/* Guest-side syscall latency microbenchmark for vmwatch's BENCHMARKS.md.
 *
 *   syscall_bench OP N [FILE]
 *
 * OP: getpid | read (pread64 of 1 byte at offset 0 of FILE) | openclose
 * (openat+close of FILE) | forkexit (fork, child _exit(0), parent wait4).
 * Prints the mean ns per operation over N iterations, timed with
 * CLOCK_MONOTONIC inside the guest. Raw syscall() so libc adds nothing. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s getpid|read|openclose|forkexit N [FILE]\n", argv[0]);
        return 2;
    }
    const char *op = argv[1];
    long n = atol(argv[2]);
    const char *file = argc > 3 ? argv[3] : "/etc/hostname";
    char buf[1];
    int fd = (int)syscall(SYS_openat, AT_FDCWD, file, O_RDONLY);
    if (fd < 0) {
        perror(file);
        return 1;
    }
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (!strcmp(op, "getpid")) {
            syscall(SYS_getpid);
        } else if (!strcmp(op, "read")) {
            if (syscall(SYS_pread64, fd, buf, 1, 0) != 1) return 1;
        } else if (!strcmp(op, "openclose")) {
            long f = syscall(SYS_openat, AT_FDCWD, file, O_RDONLY);
            if (f < 0) return 1;
            syscall(SYS_close, f);
        } else if (!strcmp(op, "forkexit")) {
            long pid = syscall(SYS_fork);
            if (pid == 0) syscall(SYS_exit_group, 0);
            if (pid < 0) return 1;
            int st;
            syscall(SYS_wait4, pid, &st, 0, NULL);
        } else {
            fprintf(stderr, "unknown op %s\n", op);
            return 2;
        }
    }
    long long t1 = now_ns();
    printf("%.1f\n", (double)(t1 - t0) / (double)n);
    return 0;
}
