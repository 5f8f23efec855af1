/* t_flood: N syslog() calls as fast as possible (the vault's flood test).  */
#include <stdio.h>
#include <stdlib.h>
#include <syslog.h>
#include <unistd.h>

int
main (int argc, char **argv)
{
  long n = argc > 1 ? atol (argv[1]) : 1000000;
  printf ("flood=%d\n", getpid ());
  fflush (stdout);
  for (long i = 0; i < n; i++)
    syslog (LOG_INFO, "flood %ld", i);
  return 0;
}
