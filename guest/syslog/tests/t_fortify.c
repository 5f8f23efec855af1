/* t_fortify: built with -O2 -D_FORTIFY_SOURCE=2, so syslog/vsyslog calls go
   to __syslog_chk/__vsyslog_chk with flag 1 (PRINTF_FORTIFY).  With argument
   "n", a %n in a writable format must abort exactly as glibc does.  */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>

static void
vlog (int pri, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vsyslog (pri, fmt, ap);
  va_end (ap);
}

int
main (int argc, char **argv)
{
  openlog ("fort", LOG_PID, LOG_LOCAL4);
  syslog (LOG_INFO, "fortified %d %s", 1, "one");
  vlog (LOG_NOTICE, "fortified vsyslog %d %s", 2, "two");
  errno = EPERM;
  syslog (LOG_ERR, "fortified %%m: %m");
  syslog (LOG_INFO, "%2$s %1$s", "b", "a");
  printf ("errno=%d\n", errno);
  if (argc > 1 && strcmp (argv[1], "n") == 0)
    {
      char fmt[32];
      int n = 0;
      strcpy (fmt, "count%n");
      fflush (stdout);
      syslog (LOG_INFO, fmt, &n);
      printf ("not reached %d\n", n);
    }
  return 0;
}
