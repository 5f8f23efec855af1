/* t_reconnect: the receiver is restarted between two messages; glibc
   reconnects on the failed send and the second message is not lost.  */
#include <stdio.h>
#include <stdlib.h>
#include <syslog.h>
#include <unistd.h>

int
main (int argc, char **argv)
{
  if (argc < 3)
    return 2;
  syslog (LOG_INFO, "before restart");
  FILE *f = fopen (argv[1], "w");
  fclose (f);
  while (access (argv[2], F_OK) != 0)
    usleep (10000);
  syslog (LOG_INFO, "after restart 1");
  syslog (LOG_INFO, "after restart 2");
  return 0;
}
