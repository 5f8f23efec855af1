/*
 * vmwatch's scripted syscall program (issue 3 tests).
 *
 * Build (static, so no dynamic loader adds syscalls of its own):
 *     gcc -static -O1 -o syscalls syscalls.c        (static glibc: Debian's libc6-dev)
 *
 * Run as `/tmp/syscalls` in a lab guest. It makes a known sequence of system
 * calls, each through the `syscall` instruction with the number spelled out
 * (never a libc wrapper, which may pick another syscall: glibc's fork() is
 * clone, open() is openat), and prints one ground-truth line per call:
 *
 *     <tgid> <tid> <syscall> <key arguments> = <result> [<outputs>]
 *
 * with what the calling process itself saw: its pid from getpid, the result
 * the kernel returned (negative errno on failure), fds as
 * `<fd><</proc/self/fd path>>#<major>:<minor>:<inode>` (readlink + fstat of
 * the fd around the call), socket addresses as `a.b.c.d:port`, addresses in
 * hex. `exit_group`/`exit` print `= ?` (they do not return).
 *
 * Each process starts its script with a marker call (`getppid`) so a reader
 * can skip libc's startup; the vfork-style clone child starts with its
 * `execve` (of this program, with the argument `phase2`), then the second
 * phase's own marker.
 *
 * Ground-truth lines go out with `writev(1, ...)`, which the script does not
 * use otherwise. The program uses no stdio and no malloc (no hidden brk/mmap);
 * it checks the data it moved itself and exits with status 1 (after a
 * `FAIL ...` line) if anything differs from what it expects.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>

/* One raw system call: the number in rax, arguments in rdi, rsi, rdx, r10,
 * r8, r9; the result as the kernel returns it (no errno). */
static long sc6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sc0(n) sc6(n, 0, 0, 0, 0, 0, 0)
#define sc1(n, a) sc6(n, (long)(a), 0, 0, 0, 0, 0)
#define sc2(n, a, b) sc6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sc3(n, a, b, c) sc6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sc4(n, a, b, c, d) sc6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sc5(n, a, b, c, d, e) sc6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)
#define scx(n, a, b, c, d, e, f) \
    sc6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static int failed;

/* Writes one line to stdout with writev (not part of the script). */
static void line(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    struct iovec iov = {buf, (size_t)n};
    sc3(SYS_writev, 1, &iov, 1);
}

#define FAIL(...)                  \
    do {                           \
        line("FAIL " __VA_ARGS__); \
        failed = 1;                \
    } while (0)

/* The identity of an fd as the process sees it: `3</tmp/x>#0:2:1234`. */
struct fdid {
    char s[300];
};

static struct fdid fdid(long fd)
{
    struct fdid id;
    char link[64], path[256];
    snprintf(link, sizeof link, "/proc/self/fd/%ld", fd);
    long n = sc3(SYS_readlink, link, path, sizeof path - 1);
    if (n < 0)
        n = 0;
    path[n] = 0;
    struct stat st;
    if (sc2(SYS_fstat, fd, &st) < 0)
        memset(&st, 0, sizeof st);
    snprintf(id.s, sizeof id.s, "%ld<%s>#%u:%u:%lu", fd, path, major(st.st_dev), minor(st.st_dev),
             (unsigned long)st.st_ino);
    return id;
}

/* The result of an fd-returning call: the fd's identity, or the error. */
static struct fdid fdres(long r)
{
    if (r >= 0)
        return fdid(r);
    struct fdid id;
    snprintf(id.s, sizeof id.s, "%ld", r);
    return id;
}

static const char *addr_str(const struct sockaddr_in *a, char *out)
{
    unsigned ip = ntohl(a->sin_addr.s_addr);
    sprintf(out, "%u.%u.%u.%u:%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255,
            ntohs(a->sin_port));
    return out;
}

