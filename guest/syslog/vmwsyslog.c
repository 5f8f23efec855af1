/* vmwsyslog.c -- drop-in replacement for glibc's syslog(3) family that also
   hands every formatted message to the hypervisor ("log vault", issue 5).

   Build:   gcc -O2 -fPIC -shared -Wall -Wextra -Werror -fexceptions \
                -fvisibility=hidden -o libvmwsyslog.so vmwsyslog.c
   Install: LD_PRELOAD=/path/libvmwsyslog.so, or a line in /etc/ld.so.preload.

   The message formatting, locking, cancellation handling, socket handling,
   LOG_PERROR and LOG_CONS output follow glibc 2.36's misc/syslog.c as
   shipped by Debian bookworm (2.36-9+deb12u*, which carries the upstream
   2.36 branch fixes: no double space after the timestamp, CVE-2023-6246,
   -6779, -6780).  The only additions are marked "vmwatch:":

     - the doorbell: `cpuid` with rax = 0xffff, rbx = address of the
       formatted line, rcx = its length in bytes (no NUL), executed right
       after formatting, before LOG_PERROR output and before /dev/log;
     - lines longer than VMW_MAX_TRANSFER are rung as numbered parts,
       each `HEADER[part K/N] SLICE` where HEADER is the line's own
       `<PRI>TIMESTAMP TAG[PID]: ` (see README.md);
     - VMWATCH_SYSLOG_LOCAL=0 turns the /dev/log path off (doorbell only),
       VMWATCH_SYSLOG_TEE=/path appends every doorbell buffer to a file
       (test hook).  Both are read once, at first use, with secure_getenv,
       so they are ignored in setuid/setgid programs.

   Buffers: like glibc, a 1 KiB stack buffer; a message that does not fit is
   formatted into a malloc'ed buffer (glibc does exactly the same, so the
   async-signal-safety is the same as glibc's: none guaranteed, a signal
   handler calling syslog while the interrupted code holds the lock
   deadlocks in both).  Splitting for the doorbell never allocates: parts
   are assembled in one static VMW_MAX_TRANSFER buffer guarded by the
   syslog lock.  */

#undef _FORTIFY_SOURCE
#define _GNU_SOURCE 1

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <paths.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define VMW_EXPORT __attribute__ ((visibility ("default")))

/* Largest buffer handed to the hypervisor by one doorbell.  */
#define VMW_MAX_TRANSFER 65536
/* CPUID leaf used as the doorbell (paper 002).  */
#define VMW_DOORBELL_LEAF 0xffffUL
/* A part must carry at least this many message bytes; with a longer header
   the parts are cut from the whole line without repeating the header.  */
#define VMW_MIN_SLICE 1024

/* The exported names, exactly glibc's (unversioned definitions: under
   LD_PRELOAD they satisfy references to syslog@GLIBC_2.2.5 etc.).  */
VMW_EXPORT void openlog (const char *ident, int logstat, int logfac);
VMW_EXPORT void syslog (int pri, const char *fmt, ...);
VMW_EXPORT void vsyslog (int pri, const char *fmt, va_list ap);
VMW_EXPORT void closelog (void);
VMW_EXPORT int setlogmask (int pmask);
VMW_EXPORT void __syslog_chk (int pri, int flag, const char *fmt, ...);
VMW_EXPORT void __vsyslog_chk (int pri, int flag, const char *fmt,
                               va_list ap);

/* glibc's fortified vsnprintf (GLIBC_2.3.4): with flag > 0 it formats in
   PRINTF_FORTIFY mode, which is what glibc's __vsyslog_chk asks for.  */
extern int __vsnprintf_chk (char *s, size_t maxlen, int flag, size_t slen,
                            const char *format, va_list ap);

static int LogType = SOCK_DGRAM;        /* type of socket connection */
static int LogFile = -1;                /* fd for log */
static bool connected;                  /* have done connect */
static int LogStat;                     /* status bits, set by openlog() */
static const char *LogTag;              /* string to tag the entry with */
static int LogFacility = LOG_USER;      /* default facility code */
static int LogMask = 0xff;              /* mask of priorities to be logged */

static pthread_mutex_t syslog_lock = PTHREAD_MUTEX_INITIALIZER;

