/* t_small: a few messages and one long one (for the gdb doorbell check and
   the symbol binding check).  */
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

int
main (void)
{
  openlog ("small", LOG_PID, LOG_LOCAL5);
  syslog (LOG_INFO, "small one");
  syslog (LOG_ERR, "small two %d", 2);
  size_t n = 100 * 1024;
  char *m = malloc (n + 1);
  for (size_t i = 0; i < n; i++)
    m[i] = 'A' + i % 26;
  m[n] = 0;
  syslog (LOG_INFO, "%s", m);
  free (m);
  setlogmask (LOG_UPTO (LOG_ERR));
  syslog (LOG_INFO, "masked");
  closelog ();
  return 0;
}