static struct sockaddr_in loopback(unsigned port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

#define FILE_LEN 5000
static char pattern(long i)
{
    return (char)('a' + (i * 7) % 26);
}

static void exit_group(long pid, int code)
{
    line("%ld %ld exit_group code=%d = ?", pid, pid, code);
    sc1(SYS_exit_group, code);
    for (;;)
        ;
}

/* ---- clone with a new stack (no libc in the child) ---- */

static char vfork_stack[64 * 1024] __attribute__((aligned(16)));
static char thread_stack[64 * 1024] __attribute__((aligned(16)));

/* clone(flags, stack): the child execve(path, argv, envp)s at once (exit
 * status 127 if that fails). Returns the child's pid in the parent. */
static long clone_exec(long flags, void *stack, const char *path, char *const argv[],
                       char *const envp[])
{
    register long r10 __asm__("r10") = 0;
    register long r8 __asm__("r8") = 0;
    long ret;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov %[path], %%rdi\n\t"
                     "mov %[argv], %%rsi\n\t"
                     "mov %[envp], %%rdx\n\t"
                     "mov $59, %%eax\n\t"
                     "syscall\n\t"
                     "mov $127, %%edi\n\t"
                     "mov $231, %%eax\n\t"
                     "syscall\n\t"
                     "hlt\n"
                     "1:\n\t"
                     : "=a"(ret)
                     : "a"((long)SYS_clone), "D"(flags), "S"(stack), "d"(0L), "r"(r10), "r"(r8),
                       [path] "r"(path), [argv] "r"(argv), [envp] "r"(envp)
                     : "rcx", "r11", "memory");
    return ret;
}

/* clone(flags, stack, ptid, ctid, 0): the child runs fn(arg) on `stack`, then
 * exit(fn's result). */
static long clone_fn(long flags, void *stack, int *ptid, int *ctid, int (*fn)(void *), void *arg)
{
    register long r10 __asm__("r10") = (long)ctid;
    register long r8 __asm__("r8") = 0;
    long ret;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov %[arg], %%rdi\n\t"
                     "call *%[fn]\n\t"
                     "mov %%eax, %%edi\n\t"
                     "mov $60, %%eax\n\t"
                     "syscall\n\t"
                     "hlt\n"
                     "1:\n\t"
                     : "=a"(ret)
                     : "a"((long)SYS_clone), "D"(flags), "S"(stack), "d"(ptid), "r"(r10), "r"(r8),
                       [fn] "r"(fn), [arg] "r"(arg)
                     : "rcx", "r11", "memory");
    return ret;
}

/* What the thread did, for the parent to print (the thread has no TLS of its
 * own, so it makes raw calls only and formats nothing). */
struct thread_log {
    int fd;
    long tid;
    long wrote;
};

static int thread_main(void *arg)
{
    struct thread_log *t = arg;
    t->tid = sc0(SYS_gettid);
    t->wrote = sc3(SYS_write, t->fd, "thr", 3);
    return 0;
}

/* ---- the second phase: the vfork-style clone child after its execve ---- */