/* vmwatch: configuration, read once under syslog_lock.  */
static bool vmw_cfg_done;
static bool vmw_local = true;           /* also send to /dev/log */
static char vmw_tee[PATH_MAX];          /* "" = no tee file */
/* vmwatch: part buffer for split messages, guarded by syslog_lock.  */
static char vmw_part[VMW_MAX_TRANSFER];

static void openlog_internal (const char *, int, int);
static void closelog_internal (void);

struct cleanup_arg
{
  void *buf;
};

static void
cancel_handler (void *ptr)
{
  struct cleanup_arg *clarg = (struct cleanup_arg *) ptr;

  if (clarg != NULL)
    /* Free the heap buffer.  */
    free (clarg->buf);

  /* Free the lock.  */
  pthread_mutex_unlock (&syslog_lock);
}

/* ---- vmwatch additions ------------------------------------------------ */

static void
vmw_config_locked (void)
{
  if (vmw_cfg_done)
    return;
  vmw_cfg_done = true;

  const char *v = secure_getenv ("VMWATCH_SYSLOG_LOCAL");
  if (v != NULL && strcmp (v, "0") == 0)
    vmw_local = false;

  v = secure_getenv ("VMWATCH_SYSLOG_TEE");
  if (v != NULL && v[0] != '\0' && strlen (v) < sizeof vmw_tee)
    memcpy (vmw_tee, v, strlen (v) + 1);
}

/* The doorbell.  rbx is callee-saved (and the PIC register on i386): the
   "+b" constraint makes the compiler save/restore it around the function;
   every register cpuid writes (rax, rbx, rcx, rdx) is an output.  The
   "memory" clobber makes sure the buffer is in memory before the exit.  */
static __attribute__ ((noinline, noclone)) void
vmw_doorbell (const char *p, size_t len)
{
  unsigned long rax = VMW_DOORBELL_LEAF;
  unsigned long rbx = (unsigned long) p;
  unsigned long rcx = (unsigned long) len;
  unsigned long rdx;

  __asm__ __volatile__ ("cpuid"
                        : "+a" (rax), "+b" (rbx), "+c" (rcx), "=d" (rdx)
                        :
                        : "memory");
  (void) rax;
  (void) rbx;
  (void) rcx;
  (void) rdx;
}

/* Test hook: append "LEN SP BYTES LF" to the tee file, opened per record
   (no long-lived descriptor a daemon could close or reuse).  One writev on
   an O_APPEND file: records of concurrent processes do not interleave.  */
static void
vmw_tee_write (const char *p, size_t len)
{
  if (vmw_tee[0] == '\0')
    return;

  int saved_errno = errno;
  int oldstate;
  /* A test hook must not leak its descriptor to a cancellation.  */
  pthread_setcancelstate (PTHREAD_CANCEL_DISABLE, &oldstate);
  int fd = open (vmw_tee, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC
                 | O_NOCTTY, 0600);
  if (fd >= 0)
    {
      char num[32];
      int n = snprintf (num, sizeof num, "%zu ", len);
      struct iovec iov[3] = {
        { num, (size_t) n },
        { (void *) p, len },
        { (void *) "\n", 1 },
      };
      struct iovec *v = iov;
      int cnt = 3;
      while (cnt > 0)
        {
          ssize_t w = writev (fd, v, cnt);
          if (w < 0)
            {
              if (errno == EINTR)
                continue;
              break;
            }
          while (cnt > 0 && (size_t) w >= v->iov_len)
            {
              w -= v->iov_len;
              v++;
              cnt--;
            }
          if (cnt > 0)
            {
              v->iov_base = (char *) v->iov_base + w;
              v->iov_len -= w;
            }
        }
      close (fd);
    }
  pthread_setcancelstate (oldstate, NULL);
  errno = saved_errno;
}

static void
vmw_ring (const char *p, size_t len)
{
  vmw_doorbell (p, len);
  vmw_tee_write (p, len);
}

static unsigned int
vmw_digits (size_t n)
{
  unsigned int d = 1;
  while (n >= 10)
    {
      n /= 10;
      d++;
    }
  return d;
}

/* Hand BUF[0..BUFSIZE) to the hypervisor; BUF[0..HDRLEN) is the header
   `<PRI>TIMESTAMP TAG[PID]: ` that every part repeats.  */
