/* t_threads: NTHREADS threads x NMSG messages, each exactly once.  */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <syslog.h>

static int nmsg = 1000;

static void *
worker (void *arg)
{
  int t = (int) (long) arg;
  for (int i = 0; i < nmsg; i++)
    syslog (LOG_INFO | (t % 2 ? LOG_LOCAL2 : 0), "thread %02d msg %04d", t, i);
  return NULL;
}

int
main (int argc, char **argv)
{
  int nthreads = argc > 1 ? atoi (argv[1]) : 16;
  if (argc > 2)
    nmsg = atoi (argv[2]);
  if (argc > 3)
    openlog ("thr", LOG_PID, LOG_USER);
  pthread_t th[256];
  for (int t = 0; t < nthreads; t++)
    pthread_create (&th[t], NULL, worker, (void *) (long) t);
  for (int t = 0; t < nthreads; t++)
    pthread_join (th[t], NULL);
  return 0;
}