static int phase2(char **argv)
{
    long ppid = sc0(SYS_getppid);
    long pid = sc0(SYS_getpid);
    char args[512] = "";
    for (int i = 0; argv[i]; i++) {
        if (i)
            strncat(args, ",", sizeof args - strlen(args) - 1);
        strncat(args, argv[i], sizeof args - strlen(args) - 1);
    }
    line("%ld %ld execve path=%s argv=%s = 0", pid, pid, argv[0], args);
    line("%ld %ld getppid = %ld", pid, pid, ppid);
    line("%ld %ld getpid = %ld", pid, pid, pid);

    long fd = sc4(SYS_openat, AT_FDCWD, "/tmp/sc-a", O_RDONLY | O_CLOEXEC, 0);
    line("%ld %ld openat path=/tmp/sc-a flags=0x%x = %s", pid, pid, O_RDONLY | O_CLOEXEC,
         fdres(fd).s);
    struct fdid id = fdid(fd);
    long addr = scx(SYS_mmap, 0, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    line("%ld %ld mmap len=4096 prot=0x%x flags=0x%x fd=%s off=0 = 0x%lx", pid, pid, PROT_READ,
         MAP_PRIVATE, id.s, addr);
    long r = sc1(SYS_close, fd);
    line("%ld %ld close fd=%s = %ld", pid, pid, id.s, r);
    if (addr < 0 && addr > -4096) {
        FAIL("mmap %ld", addr);
    } else {
        const char *m = (const char *)addr;
        for (long i = 0; i < 4096; i++)
            if (m[i] != pattern(i)) {
                FAIL("mapped byte %ld", i);
                break;
            }
    }
    r = sc2(SYS_munmap, addr, 4096);
    line("%ld %ld munmap addr=0x%lx len=4096 = %ld", pid, pid, addr, r);
    exit_group(pid, failed ? 1 : 11);
    return 0;
}

/* ---- the first phase ---- */

/* wait4 for `child`, which must have exited with `want_status` (or, if
 * negative, been killed by signal -want_status). */
static long wait_child(long pid, long child, int want_status)
{
    int status = -1;
    long r = sc4(SYS_wait4, child, &status, 0, 0);
    line("%ld %ld wait4 pid=%ld = %ld", pid, pid, child, r);
    int ok = want_status >= 0 ? WIFEXITED(status) && WEXITSTATUS(status) == want_status
                              : WIFSIGNALED(status) && WTERMSIG(status) == -want_status;
    if (!ok)
        FAIL("child %ld status 0x%x, want %d", child, status, want_status);
    return r;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    sc2(SYS_nanosleep, &ts, 0);
}

int main(int argc, char **argv, char **envp)
{
    if (argc > 1 && strcmp(argv[1], "phase2") == 0)
        return phase2(argv);

    long ppid = sc0(SYS_getppid); /* marker: libc's startup is over */
    long pid = sc0(SYS_getpid);
    line("%ld %ld getppid = %ld", pid, pid, ppid);
    line("%ld %ld getpid = %ld", pid, pid, pid);

    /* Files: write one, read it back, copy it, rename and remove the copy. */
    char data[FILE_LEN], buf[4096];
    for (long i = 0; i < FILE_LEN; i++)
        data[i] = pattern(i);
    int wflags = O_WRONLY | O_CREAT | O_TRUNC;
    long fa = sc4(SYS_openat, AT_FDCWD, "/tmp/sc-a", wflags, 0644);
    struct fdid ida = fdres(fa);
    line("%ld %ld openat path=/tmp/sc-a flags=0x%x = %s", pid, pid, wflags, ida.s);
    long r = sc3(SYS_write, fa, data, FILE_LEN);
    line("%ld %ld write fd=%s count=%d = %ld", pid, pid, ida.s, FILE_LEN, r);
    r = sc1(SYS_close, fa);
    line("%ld %ld close fd=%s = %ld", pid, pid, ida.s, r);

    long fr = sc4(SYS_openat, AT_FDCWD, "/tmp/sc-a", O_RDONLY, 0);
    struct fdid idr = fdres(fr);
    line("%ld %ld openat path=/tmp/sc-a flags=0x%x = %s", pid, pid, O_RDONLY, idr.s);
    r = sc3(SYS_read, fr, buf, 100);
    line("%ld %ld read fd=%s count=100 = %ld", pid, pid, idr.s, r);
    if (r != 100 || memcmp(buf, data, 100) != 0)
        FAIL("read");
    r = sc4(SYS_pread64, fr, buf, 50, 1000);
    line("%ld %ld pread64 fd=%s count=50 off=1000 = %ld", pid, pid, idr.s, r);
    if (r != 50 || memcmp(buf, data + 1000, 50) != 0)
        FAIL("pread64");

    long fb = sc4(SYS_openat, AT_FDCWD, "/tmp/sc-b", wflags, 0600);
    struct fdid idb = fdres(fb);
    line("%ld %ld openat path=/tmp/sc-b flags=0x%x = %s", pid, pid, wflags, idb.s);
    long long off_in = 0;
    r = scx(SYS_copy_file_range, fr, &off_in, fb, 0, FILE_LEN, 0);
    line("%ld %ld copy_file_range in=%s out=%s len=%d = %ld", pid, pid, idr.s, idb.s, FILE_LEN,
         r);
    if (r != FILE_LEN || off_in != FILE_LEN)
        FAIL("copy_file_range %ld %lld", r, off_in);
    r = sc1(SYS_close, fb);
    line("%ld %ld close fd=%s = %ld", pid, pid, idb.s, r);
    r = sc5(SYS_renameat2, AT_FDCWD, "/tmp/sc-b", AT_FDCWD, "/tmp/sc-c", RENAME_NOREPLACE);
    line("%ld %ld renameat2 old=/tmp/sc-b new=/tmp/sc-c flags=0x%x = %ld", pid, pid,
         RENAME_NOREPLACE, r);
    r = sc5(SYS_renameat2, AT_FDCWD, "/tmp/sc-b", AT_FDCWD, "/tmp/sc-c", RENAME_NOREPLACE);
    line("%ld %ld renameat2 old=/tmp/sc-b new=/tmp/sc-c flags=0x%x = %ld", pid, pid,
         RENAME_NOREPLACE, r);
    r = sc1(SYS_unlink, "/tmp/sc-c");
    line("%ld %ld unlink path=/tmp/sc-c = %ld", pid, pid, r);
    r = sc1(SYS_unlink, "/tmp/sc-c");
    line("%ld %ld unlink path=/tmp/sc-c = %ld", pid, pid, r);

    /* A pipe, written through a dup2'd copy of its write end. */
    int p[2] = {-1, -1};
    r = sc2(SYS_pipe2, p, O_CLOEXEC);
    line("%ld %ld pipe2 flags=0x%x = %ld fds=%d,%d", pid, pid, O_CLOEXEC, r, p[0], p[1]);
    struct fdid idp0 = fdid(p[0]), idp1 = fdid(p[1]);
    r = sc2(SYS_dup2, p[1], 10);
    line("%ld %ld dup2 old=%s new=10 = %s", pid, pid, idp1.s, fdres(r).s);
    struct fdid id10 = fdid(10);
    r = sc3(SYS_write, 10, "ping", 4);
    line("%ld %ld write fd=%s count=4 = %ld", pid, pid, id10.s, r);
    r = sc3(SYS_read, p[0], buf, 64);
    line("%ld %ld read fd=%s count=64 = %ld", pid, pid, idp0.s, r);
    if (r != 4 || memcmp(buf, "ping", 4) != 0)
        FAIL("pipe read");
    r = sc1(SYS_close, 10);
    line("%ld %ld close fd=%s = %ld", pid, pid, id10.s, r);

    /* A child killed (SIGKILL) while blocked in a read of the empty pipe:
     * that read never returns, and the tasks forked next (which may reuse
     * its task_struct) must not be given its return. */
    long c0 = sc0(SYS_fork);
    if (c0 == 0) {
        long me = sc0(SYS_getpid);
        line("%ld %ld getpid = %ld", me, me, me);
        line("%ld %ld read fd=%s count=64 = ?", me, me, idp0.s);
        sc3(SYS_read, p[0], buf, 64);
        FAIL("read of the empty pipe returned");
        exit_group(me, 1);
    }
    line("%ld %ld fork = %ld", pid, pid, c0);
    {
        /* Until /proc/C0/syscall says it is blocked in read (nr 0); with
         * calls the script does not otherwise make (open, preadv, close_range). */
        char path[64], s[128];
        snprintf(path, sizeof path, "/proc/%ld/syscall", c0);
        long sfd = sc2(SYS_open, path, O_RDONLY | O_CLOEXEC);
        int blocked = 0;
        for (int i = 0; i < 1000 && !blocked; i++) {
            struct iovec iov = {s, sizeof s - 1};
            long n = sc5(SYS_preadv, sfd, &iov, 1, 0, 0);
            blocked = n > 2 && s[0] == '0' && s[1] == ' ';
            if (!blocked)
                sleep_ms(10);
        }
        sc3(SYS_close_range, sfd, sfd, 0);
        if (!blocked)
            FAIL("child %ld not blocked in read", c0);
    }
    r = sc2(SYS_kill, c0, SIGKILL);
    line("%ld %ld kill pid=%ld sig=%d = %ld", pid, pid, c0, SIGKILL, r);
    wait_child(pid, c0, -SIGKILL);
    sleep_ms(100); /* its task_struct is freed after an RCU grace period */

    /* fork: the child writes to the pipe and exits 7. */
    long c1 = sc0(SYS_fork);
    if (c1 == 0) {
        long me = sc0(SYS_getpid);
        line("%ld %ld getpid = %ld", me, me, me);
        struct fdid id = fdid(p[1]);
        long w = sc3(SYS_write, p[1], "child", 5);
        line("%ld %ld write fd=%s count=5 = %ld", me, me, id.s, w);
        exit_group(me, 7);
    }
    line("%ld %ld fork = %ld", pid, pid, c1);
    wait_child(pid, c1, 7);
    r = sc3(SYS_read, p[0], buf, 64);
    line("%ld %ld read fd=%s count=64 = %ld", pid, pid, idp0.s, r);
    if (r != 5 || memcmp(buf, "child", 5) != 0)
        FAIL("pipe read from the fork child");

    /* clone(SIGCHLD): a fork by another name; the child reads the file, exits 9. */
    long c2 = sc5(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    if (c2 == 0) {
        long me = sc0(SYS_getpid);
        line("%ld %ld getpid = %ld", me, me, me);
        long fd = sc4(SYS_openat, AT_FDCWD, "/tmp/sc-a", O_RDONLY, 0);
        struct fdid id = fdres(fd);
        line("%ld %ld openat path=/tmp/sc-a flags=0x%x = %s", me, me, O_RDONLY, id.s);
        long n = sc3(SYS_read, fd, buf, 10);
        line("%ld %ld read fd=%s count=10 = %ld", me, me, id.s, n);
        n = sc1(SYS_close, fd);
        line("%ld %ld close fd=%s = %ld", me, me, id.s, n);
        exit_group(me, 9);
    }
    line("%ld %ld clone flags=0x%x = %ld", pid, pid, SIGCHLD, c2);
    wait_child(pid, c2, 9);

    /* A thread (same tgid, own tid): gettid, a write to the pipe, exit. */
    struct thread_log tl = {p[1], -1, -1};
    int ctid = 0;
    long tflags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM |
                  CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID;
    long t = clone_fn(tflags, thread_stack + sizeof thread_stack, &ctid, &ctid, thread_main, &tl);
    line("%ld %ld clone flags=0x%lx = %ld", pid, pid, tflags, t);
    for (int v; (v = __atomic_load_n(&ctid, __ATOMIC_ACQUIRE)) != 0;)
        sc4(SYS_futex, &ctid, FUTEX_WAIT, v, 0);
    line("%ld %ld gettid = %ld", pid, tl.tid, tl.tid);
    line("%ld %ld write fd=%s count=3 = %ld", pid, tl.tid, idp1.s, tl.wrote);
    line("%ld %ld exit code=0 = ?", pid, tl.tid);
    if (tl.tid != t)
        FAIL("thread tid %ld, clone returned %ld", tl.tid, t);
    r = sc3(SYS_read, p[0], buf, 64);
    line("%ld %ld read fd=%s count=64 = %ld", pid, pid, idp0.s, r);
    if (r != 3 || memcmp(buf, "thr", 3) != 0)
        FAIL("pipe read from the thread");

    /* clone(CLONE_VM|CLONE_VFORK): the child execs this program's phase 2. */
    char *const argv2[] = {argv[0], "phase2", 0};
    long vflags = CLONE_VM | CLONE_VFORK | SIGCHLD;
    long c3 = clone_exec(vflags, vfork_stack + sizeof vfork_stack, argv[0], argv2, envp);
    line("%ld %ld clone flags=0x%lx = %ld", pid, pid, vflags, c3);
    wait_child(pid, c3, 11);

    /* TCP over loopback: listen, connect, accept, sendto, recvfrom, sendfile. */
    unsigned port = 20000 + pid % 20000;
    char a1[32], a2[32];
    long ls = sc3(SYS_socket, AF_INET, SOCK_STREAM, 0);
    struct fdid idls = fdres(ls);
    line("%ld %ld socket domain=%d type=0x%x = %s", pid, pid, AF_INET, SOCK_STREAM, idls.s);
    struct sockaddr_in sa = loopback(port);
    r = sc3(SYS_bind, ls, &sa, sizeof sa);
    line("%ld %ld bind fd=%s addr=%s = %ld", pid, pid, idls.s, addr_str(&sa, a1), r);
    r = sc2(SYS_listen, ls, 4);
    line("%ld %ld listen fd=%s backlog=4 = %ld", pid, pid, idls.s, r);
    long cs = sc3(SYS_socket, AF_INET, SOCK_STREAM, 0);
    struct fdid idcs = fdres(cs);
    line("%ld %ld socket domain=%d type=0x%x = %s", pid, pid, AF_INET, SOCK_STREAM, idcs.s);
    r = sc3(SYS_connect, cs, &sa, sizeof sa);
    line("%ld %ld connect fd=%s addr=%s = %ld", pid, pid, idcs.s, addr_str(&sa, a1), r);
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    memset(&peer, 0, sizeof peer);
    long as = sc3(SYS_accept, ls, &peer, &plen);
    struct fdid idas = fdres(as);
    line("%ld %ld accept fd=%s = %s peer=%s", pid, pid, idls.s, idas.s, addr_str(&peer, a1));
    struct sockaddr_in local;
    socklen_t llen = sizeof local;
    sc3(SYS_getsockname, cs, &local, &llen);
    if (plen != sizeof peer || local.sin_port != peer.sin_port)
        FAIL("accepted peer %s, client %s", addr_str(&peer, a1), addr_str(&local, a2));
    r = scx(SYS_sendto, cs, "hello", 5, 0, 0, 0);
    line("%ld %ld sendto fd=%s len=5 = %ld", pid, pid, idcs.s, r);
    r = scx(SYS_recvfrom, as, buf, 64, 0, 0, 0);
    line("%ld %ld recvfrom fd=%s len=64 = %ld", pid, pid, idas.s, r);
    if (r != 5 || memcmp(buf, "hello", 5) != 0)
        FAIL("tcp recvfrom");
    long long off = 200;
    r = sc4(SYS_sendfile, cs, fr, &off, 3000);
    line("%ld %ld sendfile out=%s in=%s count=3000 = %ld", pid, pid, idcs.s, idr.s, r);
    long got = 0;
    while (got < 3000) {
        long n = scx(SYS_recvfrom, as, buf, sizeof buf, 0, 0, 0);
        line("%ld %ld recvfrom fd=%s len=%zu = %ld", pid, pid, idas.s, sizeof buf, n);
        if (n <= 0)
            break;
        for (long i = 0; i < n; i++)
            if (buf[i] != pattern(200 + got + i)) {
                FAIL("sendfile data at %ld", got + i);
                break;
            }
        got += n;
    }
    if (got != 3000 || off != 3200)
        FAIL("sendfile moved %ld, offset %lld", got, off);
    r = sc1(SYS_close, cs);
    line("%ld %ld close fd=%s = %ld", pid, pid, idcs.s, r);
    r = sc1(SYS_close, as);
    line("%ld %ld close fd=%s = %ld", pid, pid, idas.s, r);
    r = sc1(SYS_close, ls);
    line("%ld %ld close fd=%s = %ld", pid, pid, idls.s, r);

    /* UDP over loopback: sendto and recvfrom with addresses. */
    long u1 = sc3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
    struct fdid idu1 = fdres(u1);
    line("%ld %ld socket domain=%d type=0x%x = %s", pid, pid, AF_INET, SOCK_DGRAM, idu1.s);
    struct sockaddr_in ua = loopback(port + 1), ub = loopback(port + 2);
    r = sc3(SYS_bind, u1, &ua, sizeof ua);
    line("%ld %ld bind fd=%s addr=%s = %ld", pid, pid, idu1.s, addr_str(&ua, a1), r);
    long u2 = sc3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
    struct fdid idu2 = fdres(u2);
    line("%ld %ld socket domain=%d type=0x%x = %s", pid, pid, AF_INET, SOCK_DGRAM, idu2.s);
    r = sc3(SYS_bind, u2, &ub, sizeof ub);
    line("%ld %ld bind fd=%s addr=%s = %ld", pid, pid, idu2.s, addr_str(&ub, a1), r);
    r = scx(SYS_sendto, u2, "dgram", 5, 0, &ua, sizeof ua);
    line("%ld %ld sendto fd=%s len=5 to=%s = %ld", pid, pid, idu2.s, addr_str(&ua, a1), r);
    struct sockaddr_in from;
    socklen_t flen = sizeof from;
    memset(&from, 0, sizeof from);
    r = scx(SYS_recvfrom, u1, buf, 64, 0, &from, &flen);
    line("%ld %ld recvfrom fd=%s len=64 = %ld from=%s", pid, pid, idu1.s, r,
         addr_str(&from, a1));
    if (r != 5 || memcmp(buf, "dgram", 5) != 0 || from.sin_port != ub.sin_port)
        FAIL("udp recvfrom");
    r = sc1(SYS_close, u1);
    line("%ld %ld close fd=%s = %ld", pid, pid, idu1.s, r);
    r = sc1(SYS_close, u2);
    line("%ld %ld close fd=%s = %ld", pid, pid, idu2.s, r);

    r = sc1(SYS_close, fr);
    line("%ld %ld close fd=%s = %ld", pid, pid, idr.s, r);
    r = sc1(SYS_close, p[0]);
    line("%ld %ld close fd=%s = %ld", pid, pid, idp0.s, r);
    r = sc1(SYS_close, p[1]);
    line("%ld %ld close fd=%s = %ld", pid, pid, idp1.s, r);
    r = sc1(SYS_unlink, "/tmp/sc-a");
    line("%ld %ld unlink path=/tmp/sc-a = %ld", pid, pid, r);
    exit_group(pid, failed ? 1 : 0);
    return 0;
}