static void
vmw_transfer (const char *buf, size_t bufsize, size_t hdrlen)
{
  if (bufsize <= VMW_MAX_TRANSFER)
    {
      vmw_ring (buf, bufsize);
      return;
    }

  const char *payload = buf + hdrlen;
  size_t plen = bufsize - hdrlen;
  /* "[part " K "/" N "] ": 9 bytes plus the digits; 20 digits at most.  */
  if (hdrlen + 9 + 2 * 20 + VMW_MIN_SLICE > VMW_MAX_TRANSFER)
    {
      hdrlen = 0;
      payload = buf;
      plen = bufsize;
    }

  /* Every part but the last carries exactly CAP bytes of payload; CAP
     leaves room for the longest marker ("[part N/N] ").  */
  unsigned int d = 1;
  size_t cap, nparts;
  for (;;)
    {
      cap = VMW_MAX_TRANSFER - hdrlen - (9 + 2 * d);
      nparts = (plen + cap - 1) / cap;
      if (vmw_digits (nparts) <= d)
        break;
      d++;
    }

  memcpy (vmw_part, buf, hdrlen);
  size_t off = 0;
  for (size_t k = 1; k <= nparts; k++)
    {
      size_t slice = plen - off < cap ? plen - off : cap;
      int m = snprintf (vmw_part + hdrlen, VMW_MAX_TRANSFER - hdrlen,
                        "[part %zu/%zu] ", k, nparts);
      memcpy (vmw_part + hdrlen + m, payload + off, slice);
      vmw_ring (vmw_part, hdrlen + m + slice);
      off += slice;
    }
}

/* ---- glibc 2.36 misc/syslog.c, with the vmwatch hooks ----------------- */

static void vsyslog_internal (int pri, const char *fmt, va_list ap,
                              int flag);

/* glibc calls its own (non-interposable) syslog for the internal error.  */
static void
syslog_internal (int pri, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsyslog_internal (pri, fmt, ap, 0);
  va_end (ap);
}

void
syslog (int pri, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsyslog_internal (pri, fmt, ap, 0);
  va_end (ap);
}

void
vsyslog (int pri, const char *fmt, va_list ap)
{
  vsyslog_internal (pri, fmt, ap, 0);
}

void
__syslog_chk (int pri, int flag, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsyslog_internal (pri, fmt, ap, flag);
  va_end (ap);
}

void
__vsyslog_chk (int pri, int flag, const char *fmt, va_list ap)
{
  vsyslog_internal (pri, fmt, ap, flag);
}

/* glibc: __vsnprintf_internal (s, maxlen, fmt, ap,
   (flag > 0) ? PRINTF_FORTIFY : 0).  */
static int
vmw_vsnprintf (char *s, size_t maxlen, int flag, const char *fmt,
               va_list ap)
{
  if (flag > 0)
    return __vsnprintf_chk (s, maxlen, flag, maxlen, fmt, ap);
  return vsnprintf (s, maxlen, fmt, ap);
}

static locale_t
c_locale (void)
{
  /* newlocale returns glibc's static C locale object for "C" (no
     allocation); cached anyway.  Called under syslog_lock.  */
  static locale_t loc;
  if (loc == (locale_t) 0)
    loc = newlocale (LC_ALL_MASK, "C", (locale_t) 0);
  return loc;
}

