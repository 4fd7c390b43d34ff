/* hugepages.c: a node's weights copied onto transparent huge pages in the background (see there). */
#ifndef GLM_HUGEPAGES_H
#define GLM_HUGEPAGES_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

#define GLM_HUGE_MAX 2   /* buffers per node: MatMulNBits' weights and scales */

typedef struct {
  char path[PATH_MAX];
  unsigned long long dev, ino;
  long long offset;
  size_t bytes;
} GlmHugeSource;

typedef struct GlmHugeWeights {
  pthread_mutex_t lock;
  atomic_int state;                /* new, queued, ready, moved, or kept (the originals for good) */
  int count, busy;                 /* busy: the copier is reading this one (under the queue's lock) */
  const void *orig[GLM_HUGE_MAX];  /* the tensors the copy is made from */
  void *copy[GLM_HUGE_MAX];
  GlmHugeSource src[GLM_HUGE_MAX];
  void *base;
  size_t mapped;
  struct GlmHugeWeights *next;     /* in the copier's queue */
} GlmHugeWeights;

void glm_huge_init(GlmHugeWeights *h);
/* Each call: ptr[i] (bytes[i] long) are replaced by their copies once those are ready; the first call queues them. */
void glm_huge_use(GlmHugeWeights *h, const void *ptr[], const size_t bytes[], int count);
/* Waits for a copy in progress, frees the copy. */
void glm_huge_release(GlmHugeWeights *h);
/* Whether [p, p + n) can be moved (an unmodified private file mapping); fills src. */
int glm_huge_source(const void *p, size_t n, GlmHugeSource *src);
long long glm_huge_bytes(void);
void glm_huge_select(int on);
int glm_huge_pending(void);
long long glm_huge_queued_bytes(void);

#endif
