/*
 * Weights moved onto transparent huge pages, for the int4 kernel (q4_matmul.c).
 *
 * Why: a decode step streams every weight once. ONNX Runtime maps each external initializer of the artifact from
 * its data file, so the kernel reads 4 KB pages, and the hardware prefetchers stop at every page boundary. GLM-4-9B's
 * 40 layers of block-128 int4 weights (4.33 GB) streamed at 26.4 GB/s from 4 KB pages and at 30.4 GB/s from 2 MB
 * pages on a 2-core Intel Xeon (docs/runtime.md, "Huge pages").
 *
 * How: the first time a MatMulNBits node runs, its weights and scales are queued for a copier thread, which reads
 * them from the artifact's file (pread: no page faults on the source) into an anonymous mapping that asks for huge
 * pages (madvise MADV_HUGEPAGE: honoured where the system's THP setting is "madvise" or "always"). Until a copy is
 * ready the node runs on the originals, so loading does not wait (allocating 4.4 GB of huge pages took 1.8-9 s on
 * this VM). The next call after the copy is ready switches to it and drops the originals' pages from this process
 * (MADV_DONTNEED), so the resident size does not grow.
 *
 * Only weights that are an unmodified private mapping of a file are moved: /proc/self/maps names the file and
 * /proc/self/pagemap shows no page of the range was written. Dropping such pages loses nothing: a later read of the
 * original (ONNX Runtime's own kernel after a fallback) faults the same bytes back in from the file. The copy is made
 * from the same file (checked by device and inode) at the same offset. Anything else (anonymous memory, a page
 * written in place, a replaced file, not Linux, no memory) keeps the original. glm_huge_select(0) turns it off.
 * The copier stays at most AHEAD_BUDGET ahead of the drops, so the model is never held twice.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hugepages.h"

static atomic_llong moved_bytes;
static atomic_int wanted = 1, unsettled;
static atomic_llong queued_bytes;

/* Bytes queued for a copy not made yet: anonymous memory the process is about to take (the KV budget leaves it). */
long long glm_huge_queued_bytes(void) { return atomic_load(&queued_bytes); }

/* Nodes queued or copied but not yet switched (a benchmark's warm-up runs steps until this is 0). */
int glm_huge_pending(void) { return atomic_load(&unsettled); }

/* Whether nodes that run for the first time from now on are moved (glm_runtime: --hugepages / GLM_RUNTIME_HUGEPAGES). */
void glm_huge_select(int on) { atomic_store(&wanted, on != 0); }

/* Bytes of weights now read from huge-page copies (glm_runtime reports it; tests wait for it). */
long long glm_huge_bytes(void) { return atomic_load(&moved_bytes); }

#if defined(__linux__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define HUGE_BYTES ((size_t)2 << 20)

static uintptr_t page_bytes(void) {
  const long size = sysconf(_SC_PAGESIZE);
  return size > 0 ? (uintptr_t)size : 4096;
}

/* No page of [p, p + n) was ever written: every present page is a file page (pagemap bit 61), none swapped (62). */
static int pages_clean(const void *p, size_t n) {
  FILE *pm = fopen("/proc/self/pagemap", "rb");
  if (!pm) return 0;
  const uintptr_t page = page_bytes(), first = (uintptr_t)p / page, last = ((uintptr_t)p + n - 1) / page;
  int clean = fseeko(pm, (off_t)(first * 8), SEEK_SET) == 0;
  uint64_t entries[512];
  for (uintptr_t at = first; clean && at <= last;) {
    const size_t want = last - at + 1 < 512 ? (size_t)(last - at + 1) : 512;
    if (fread(entries, 8, want, pm) != want) { clean = 0; break; }
    for (size_t i = 0; i < want && clean; i++) {
      const uint64_t e = entries[i];
      clean = !((e >> 62) & 1) && (!((e >> 63) & 1) || ((e >> 61) & 1));
    }
    at += want;
  }
  fclose(pm);
  return clean;
}

/* The file, device, inode and offset behind [p, p + n), if it lies in one private mapping of a file. */
static int file_behind(const void *p, size_t n, GlmHugeSource *src) {
  FILE *f = fopen("/proc/self/maps", "r");
  if (!f) return 0;
  const uintptr_t a = (uintptr_t)p, b = a + n;
  char line[PATH_MAX + 128], perms[8];
  int found = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long lo, hi, inode;
    unsigned long long offset;
    unsigned major_id, minor_id;
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %7s %llx %x:%x %lu %n", &lo, &hi, perms, &offset, &major_id, &minor_id, &inode,
               &path_at) != 7)
      continue;
    if (a < lo || a >= hi) continue;
    char *path = line + path_at, *end = path + strlen(path);
    while (end > path && (end[-1] == '\n' || end[-1] == ' ')) *--end = '\0';
    found = b <= hi && perms[0] == 'r' && perms[3] == 'p' && inode != 0 && path[0] == '/' &&
            strlen(path) < sizeof src->path;
    if (found) {
      strcpy(src->path, path);
      src->dev = makedev(major_id, minor_id);
      src->ino = inode;
      src->offset = (long long)(offset + (a - lo));
      src->bytes = n;
    }
    break;
  }
  fclose(f);
  return found;
}