static void
vsyslog_internal (int pri, const char *fmt, va_list ap, int flag)
{
  /* Try to use a static buffer as an optimization.  */
  char bufs[1024];
  char *buf = bufs;
  size_t bufsize;
  size_t hdrlen;                /* vmwatch: header length, for parts */

  int msgoff;
  int saved_errno = errno;

#define INTERNALLOG LOG_ERR|LOG_CONS|LOG_PERROR|LOG_PID
  /* Check for invalid bits. */
  if (pri & ~(LOG_PRIMASK | LOG_FACMASK))
    {
      syslog_internal (INTERNALLOG, "syslog: unknown facility/priority: %x",
                       pri);
      pri &= LOG_PRIMASK | LOG_FACMASK;
    }

  /* Prepare for multiple users.  We have to take care: most syscalls we are
     using are cancellation points.  */
  struct cleanup_arg clarg = { NULL };
  pthread_cleanup_push (cancel_handler, &clarg);
  pthread_mutex_lock (&syslog_lock);

  vmw_config_locked ();

  /* Check priority against setlogmask values. */
  if ((LOG_MASK (LOG_PRI (pri)) & LogMask) == 0)
    goto out;

  /* Set default facility if none specified. */
  if ((pri & LOG_FACMASK) == 0)
    pri |= LogFacility;

  pid_t pid = LogStat & LOG_PID ? getpid () : 0;

  /* "%b %e %H:%M:%S "  */
  char timestamp[sizeof "MMM DD hh:mm:ss "];
  struct timespec now_ts;
  clock_gettime (CLOCK_REALTIME_COARSE, &now_ts); /* glibc's time64_now */
  time_t now = now_ts.tv_sec;
  struct tm now_tm;
  struct tm *now_tmp = localtime_r (&now, &now_tm);
  bool has_ts = now_tmp != NULL;

  /* In the unlikely case of localtime_r failure (tm_year out of int range)
     skip the hostname so the message is handled as valid PRI but without
     TIMESTAMP or invalid TIMESTAMP (which should force the relay to add the
     timestamp itself).  */
  if (has_ts)
    strftime_l (timestamp, sizeof timestamp, "%h %e %T ", now_tmp,
                c_locale ());

#define SYSLOG_HEADER(__pri, __timestamp, __msgoff, pid) \
  "<%d>%s%n%s%s%.0d%s: ",                                \
  __pri, __timestamp, __msgoff,                          \
  LogTag == NULL ? program_invocation_short_name : LogTag, \
  "[" + (pid == 0), pid, "]" + (pid == 0)

#define SYSLOG_HEADER_WITHOUT_TS(__pri, __msgoff)        \
  "<%d>: %n", __pri, __msgoff

  int l, vl;
  if (has_ts)
    l = snprintf (bufs, sizeof bufs,
                  SYSLOG_HEADER (pri, timestamp, &msgoff, pid));
  else
    l = snprintf (bufs, sizeof bufs,
                  SYSLOG_HEADER_WITHOUT_TS (pri, &msgoff));
  if (l < 0)
    goto out;
  hdrlen = (size_t) l;

  char *pos;
  size_t len;

  if ((size_t) l < sizeof bufs)
    {
      /* At this point, there is still a chance that we can print the
         remaining part of the log into bufs and use that.  */
      pos = bufs + l;
      len = sizeof (bufs) - l;
    }
  else
    {
      buf = NULL;
      /* bufs is too small for this message; the vsnprintf into bufs only
         computes the length, the message goes to a heap buffer below.  */
      pos = bufs;
      len = sizeof (bufs);
    }

  {
    va_list apc;
    va_copy (apc, ap);

    /* Restore errno for %m format.  */
    errno = saved_errno;

    vl = vmw_vsnprintf (pos, len, flag, fmt, apc);
    va_end (apc);

    if (vl < 0 || vl >= INT_MAX - l)
      goto out;

    if ((size_t) vl >= len)
      buf = NULL;

    bufsize = l + vl;
  }

  if (buf == NULL)
    {
      buf = malloc ((bufsize + 1) * sizeof (char));
      if (buf != NULL)
        {
          /* Tell the cancellation handler to free this buffer.  */
          clarg.buf = buf;

          int cl;
          if (has_ts)
            cl = snprintf (buf, l + 1,
                           SYSLOG_HEADER (pri, timestamp, &msgoff, pid));
          else
            cl = snprintf (buf, l + 1,
                           SYSLOG_HEADER_WITHOUT_TS (pri, &msgoff));
          if (cl != l)
            goto out;

          va_list apc;
          va_copy (apc, ap);
          cl = vmw_vsnprintf (buf + l, bufsize - l + 1, flag, fmt, apc);
          va_end (apc);

          if (cl != vl)
            goto out;
        }
      else
        {
          int bl;
          /* Nothing much to do but emit an error message.  */
          bl = snprintf (bufs, sizeof bufs,
                         "out of memory[%d]", getpid ());
          if (bl < 0 || (size_t) bl >= sizeof bufs)
            goto out;

          bufsize = bl;
          buf = bufs;
          msgoff = 0;
          hdrlen = 0;
        }
    }

  /* vmwatch: ring the doorbell with the formatted line (in parts if it is
     longer than VMW_MAX_TRANSFER).  */
  vmw_transfer (buf, bufsize, hdrlen);

  /* Output to stderr if requested. */
  if (LogStat & LOG_PERROR)
    dprintf (STDERR_FILENO, "%s%s", buf + msgoff,
             "\n" + (buf[bufsize - 1] == '\n'));

  /* vmwatch: VMWATCH_SYSLOG_LOCAL=0: doorbell only.  */
  if (!vmw_local)
    goto out;

  /* Get connected, output the message to the local logger.  */
  if (!connected)
    openlog_internal (NULL, LogStat | LOG_NDELAY, LogFacility);

  /* If we have a SOCK_STREAM connection, also send ASCII NUL as a record
     terminator.  */
  if (LogType == SOCK_STREAM)
    ++bufsize;

  if (!connected || send (LogFile, buf, bufsize, MSG_NOSIGNAL) < 0)
    {
      if (connected)
        {
          /* Try to reopen the syslog connection.  Maybe it went down.  */
          closelog_internal ();
          openlog_internal (NULL, LogStat | LOG_NDELAY, LogFacility);
        }

      if (!connected || send (LogFile, buf, bufsize, MSG_NOSIGNAL) < 0)
        {
          closelog_internal ();       /* attempt re-open next time */
          /*
           * Output the message to the console; don't worry
           * about blocking, if console blocks everything will.
           * Make sure the error reported is the one from the
           * syslogd failure.
           */
          int fd;
          if (LogStat & LOG_CONS &&
              (fd = open (_PATH_CONSOLE, O_WRONLY | O_NOCTTY
                          | O_CLOEXEC, 0)) >= 0)
            {
              dprintf (fd, "%s\r\n", buf + msgoff);
              close (fd);
            }
        }
    }

out:
  /* End of critical section.  */
  pthread_cleanup_pop (0);
  pthread_mutex_unlock (&syslog_lock);

  if (buf != bufs)
    free (buf);
}

