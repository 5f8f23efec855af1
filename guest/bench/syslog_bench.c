/* syslog() and getppid() latency in the guest (BENCHMARKS.md, issue 5):
 *
 *   syslog_bench syslog N     mean ns per syslog(LOG_INFO, "bench message %d", i)
 *   syslog_bench getppid N    mean ns per getppid()
 *
 * Dynamically linked on purpose: the vault's library is preloaded (or not)
 * in front of glibc's syslog. Prints one number. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s syslog|getppid N\n", argv[0]);
        return 2;
    }
    long n = atol(argv[2]);
    if (n <= 0) return 2;
    int is_syslog = !strcmp(argv[1], "syslog");
    if (is_syslog) openlog("bench", LOG_PID, LOG_USER);
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (is_syslog)
            syslog(LOG_INFO, "bench message %ld", i);
        else
            syscall(SYS_getppid);
    }
    printf("%lld\n", (now_ns() - t0) / n);
    return 0;
}