/* Whether MADV_HUGEPAGE can give 2 MB pages here: the THP mode is "always" or "madvise", not "never" (then a copy
 * would cost its time and give 4 KB pages again). */
static int thp_available(void) {
  static atomic_int known = -1;
  int v = atomic_load(&known);
  if (v < 0) {
    char mode[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    v = f && fgets(mode, sizeof mode, f) && !strstr(mode, "[never]");
    if (f) fclose(f);
    atomic_store(&known, v);
  }
  return v;
}

int glm_huge_source(const void *p, size_t n, GlmHugeSource *src) {
  if (n == 0 || !atomic_load(&wanted) || !thp_available()) return 0;
  return file_behind(p, n, src) && pages_clean(p, n);
}

/* Read each source from its file into one huge-page mapping; NULL (nothing kept) if any read fails. */
static void *read_copies(const GlmHugeSource src[], int count, void *dst[], size_t *mapped) {
  size_t total = 0;
  for (int i = 0; i < count; i++) total += (src[i].bytes + 63) & ~(size_t)63;
  const size_t len = (total + HUGE_BYTES - 1) & ~(HUGE_BYTES - 1);
  /* over-allocate by one huge page and trim, so the copy starts on a 2 MB boundary */
  char *raw = mmap(NULL, len + HUGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *base = (char *)(((uintptr_t)raw + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1));
  if (base > raw) munmap(raw, (size_t)(base - raw));
  munmap(base + len, (size_t)(raw + len + HUGE_BYTES - (base + len)));
  madvise(base, len, MADV_HUGEPAGE);
  size_t at = 0;
  int ok = 1;
  for (int i = 0; i < count && ok; i++) {
    const int fd = open(src[i].path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    ok = fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == (dev_t)src[i].dev && st.st_ino == (ino_t)src[i].ino;
    dst[i] = base + at;
    for (size_t done = 0; ok && done < src[i].bytes;) {
      const ssize_t got = pread(fd, (char *)dst[i] + done, src[i].bytes - done, (off_t)(src[i].offset + done));
      ok = got > 0;
      done += ok ? (size_t)got : 0;
    }
    if (fd >= 0) close(fd);
    at += (src[i].bytes + 63) & ~(size_t)63;
  }
  if (!ok) {
    munmap(base, len);
    return NULL;
  }
  mprotect(base, len, PROT_READ);   /* the kernel only reads it: a stray write faults instead of corrupting */
  *mapped = len;
  return base;
}

static void drop_pages(const void *p, size_t n) {
  const uintptr_t page = page_bytes();
  const uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + n) & ~(page - 1);
  if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

static void unmap(void *base, size_t mapped) { munmap(base, mapped); }

#else

int glm_huge_source(const void *p, size_t n, GlmHugeSource *src) { (void)p; (void)n; (void)src; return 0; }
static void *read_copies(const GlmHugeSource src[], int count, void *dst[], size_t *mapped) {
  (void)src; (void)count; (void)dst; (void)mapped;
  return NULL;
}
static void drop_pages(const void *p, size_t n) { (void)p; (void)n; }
static void unmap(void *base, size_t mapped) { (void)base; (void)mapped; }

#endif

/* ---------------------------------------------------------------- the copier thread and its queue */

enum { NEW = 0, QUEUED = 1, READY = 2, MOVED = 3, KEPT = -1 };

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_wake = PTHREAD_COND_INITIALIZER, copy_done = PTHREAD_COND_INITIALIZER;
static GlmHugeWeights *queue_head;
static int copier_started;

/* Copies made but whose originals are still resident (their node has not run since): the copier waits while these
 * reach the budget, so the process holds at most this much twice (a server idle after loading would otherwise hold
 * the whole model twice until its first request). During decode every step drops what is ready. */
#define AHEAD_BUDGET ((size_t)512 << 20)
static size_t ahead_bytes;

static size_t total_bytes(const GlmHugeWeights *h) {
  size_t total = 0;
  for (int i = 0; i < h->count; i++) total += h->src[i].bytes;
  return total;
}

static void *copier_main(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&queue_lock);
    while (!queue_head || ahead_bytes >= AHEAD_BUDGET) pthread_cond_wait(&queue_wake, &queue_lock);
    GlmHugeWeights *h = queue_head;
    queue_head = h->next;
    h->next = NULL;
    h->busy = 1;
    pthread_mutex_unlock(&queue_lock);
    void *dst[GLM_HUGE_MAX];
    size_t mapped = 0;
    void *base = read_copies(h->src, h->count, dst, &mapped);
    pthread_mutex_lock(&queue_lock);
    if (base) {
      for (int i = 0; i < h->count; i++) h->copy[i] = dst[i];
      h->base = base;
      h->mapped = mapped;
      ahead_bytes += total_bytes(h);
    }
    h->busy = 0;
    atomic_fetch_sub(&queued_bytes, (long long)total_bytes(h));
    if (!base) atomic_fetch_sub(&unsettled, 1);
    atomic_store_explicit(&h->state, base ? READY : KEPT, memory_order_release);
    pthread_cond_broadcast(&copy_done);
    pthread_mutex_unlock(&queue_lock);
  }
  return NULL;
}

void glm_huge_init(GlmHugeWeights *h) {
  memset(h, 0, sizeof *h);
  pthread_mutex_init(&h->lock, NULL);
}

void glm_huge_use(GlmHugeWeights *h, const void *ptr[], const size_t bytes[], int count) {
  int state = atomic_load_explicit(&h->state, memory_order_acquire);
  if (state == NEW || state == READY) {
    pthread_mutex_lock(&h->lock);
    state = atomic_load_explicit(&h->state, memory_order_acquire);
    if (state == NEW) {
      int ok = count > 0 && count <= GLM_HUGE_MAX;
      for (int i = 0; ok && i < count; i++) {
        h->orig[i] = ptr[i];
        ok = glm_huge_source(ptr[i], bytes[i], &h->src[i]);
      }
      h->count = count;
      pthread_mutex_lock(&queue_lock);
      if (ok && !copier_started) {
        pthread_t t;
        copier_started = pthread_create(&t, NULL, copier_main, NULL) == 0;
        if (copier_started) pthread_detach(t);
      }
      ok = ok && copier_started;
      if (ok) {   /* appended: nodes are copied in the order they first ran, the order a step reads them */
        GlmHugeWeights **tail = &queue_head;
        while (*tail) tail = &(*tail)->next;
        *tail = h;
        pthread_cond_signal(&queue_wake);
      }
      state = ok ? QUEUED : KEPT;
      if (ok) {
        atomic_fetch_add(&unsettled, 1);
        atomic_fetch_add(&queued_bytes, (long long)total_bytes(h));
      }
      atomic_store_explicit(&h->state, state, memory_order_release);
      pthread_mutex_unlock(&queue_lock);
    } else if (state == READY) {
      /* The originals are valid here (ONNX Runtime just passed them): drop their pages now, not in the copier,
       * which cannot know the session still has them mapped. */
      int same = 1;
      for (int i = 0; i < h->count; i++) same = same && ptr[i] == h->orig[i];
      if (same) {
        for (int i = 0; i < h->count; i++) drop_pages(h->orig[i], h->src[i].bytes);
        atomic_fetch_add(&moved_bytes, (long long)total_bytes(h));
      } else {   /* other tensors than the copy's: keep the originals, free the copy */
        unmap(h->base, h->mapped);
        h->base = NULL;
      }
      state = same ? MOVED : KEPT;
      atomic_fetch_sub(&unsettled, 1);
      pthread_mutex_lock(&queue_lock);
      atomic_store_explicit(&h->state, state, memory_order_release);
      ahead_bytes -= total_bytes(h);
      pthread_cond_signal(&queue_wake);
      pthread_mutex_unlock(&queue_lock);
    }
    pthread_mutex_unlock(&h->lock);
  }
  if (state != MOVED) return;
  for (int i = 0; i < h->count; i++)
    if (ptr[i] != h->orig[i]) return;   /* not the tensors the copy was made from: the originals */
  for (int i = 0; i < h->count; i++) ptr[i] = h->copy[i];
}

void glm_huge_release(GlmHugeWeights *h) {
  pthread_mutex_lock(&queue_lock);
  for (GlmHugeWeights **at = &queue_head; *at; at = &(*at)->next)
    if (*at == h) {   /* still queued: its copy will never be made */
      *at = h->next;
      atomic_fetch_sub(&queued_bytes, (long long)total_bytes(h));
      break;
    }
  while (h->busy) pthread_cond_wait(&copy_done, &queue_lock);
  const int state = atomic_load(&h->state);
  if (state == QUEUED || state == READY) atomic_fetch_sub(&unsettled, 1);
  if (state == READY) {
    ahead_bytes -= total_bytes(h);
    pthread_cond_signal(&queue_wake);
  }
  pthread_mutex_unlock(&queue_lock);
  if (state == MOVED) atomic_fetch_sub(&moved_bytes, (long long)total_bytes(h));
  if (h->base) unmap(h->base, h->mapped);
  h->base = NULL;
  pthread_mutex_destroy(&h->lock);
}
