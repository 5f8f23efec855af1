/* Test tool for the log doorbell (hook-plugin tests): rings it with a
 * buffer of N bytes of a known pattern, as the vmwatch syslog library does:
 * cpuid with eax = 0xffff, rbx = buffer, rcx = length.
 *
 *   doorbell N [LEAF]     prints "pid=P" then rings once (LEAF default 0xffff)
 *   doorbell N LEAF COUNT [DELAY_MS]
 *                         prints "pid=P count=COUNT" then rings COUNT times,
 *                         as fast as it can or DELAY_MS apart; the buffer of
 *                         ring i (from 0) starts with "#i " (N >= 16);
 *                         then prints "pid=P ms=T" (T: time taken)
 *
 * Byte i of the buffer is 'a' + (i * 7 + i / 251) % 26 (after the "#i "). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void ring(unsigned long leaf, char *buf, long n) {
    unsigned long a = leaf, b = (unsigned long)buf, c = (unsigned long)n, d = 0;
    __asm__ volatile("cpuid" : "+a"(a), "+b"(b), "+c"(c), "+d"(d) : : "memory");
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 5) {
        fprintf(stderr, "usage: %s N [LEAF [COUNT [DELAY_MS]]]\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]);
    unsigned long leaf = argc > 2 ? strtoul(argv[2], 0, 0) : 0xffff;
    long count = argc > 3 ? atol(argv[3]) : -1;
    long delay_ms = argc > 4 ? atol(argv[4]) : 0;
    if (n < 0 || n > (1L << 24)) return 2;
    if (argc > 3 && (count < 0 || n < 16 || delay_ms < 0)) return 2;
    char *buf = malloc((size_t)n + 1);
    if (!buf) return 1;
    for (long i = 0; i < n; i++) buf[i] = (char)('a' + (i * 7 + i / 251) % 26);
    if (count < 0) {
        printf("pid=%d\n", getpid());
        fflush(stdout);
        ring(leaf, buf, n);
        return 0;
    }
    printf("pid=%d count=%ld\n", getpid(), count);
    fflush(stdout);
    struct timespec pause = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        if (i > 0 && delay_ms > 0) nanosleep(&pause, 0);
        int k = snprintf(buf, 16, "#%ld ", i);
        buf[k] = 'a'; /* snprintf's NUL */
        ring(leaf, buf, n);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("pid=%d ms=%ld\n", getpid(),
           (t1.tv_sec - t0.tv_sec) * 1000L + (t1.tv_nsec - t0.tv_nsec) / 1000000L);
    return 0;
}
