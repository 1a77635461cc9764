/* The fastest plain read of a buffer this bench knows, launched like our kernels (one call on TVM's
 * thread pool, each task a contiguous share): the floor under any kernel that must read those bytes.
 * Each task reads its share as 4 interleaved streams with software prefetch 2048 bytes ahead, as the
 * LUT kernel reads its row blocks (measured here: 1 stream without prefetch reads 8 MiB ~25 % slower;
 * torch's sum slower still). Built by bench/kernels.py with cc -O2 -mavx2 -shared. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

struct ParallelEnv {
  void* sync_handle;
  int32_t num_task;
};
extern int TVMBackendParallelLaunch(int (*f)(int, struct ParallelEnv*, void*), void* cdata, int num_task);

struct Job {
  const uint8_t* p;
  size_t n;
  int64_t sums[64];
};

static int read_task(int task, struct ParallelEnv* env, void* cdata) {
  struct Job* j = (struct Job*)cdata;
  const int nt = env ? env->num_task : 1;
  const size_t per = (j->n / nt) & ~(size_t)255;  /* whole 4 x 64-byte steps; the tail goes to the last task */
  const uint8_t* p = j->p + (size_t)task * per;
  const size_t mine = task == nt - 1 ? j->n - (size_t)task * per : per;
  const size_t q = (mine / 4) & ~(size_t)63;
  __m256i acc = _mm256_setzero_si256();
  for (size_t off = 0; off < q; off += 64) {
    for (int s = 0; s < 4; ++s) {
      const uint8_t* c = p + s * q + off;
      _mm_prefetch((const char*)(c + 2048), _MM_HINT_T0);
      acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i*)c));
      acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i*)(c + 32)));
    }
  }
  int64_t s = 0;
  for (size_t i = 4 * q; i < mine; ++i) s += p[i];
  int64_t lanes[4];
  _mm256_storeu_si256((__m256i*)lanes, acc);
  j->sums[task & 63] = s + lanes[0] + lanes[1] + lanes[2] + lanes[3];
  return 0;
}

/* Reads all n bytes at p on TVM's thread pool (tasks 0: all its threads); returns their 64-bit lane sum
 * so that no load can be dropped. */
int64_t shiftadd_read_probe(const uint8_t* p, size_t n, int tasks) {
  struct Job j = {p, n, {0}};
  TVMBackendParallelLaunch(read_task, &j, tasks);
  int64_t s = 0;
  for (int i = 0; i < 64; ++i) s += j.sums[i];
  return s;
}
