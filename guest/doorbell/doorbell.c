/* Test tool for the log doorbell (hook-plugin tests): rings it with a
 * buffer of N bytes of a known pattern, as the vmwatch syslog library does:
 * cpuid with eax = 0xffff, rbx = buffer, rcx = length.
 *
 *   doorbell N [LEAF]     prints "pid=P" then rings once (LEAF default 0xffff)
 *
 * Byte i of the buffer is 'a' + (i * 7 + i / 251) % 26. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s N [LEAF]\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]);
    unsigned long leaf = argc > 2 ? strtoul(argv[2], 0, 0) : 0xffff;
    if (n < 0 || n > (1L << 24)) return 2;
    char *buf = malloc((size_t)n + 1);
    if (!buf) return 1;
    for (long i = 0; i < n; i++) buf[i] = (char)('a' + (i * 7 + i / 251) % 26);
    printf("pid=%d\n", getpid());
    fflush(stdout);
    unsigned long a = leaf, b = (unsigned long)buf, c = (unsigned long)n, d = 0;
    __asm__ volatile("cpuid" : "+a"(a), "+b"(b), "+c"(c), "+d"(d) : : "memory");
    return 0;
}
