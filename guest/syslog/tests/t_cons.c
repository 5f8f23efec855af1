/* t_cons: LOG_CONS when /dev/log is missing or dead: the line (without
   <PRI>TIMESTAMP) goes to /dev/console with "\r\n".  */
#include <errno.h>
#include <stdio.h>
#include <syslog.h>

int
main (void)
{
  openlog ("cons", LOG_CONS | LOG_PID, LOG_DAEMON);
  errno = 0;
  syslog (LOG_ERR, "console one %d", 1);
  printf ("errno=%d\n", errno);
  errno = EBADF;
  syslog (LOG_WARNING, "console two %m");
  printf ("errno=%d\n", errno);
  syslog (LOG_WARNING, "ends with newline\n");
  openlog ("cons", LOG_CONS, LOG_DAEMON);
  syslog (0x400 | LOG_INFO, "bad bits on console");
  printf ("errno=%d\n", errno);
  return 0;
}