/* AF_UNIX address of local logger  */
static const struct sockaddr_un SyslogAddr =
  {
    .sun_family = AF_UNIX,
    .sun_path = _PATH_LOG
  };

static void
openlog_internal (const char *ident, int logstat, int logfac)
{
  if (ident != NULL)
    LogTag = ident;
  LogStat = logstat;
  if ((logfac & ~LOG_FACMASK) == 0)
    LogFacility = logfac;

  /* vmwatch: VMWATCH_SYSLOG_LOCAL=0: never open the /dev/log socket.  */
  if (!vmw_local)
    return;

  int retry = 0;
  while (retry < 2)
    {
      if (LogFile == -1)
        {
          if (LogStat & LOG_NDELAY)
            {
              LogFile = socket (AF_UNIX, LogType | SOCK_CLOEXEC, 0);
              if (LogFile == -1)
                return;
            }
        }
      if (LogFile != -1 && !connected)
        {
          int old_errno = errno;
          if (connect (LogFile, (const struct sockaddr *) &SyslogAddr,
                       sizeof (SyslogAddr)) == -1)
            {
              int saved_errno = errno;
              int fd = LogFile;
              LogFile = -1;
              close (fd);
              errno = old_errno;
              if (saved_errno == EPROTOTYPE)
                {
                  /* retry with the other type: */
                  LogType = LogType == SOCK_DGRAM ? SOCK_STREAM : SOCK_DGRAM;
                  ++retry;
                  continue;
                }
            }
          else
            connected = true;
        }
      break;
    }
}

void
openlog (const char *ident, int logstat, int logfac)
{
  /* Protect against multiple users and cancellation.  */
  pthread_cleanup_push (cancel_handler, NULL);
  pthread_mutex_lock (&syslog_lock);

  vmw_config_locked ();
  openlog_internal (ident, logstat, logfac);

  pthread_cleanup_pop (1);
}

static void
closelog_internal (void)
{
  if (!connected)
    return;

  close (LogFile);
  LogFile = -1;
  connected = false;
}

void
closelog (void)
{
  /* Protect against multiple users and cancellation.  */
  pthread_cleanup_push (cancel_handler, NULL);
  pthread_mutex_lock (&syslog_lock);

  closelog_internal ();
  LogTag = NULL;
  LogType = SOCK_DGRAM; /* this is the default */

  /* Free the lock.  */
  pthread_cleanup_pop (1);
}

/* setlogmask -- set the log mask level */
int
setlogmask (int pmask)
{
  int omask;

  /* Protect against multiple users.  */
  pthread_mutex_lock (&syslog_lock);

  omask = LogMask;
  if (pmask != 0)
    LogMask = pmask;

  pthread_mutex_unlock (&syslog_lock);

  return (omask);
}
