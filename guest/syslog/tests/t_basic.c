/* t_basic: every syslog feature in sequence.  Run once against glibc and
   once with LD_PRELOAD=libvmwsyslog.so; /dev/log datagrams, stdout (return
   values, errno, socket counts) and stderr (LOG_PERROR) must match.  */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

static int
count_sockets (void)
{
  DIR *d = opendir ("/proc/self/fd");
  struct dirent *e;
  int n = 0;
  char path[300], target[300];
  while (d != NULL && (e = readdir (d)) != NULL)
    {
      snprintf (path, sizeof path, "/proc/self/fd/%s", e->d_name);
      ssize_t r = readlink (path, target, sizeof target - 1);
      if (r > 0)
        {
          target[r] = 0;
          if (strncmp (target, "socket:", 7) == 0)
            n++;
        }
    }
  if (d != NULL)
    closedir (d);
  return n;
}

static void
vlog (int pri, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vsyslog (pri, fmt, ap);
  va_end (ap);
}

static void
report (const char *what)
{
  int e = errno;
  printf ("%s: errno=%d sockets=%d\n", what, e, count_sockets ());
  fflush (stdout);
  errno = e;
}

static char *
filled (size_t n)
{
  char *p = malloc (n + 1);
  for (size_t i = 0; i < n; i++)
    p[i] = 'a' + (i * 7 + i / 26) % 26;
  p[n] = 0;
  return p;
}

int
main (void)
{
  errno = 0;
  /* default tag (program_invocation_short_name), default facility */
  syslog (LOG_INFO, "hello %d %s", 42, "world");
  report ("plain");
  vlog (LOG_NOTICE, "via vsyslog %s %5.2f", "x", 3.14159);
  report ("vsyslog");

  /* %m uses errno saved at entry; errno preserved afterwards */
  errno = ENOENT;
  syslog (LOG_ERR, "open failed: %m (%d)", 7);
  report ("percent-m");
  errno = EACCES;
  vlog (LOG_ERR, "%m%m %s", "twice");
  report ("percent-m-v");

  /* positional arguments, width, %% */
  syslog (LOG_DEBUG, "%2$s %1$d %%d 100%%", 5, "pos");
  syslog (LOG_INFO, "%s", "");
  syslog (LOG_INFO, "multi\nline\nmessage");
  syslog (LOG_INFO, "ends with newline\n");
  syslog (LOG_INFO, "nul %c inside", 0);
  syslog (LOG_INFO, "tabs\tand \x01 control");

  /* explicit facility in pri */
  syslog (LOG_LOCAL3 | LOG_NOTICE, "local3 notice");
  syslog (LOG_AUTHPRIV | LOG_EMERG, "authpriv emerg");

  /* invalid priority bits */
  syslog (0x400 | LOG_INFO, "bad bits 0x400");
  report ("badbits");
  syslog (-1, "minus one");
  syslog (0x1000 | LOG_LOCAL7 | LOG_DEBUG, "bad bits 0x1000");

  /* openlog: tag, LOG_PID, facility */
  openlog ("tagA", LOG_PID, LOG_DAEMON);
  report ("openlog-A");
  syslog (LOG_WARNING, "daemon warning %u", 123u);
  syslog (LOG_KERN | LOG_CRIT, "explicit kern");  /* LOG_KERN == 0 */
  openlog (NULL, LOG_ODELAY, 0x10000);          /* invalid facility kept */
  syslog (LOG_INFO, "ident NULL keeps tag, no pid");
  openlog ("tagB", LOG_PID | LOG_NDELAY, LOG_LOCAL1);
  report ("openlog-ndelay");
  syslog (LOG_INFO, "local1 ndelay");

  /* setlogmask */
  int om = setlogmask (LOG_UPTO (LOG_NOTICE));
  printf ("setlogmask old=%#x\n", om);
  for (int p = LOG_EMERG; p <= LOG_DEBUG; p++)
    syslog (p, "upto-notice level %d", p);
  om = setlogmask (LOG_MASK (LOG_DEBUG) | LOG_MASK (LOG_ERR));
  printf ("setlogmask old=%#x\n", om);
  for (int p = LOG_EMERG; p <= LOG_DEBUG; p++)
    vlog (p, "debug|err level %d", p);
  om = setlogmask (LOG_MASK (LOG_INFO));
  syslog (0x400 | LOG_INFO, "bad bits with internal error masked");
  om = setlogmask (0);
  printf ("setlogmask(0) old=%#x\n", om);
  om = setlogmask (0xff);
  printf ("setlogmask old=%#x\n", om);

  /* closelog resets the tag and the socket type */
  closelog ();
  report ("closelog");
  syslog (LOG_INFO, "after closelog");
  report ("after-closelog");

  /* header longer than glibc's 1 KiB stack buffer */
  char *ident = filled (2000);
  openlog (ident, LOG_PID, LOG_USER);
  syslog (LOG_INFO, "long ident %d", 1);
  closelog ();
  free (ident);

  /* sizes around the 1 KiB stack buffer and the 64 KiB transfer bound */
  openlog ("sz", 0, LOG_USER);
  /* header "<14>Mmm dd hh:mm:ss sz: " is 24 bytes */
  size_t sizes[] = { 998, 999, 1000, 1001, 65510, 65511, 65512, 65513,
                     100 * 1024, 150000 };
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    {
      char *m = filled (sizes[i]);
      syslog (LOG_INFO, "%s", m);
      free (m);
    }
  report ("sizes");
  /* long multi-line message */
  {
    size_t n = 100 * 1024;
    char *m = filled (n);
    for (size_t i = 80; i < n; i += 81)
      m[i] = '\n';
    syslog (LOG_WARNING, "%s", m);
    free (m);
  }
  errno = ENOSPC;
  {
    char *m = filled (70000);
    syslog (LOG_INFO, "%m then %s", m);
    free (m);
  }
  report ("long-m");
  closelog ();

  /* LOG_PERROR: stderr gets "TAG[PID]: MSG\n" */
  openlog ("perr", LOG_PERROR | LOG_PID, LOG_LOCAL0);
  syslog (LOG_INFO, "to stderr too %d", 1);
  syslog (LOG_INFO, "already ends with newline\n");
  syslog (LOG_INFO, "two\nlines");
  syslog (LOG_INFO, "stops at %c nul", 0);
  syslog (LOG_INFO, "%s", "");
  syslog (0x800 | LOG_NOTICE, "bad bits with perror");
  {
    char *m = filled (3000);
    syslog (LOG_INFO, "%s", m);
    free (m);
  }
  openlog ("perr", LOG_PERROR, LOG_LOCAL0);
  syslog (LOG_INFO, "perror without pid");
  closelog ();
  report ("end");
  return 0;
}
