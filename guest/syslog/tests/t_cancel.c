/* t_cancel: a thread cancelled while inside syslog must release the lock
   (cleanup handler), so the main thread can still log.  */
#include <pthread.h>
#include <stdio.h>
#include <syslog.h>
#include <unistd.h>

static void *
spam (void *arg)
{
  (void) arg;
  for (unsigned long i = 0;; i++)
    syslog (LOG_INFO, "spam %lu %0500d", i, 0);
  return NULL;
}

int
main (void)
{
  for (int round = 0; round < 20; round++)
    {
      pthread_t t;
      pthread_create (&t, NULL, spam, NULL);
      usleep (20000);
      pthread_cancel (t);
      void *r;
      pthread_join (t, &r);
      if (r != PTHREAD_CANCELED)
        return 3;
      syslog (LOG_NOTICE, "after cancel %d", round);
    }
  printf ("done\n");
  return 0;
}
