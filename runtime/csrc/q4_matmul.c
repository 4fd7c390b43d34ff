/*
 * glm_runtime._q4_matmul: a faster CPU kernel for ONNX Runtime's com.microsoft::MatMulNBits (4-bit, symmetric,
 * no zero points), loaded as an ONNX Runtime custom-op library.
 *
 * Why: at batch 1 a decode step of GLM-4-9B reads ~5 GB of int4 weights, so decode speed is read bandwidth.
 * ONNX Runtime 1.32's MatMulNBits streams them at ~20 GB/s on a 2-core Xeon that reads 32 GB/s; this kernel
 * reads each weight row front to back with software prefetch and reaches ~30 GB/s (docs/runtime.md).
 *
 * Numerics are MatMulNBits' accuracy_level 4 (what glm-export writes): activations are quantized to int8 per
 * weight block (scale = max|x| / 127, round to nearest even), dot products are exact in int32, and each block's
 * sum is scaled by (activation scale x weight scale) in float32.
 *
 * Layout (MatMulNBits, read in place, no repacking): B is [N][K/2] bytes, byte j of row n holds element 2j in its
 * low nibble and 2j+1 in its high nibble; scales are [N][K/block] float; weight = (nibble - 8) * scale.
 *
 * The kernel splits the low and high nibbles of 64 bytes into two vectors (even and odd elements), so the
 * activation is stored split the same way once per call (xe = x[0::2], xo = x[1::2]). A 4-byte lane then holds
 * elements 8g..8g+7 of one block; `corr` starts each lane's int32 sum at -8 * (sum of its 8 activations), which
 * removes the +8 offset of the nibbles without a subtract per weight.
 *
 * ONNX Runtime's C API is reached through its stable ABI (ort_abi.h): the dozen entry points this file calls are
 * looked up by their slot in the OrtApi function table of API version 8, and the custom-op description is the
 * version-8 layout. RegisterCustomOps checks the table with a status round trip before using it, and registers
 * what glm_q4_select asked for: this MatMulNBits and/or the Attention of attention.c, which shares the pool below.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define Q4_X86 1
#if defined(__has_include) && !defined(Q4_NO_AMX)
#if __has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>)
#define Q4_AMX 1   /* the compiler knows AMX (GCC 11+, clang 12+); older ones build the library without it */
#endif
#endif
#endif

#include "hugepages.h"
#include "ort_abi.h"

const OrtApiTable *glm_ort_api;

/* ---------------------------------------------------------------- the activation, quantized per block */

typedef struct {
  int K, bs;
  int8_t *xe, *xo;   /* K/2 each: even / odd elements */
  int32_t *corr;     /* K/8 lanes: -8 * sum of the lane's 8 activations */
  float *sl;         /* K/8 lanes: the activation scale of the lane's block */
} Act;

static size_t act_bytes(int K) { return (size_t)K + (size_t)(K / 8) * 8 + 64; }

static void act_layout(int K, int bs, unsigned char *mem, Act *a) {
  a->K = K; a->bs = bs;
  a->xe = (int8_t *)mem; a->xo = a->xe + K / 2;
  a->corr = (int32_t *)(mem + (((size_t)K + 63) & ~(size_t)63));
  a->sl = (float *)(a->corr + K / 8);
}

/* -8 * (sum of each lane's 8 quantized activations): see the layout note at the top. */
static void act_corrections(Act *a) {
  for (int g = 0; g < a->K / 8; g++) {
    int sum = 0;
    for (int t = 0; t < 4; t++) sum += a->xe[4 * g + t] + a->xo[4 * g + t];
    a->corr[g] = -8 * sum;
  }
}

static void act_prepare_scalar(const float *x, int K, int bs, unsigned char *mem, Act *a) {
  act_layout(K, bs, mem, a);
  for (int b0 = 0; b0 < K; b0 += bs) {
    float amax = 0.f;
    for (int i = 0; i < bs; i++) { float v = fabsf(x[b0 + i]); amax = v > amax ? v : amax; }
    const float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;   /* as MLAS: x * (1 / scale), rounded to even */
    for (int i = 0; i < bs; i += 2) {
      float e = nearbyintf(x[b0 + i] * inv), o = nearbyintf(x[b0 + i + 1] * inv);
      a->xe[(b0 + i) / 2] = (int8_t)(e > 127.f ? 127 : e < -127.f ? -127 : (int)e);
      a->xo[(b0 + i) / 2] = (int8_t)(o > 127.f ? 127 : o < -127.f ? -127 : (int)o);
    }
    for (int g = b0 / 8; g < (b0 + bs) / 8; g++) a->sl[g] = s;
  }
  act_corrections(a);
}

#ifdef Q4_X86
/* The same quantization 32 floats at a time (block sizes that are multiples of 32): max |x| is exact, x * (1 /
 * scale) is one float multiply as above, and _MM_FROUND_TO_NEAREST_INT is nearbyintf's round-to-even, so the
 * bytes are those of act_prepare_scalar. It runs on the calling thread before the pool starts: scalar, it took
 * 15 us of a 4096-wide decode matmul and 42 us of a 13696-wide one, with the other cores and the memory bus idle. */
__attribute__((target("avx2,fma")))
static void act_prepare_avx2(const float *x, int K, int bs, unsigned char *mem, Act *a) {
  act_layout(K, bs, mem, a);
  const __m256 sign = _mm256_set1_ps(-0.f), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int b0 = 0; b0 < K; b0 += bs) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < bs; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + b0 + i)));
    const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
    const float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int i = 0; i < bs; i += 32) {
      const float *p = x + b0 + i;
      __m256i q[4];   /* even elements 0-7, 8-15, odd elements 0-7, 8-15 of these 32, as int32 */
      for (int h = 0; h < 2; h++) {
        const __m256 u = _mm256_loadu_ps(p + 16 * h), v = _mm256_loadu_ps(p + 16 * h + 8);
        const __m256 e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u, v, 0x88)), 0xd8));
        const __m256 o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(u, v, 0xdd)), 0xd8));
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        q[h] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(_mm256_mul_ps(e, vinv), r))));
        q[2 + h] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(_mm256_mul_ps(o, vinv), r))));
      }
      for (int k = 0; k < 2; k++) {   /* 16 int32 -> 16 int8 in order (packs work per 128-bit half) */
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * k], q[2 * k + 1]), 0xd8);
        const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128((__m128i *)((k ? a->xo : a->xe) + (b0 + i) / 2), b);
      }
    }
    for (int g = b0 / 8; g < (b0 + bs) / 8; g++) a->sl[g] = s;
  }
  act_corrections(a);
}
#endif

typedef void (*ActFn)(const float *, int, int, unsigned char *, Act *);
static ActFn act_impl32 = act_prepare_scalar;   /* for block sizes that are multiples of 32 (choose_isa) */

static void act_prepare(const float *x, int K, int bs, unsigned char *mem, Act *a) {
  (bs % 32 ? act_prepare_scalar : act_impl32)(x, K, bs, mem, a);
}

/* ---------------------------------------------------------------- kernels: y[n0:n1] = x . W[n0:n1]^T */

/* Lanes g0.. of rows n0..n1 (the whole row from g0 = 0; the tail after a SIMD kernel otherwise). */
static void rows_scalar(const Act *a, const uint8_t *B, const float *S, int n0, int n1, float *y, int g0, int add) {
  const int K = a->K, bs = a->bs, nb = K / bs;
  for (int n = n0; n < n1; n++) {
    const uint8_t *w = B + (size_t)n * (K / 2);
    float acc = 0.f;
    for (int g = g0; g < K / 8; g++) {
      int32_t s = a->corr[g];
      for (int t = 0; t < 4; t++) {
        const uint8_t byte = w[4 * g + t];
        s += (int32_t)(byte & 15) * a->xe[4 * g + t] + (int32_t)(byte >> 4) * a->xo[4 * g + t];
      }
      acc += (float)s * a->sl[g] * S[(size_t)n * nb + (8 * g) / bs];
    }
    y[n] = add ? y[n] + acc : acc;
  }
}

#define PREFETCH_AHEAD 2048   /* bytes; 1, 4, 8 and 16 KB measured slower on GLM-4-9B's layer shapes */

#ifdef Q4_X86
/* The weight scales of a 128-element chunk spread over its 16 lanes: lane L holds elements 8L..8L+7 (of the
 * chunk), which lie in block (8L)/bs of it; one masked load of the chunk's scales, one permute. From block 128 up
 * the chunk has one scale: a broadcast load, no permute. */
typedef struct { __m512i idx; __mmask16 mask; } ScaleLanes512;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static ScaleLanes512 scale_lanes512(int bs) {
  int idx[16];
  for (int L = 0; L < 16; L++) idx[L] = bs <= 128 ? (8 * L) / bs : 0;
  return (ScaleLanes512){_mm512_loadu_si512(idx), (__mmask16)((1u << (bs <= 128 ? 128 / bs : 1)) - 1)};
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static inline __m512 chunk_scales512(ScaleLanes512 l, const float *row_scales, int c, int bs) {
  if (bs >= 128) return _mm512_set1_ps(row_scales[(128 * c) / bs]);
  return _mm512_permutexvar_ps(l.idx, _mm512_maskz_loadu_ps(l.mask, row_scales + (128 * c) / bs));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void rows_avx512vnni(const Act *a, const uint8_t *B, const float *S, int n0, int n1, float *y) {
  const int K = a->K, bs = a->bs, nb = K / bs, nc = K / 128;
  const __m512i m4 = _mm512_set1_epi8(15);
  const ScaleLanes512 lanes = scale_lanes512(bs);
#define Q4_CHUNK512(c, f) { \
    const __m512i v = _mm512_loadu_si512(w + 64 * (c)); \
    __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(a->corr + 16 * (c)), _mm512_and_si512(v, m4), \
                                      _mm512_loadu_si512(a->xe + 64 * (c))); \
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_loadu_si512(a->xo + 64 * (c))); \
    const __m512 sw = chunk_scales512(lanes, s, (c), bs); \
    f = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(a->sl + 16 * (c))), sw, f); }
  for (int n = n0; n < n1; n++) {
    const uint8_t *w = B + (size_t)n * (K / 2);
    const float *s = S + (size_t)n * nb;
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
    int c = 0;
    for (; c + 2 <= nc; c += 2) {
      _mm_prefetch((const char *)(w + 64 * c + PREFETCH_AHEAD), _MM_HINT_T0);
      _mm_prefetch((const char *)(w + 64 * c + 64 + PREFETCH_AHEAD), _MM_HINT_T0);
      Q4_CHUNK512(c, f0)
      Q4_CHUNK512(c + 1, f1)
    }
    if (c < nc) Q4_CHUNK512(c, f0)
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(f0, f1));
  }
#undef Q4_CHUNK512
  if (K % 128) rows_scalar(a, B, S, n0, n1, y, nc * 16, 1);
}

/* Prefill (M > 1): 2 weight rows x 4 activation rows at a time, so each weight vector is unpacked once for 4 rows
 * and each activation vector loaded once for 2 weight rows. Y rows are ystride floats apart. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void rows4_avx512vnni(const Act *a, const uint8_t *B, const float *S, int n0, int n1, float *Y, size_t ystride) {
  const int K = a->K, bs = a->bs, nb = K / bs, nc = K / 128;
  const __m512i m4 = _mm512_set1_epi8(15);
  const ScaleLanes512 lanes = scale_lanes512(bs);
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint8_t *w0 = B + (size_t)n * (K / 2), *w1 = w0 + K / 2;
    const float *s0 = S + (size_t)n * nb, *s1 = s0 + nb;
    __m512 f[4][2];
    for (int r = 0; r < 4; r++) f[r][0] = f[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < nc; c++) {
      const __m512i v0 = _mm512_loadu_si512(w0 + 64 * c), v1 = _mm512_loadu_si512(w1 + 64 * c);
      const __m512i lo0 = _mm512_and_si512(v0, m4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
      const __m512i lo1 = _mm512_and_si512(v1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
      const __m512 sw0 = chunk_scales512(lanes, s0, c, bs), sw1 = chunk_scales512(lanes, s1, c, bs);
      for (int r = 0; r < 4; r++) {
        const Act *ar = a + r;
        const __m512i xe = _mm512_loadu_si512(ar->xe + 64 * c), xo = _mm512_loadu_si512(ar->xo + 64 * c);
        const __m512i cr = _mm512_loadu_si512(ar->corr + 16 * c);
        const __m512 sl = _mm512_loadu_ps(ar->sl + 16 * c);
        const __m512i a0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cr, lo0, xe), hi0, xo);
        const __m512i a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cr, lo1, xe), hi1, xo);
        f[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a0), sl), sw0, f[r][0]);
        f[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a1), sl), sw1, f[r][1]);
      }
    }
    for (int r = 0; r < 4; r++) {
      Y[r * ystride + n] = _mm512_reduce_add_ps(f[r][0]);
      Y[r * ystride + n + 1] = _mm512_reduce_add_ps(f[r][1]);
    }
  }
  for (int r = 0; r < 4; r++) {
    if (K % 128) rows_scalar(a + r, B, S, n0, n, Y + r * ystride, nc * 16, 1);   /* the paired rows' tails */
    if (n < n1) rows_avx512vnni(a + r, B, S, n, n1, Y + r * ystride);             /* an odd last row, whole */
  }
}

/* Prefill of many rows (M >= GEMM_MIN_M): 32 weight rows are unpacked once into a scratch laid out across rows
 * (16 rows x 4 bytes per vector), then every activation row of the work item runs against it with the activation
 * broadcast 4 bytes at a time, so one vpdpbusd does 64 useful products and the int32 sums are scaled once per
 * block instead of once per 128 weights. The 4 bytes are the split-nibble groups of the decode kernel: even
 * quad g = elements 8g + {0,2,4,6} (xe[4g..4g+3], the low nibbles of bytes 4g..4g+3), odd quad = the high ones. */
#define GEMM_MIN_M 16
#define GEMM_NT 32

/* Unpack weight rows t0..t0+nt (nt <= 32) for the across-rows kernels: per quad group g, one 16-row gather of 4
 * bytes per half, split into low and high nibbles, written as 128-byte rows (32 weight rows x 4 bytes) of dst:
 * the low nibbles at row lo(g), the high ones at row hi(g). The VNNI kernel keeps all low rows, then all high ones
 * (lo = g, hi = K/8 + g); the AMX kernel groups each 64-element chunk's 8 low and 8 high rows into one 16-row
 * tile (lo = 16 (g / 8) + g % 8, hi = lo + 8). Then the rows' block scales, transposed: St[block][32]. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void unpack_weights(const uint8_t *B, const float *S, int K, int bs, int t0, int nt, int amx_rows,
                           uint8_t *dst, float *St) {
  const int ng = K / 8, nb = K / bs;
  const __m512i m4 = _mm512_set1_epi32(0x0F0F0F0F);
  const __m512i vindex = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(K / 2));
  for (int h = 0; h < 2; h++) {
    const int rows = nt - 16 * h < 0 ? 0 : nt - 16 * h > 16 ? 16 : nt - 16 * h;
    const __mmask16 k = (__mmask16)(rows >= 16 ? 0xFFFF : (1u << rows) - 1);
    const uint8_t *base = B + (size_t)(t0 + 16 * h) * (K / 2);
    for (int g = 0; g < ng; g++) {
      const __m512i v = rows ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, vindex, base + 4 * g, 1)
                             : _mm512_setzero_si512();
      const size_t lo = amx_rows ? (size_t)(16 * (g / 8) + g % 8) : (size_t)g;
      const size_t hi = amx_rows ? lo + 8 : (size_t)(ng + g);
      _mm512_store_si512(dst + lo * 128 + 64 * h, _mm512_and_si512(v, m4));
      _mm512_store_si512(dst + hi * 128 + 64 * h, _mm512_and_si512(_mm512_srli_epi32(v, 4), m4));
    }
  }
  for (int r = 0; r < GEMM_NT; r++)
    for (int b = 0; b < nb; b++) St[(size_t)b * GEMM_NT + r] = r < nt ? S[(size_t)(t0 + r) * nb + b] : 0.f;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void gemm_avx512vnni(const Act *acts, int m0, int m1, const uint8_t *B, const float *S, int N, int n0,
                            int n1, float *Y, size_t ystride) {
  const int K = acts[m0].K, bs = acts[m0].bs, nb = K / bs, ng = K / 8, gpb = bs / 8;
  uint32_t *E = aligned_alloc(64, (size_t)ng * GEMM_NT * 4 * 2 + (size_t)nb * GEMM_NT * 4);
  if (!E) {   /* no scratch: the per-row kernel, same numbers up to summation order */
    for (int m = m0; m < m1; m++) rows_avx512vnni(&acts[m], B, S, n0, n1, Y + (size_t)m * ystride);
    return;
  }
  uint32_t *O = E + (size_t)ng * GEMM_NT;
  float *St = (float *)(O + (size_t)ng * GEMM_NT);
  (void)N;
  for (int t0 = n0; t0 < n1; t0 += GEMM_NT) {
    const int nt = n1 - t0 < GEMM_NT ? n1 - t0 : GEMM_NT;
    unpack_weights(B, S, K, bs, t0, nt, 0, (uint8_t *)E, St);
    int m = m0;
    for (; m + 4 <= m1; m += 4) {
      __m512 f[4][2];
      for (int i = 0; i < 4; i++) f[i][0] = f[i][1] = _mm512_setzero_ps();
      for (int b = 0; b < nb; b++) {
        __m512i acc[4][2];
        for (int i = 0; i < 4; i++) {
          int32_t c = 0;
          for (int g = b * gpb; g < (b + 1) * gpb; g++) c += acts[m + i].corr[g];
          acc[i][0] = acc[i][1] = _mm512_set1_epi32(c);
        }
        for (int g = b * gpb; g < (b + 1) * gpb; g++) {
          const __m512i e0 = _mm512_load_si512(E + (size_t)g * GEMM_NT), e1 = _mm512_load_si512(E + (size_t)g * GEMM_NT + 16);
          const __m512i o0 = _mm512_load_si512(O + (size_t)g * GEMM_NT), o1 = _mm512_load_si512(O + (size_t)g * GEMM_NT + 16);
          for (int i = 0; i < 4; i++) {
            int32_t xe4, xo4;
            memcpy(&xe4, acts[m + i].xe + 4 * g, 4);
            memcpy(&xo4, acts[m + i].xo + 4 * g, 4);
            const __m512i xe = _mm512_set1_epi32(xe4), xo = _mm512_set1_epi32(xo4);
            acc[i][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[i][0], e0, xe), o0, xo);
            acc[i][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[i][1], e1, xe), o1, xo);
          }
        }
        const __m512 s0 = _mm512_load_ps(St + (size_t)b * GEMM_NT), s1 = _mm512_load_ps(St + (size_t)b * GEMM_NT + 16);
        for (int i = 0; i < 4; i++) {
          const __m512 sx = _mm512_set1_ps(acts[m + i].sl[b * gpb]);
          f[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][0]), sx), s0, f[i][0]);
          f[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][1]), sx), s1, f[i][1]);
        }
      }
      const __mmask16 k0 = (__mmask16)(nt >= 16 ? 0xFFFF : (1u << nt) - 1);
      const __mmask16 k1 = (__mmask16)(nt >= 32 ? 0xFFFF : nt > 16 ? (1u << (nt - 16)) - 1 : 0);
      for (int i = 0; i < 4; i++) {
        float *y = Y + (size_t)(m + i) * ystride + t0;
        _mm512_mask_storeu_ps(y, k0, f[i][0]);
        _mm512_mask_storeu_ps(y + 16, k1, f[i][1]);
      }
    }
    for (; m < m1; m++) rows_avx512vnni(&acts[m], B, S, t0, t0 + nt, Y + (size_t)m * ystride);
  }
  free(E);
}

/* AVX2 without VNNI: maddubs (u8 x s8 -> s16 pairs; 15 * 127 * 2 * 2 < 32767, so no saturation) then madd. A 64-element
 * chunk (32 bytes of a row) gives 8 lanes of 8 elements each; lane L lies in block (8L)/bs of the chunk. Its weight
 * scales: one broadcast from block 64 up, else 2 (block 32) or 4 (block 16) floats loaded whole and spread with a
 * permute. (They were copied into a zeroed stack array and loaded back: a 16-byte load over a 4-byte store, which the
 * CPU cannot forward, stalled every chunk; GLM-4-9B decode ran at a third of the bandwidth.) Two weight rows at a
 * time share each activation load. */
__attribute__((target("avx2,fma")))
static inline __m256 chunk_scales256(const float *row_scales, int c, int bs, __m256i pidx) {
  if (bs >= 64) return _mm256_set1_ps(row_scales[(64 * c) / bs]);
  const float *p = row_scales + (64 * c) / bs;
  const __m128 v = bs == 32 ? _mm_castpd_ps(_mm_load_sd((const double *)p)) : _mm_loadu_ps(p);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), pidx);
}

__attribute__((target("avx2,fma")))
static inline float hsum256(__m256 f) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

__attribute__((target("avx2,fma")))
static void rows_avx2(const Act *a, const uint8_t *B, const float *S, int n0, int n1, float *y) {
  const int K = a->K, bs = a->bs, nb = K / bs, nc = K / 64;
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  int idx[8];
  for (int L = 0; L < 8; L++) idx[L] = bs <= 64 ? (8 * L) / bs : 0;
  const __m256i pidx = _mm256_loadu_si256((const __m256i *)idx);
#define Q4_DOT256(v, xe, xo, cr) \
  _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16( \
      _mm256_maddubs_epi16(_mm256_and_si256((v), m4), (xe)), \
      _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16((v), 4), m4), (xo))), ones), (cr))
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint8_t *w0 = B + (size_t)n * (K / 2), *w1 = w0 + K / 2;
    const float *s0 = S + (size_t)n * nb, *s1 = s0 + nb;
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    for (int c = 0; c < nc; c++) {
      if ((c & 1) == 0) {
        _mm_prefetch((const char *)(w0 + 32 * c + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + 32 * c + PREFETCH_AHEAD), _MM_HINT_T0);
      }
      const __m256i xe = _mm256_loadu_si256((const __m256i *)(a->xe + 32 * c));
      const __m256i xo = _mm256_loadu_si256((const __m256i *)(a->xo + 32 * c));
      const __m256i cr = _mm256_loadu_si256((const __m256i *)(a->corr + 8 * c));
      const __m256 sl = _mm256_loadu_ps(a->sl + 8 * c);
      const __m256i d0 = Q4_DOT256(_mm256_loadu_si256((const __m256i *)(w0 + 32 * c)), xe, xo, cr);
      const __m256i d1 = Q4_DOT256(_mm256_loadu_si256((const __m256i *)(w1 + 32 * c)), xe, xo, cr);
      f0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d0), sl), chunk_scales256(s0, c, bs, pidx), f0);
      f1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d1), sl), chunk_scales256(s1, c, bs, pidx), f1);
    }
    y[n] = hsum256(f0);
    y[n + 1] = hsum256(f1);
  }
  for (; n < n1; n++) {
    const uint8_t *w = B + (size_t)n * (K / 2);
    const float *s = S + (size_t)n * nb;
    __m256 f0 = _mm256_setzero_ps();
    for (int c = 0; c < nc; c++) {
      if ((c & 1) == 0) _mm_prefetch((const char *)(w + 32 * c + PREFETCH_AHEAD), _MM_HINT_T0);
      const __m256i d = Q4_DOT256(_mm256_loadu_si256((const __m256i *)(w + 32 * c)),
                                  _mm256_loadu_si256((const __m256i *)(a->xe + 32 * c)),
                                  _mm256_loadu_si256((const __m256i *)(a->xo + 32 * c)),
                                  _mm256_loadu_si256((const __m256i *)(a->corr + 8 * c)));
      f0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(a->sl + 8 * c)),
                           chunk_scales256(s, c, bs, pidx), f0);
    }
    y[n] = hsum256(f0);
  }
#undef Q4_DOT256
  if (K % 64) rows_scalar(a, B, S, n0, n1, y, nc * 8, 1);
}

#ifdef Q4_AMX
/* Prefill on AMX (Intel Sapphire Rapids and later): one TDPBSUD multiplies a 16 x 64 tile of int8 activations by
 * a 64 x 16 tile of weight nibbles, 16 x 16 x 64 products per instruction where vpdpbusd does 64. The activations of the
 * whole call are laid out once (amx_layout: per 64-element chunk the 32 even then the 32 odd elements, the
 * split-nibble order of the decode kernel), the weight nibbles of 32 rows are gathered once per work item into
 * tile rows (row r < 8: the low nibbles of quad 8c + r of 16 weight rows; r >= 8: the high nibbles of quad
 * 8c + r - 8), and each block's int32 sums are taken out of the tiles and scaled as in the other kernels: exact
 * integer sums per block, then activation scale x weight scale in float32. Needs K and the block a multiple of 64;
 * the nibbles' +8 offset is removed with the corrections (corr) summed per block. */
#define AMX_MTILE 256   /* activation rows per work item: the gather of 32 weight rows is shared by all of them */

typedef struct __attribute__((packed)) {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

static int amx_usable(void) {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
  /* Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* Activation rows m0..m1 in the AMX order; A is M x K int8. */
static void amx_layout(const Act *acts, int M, int K, int8_t *A) {
  for (int m = 0; m < M; m++)
    for (int c = 0; c < K / 64; c++) {
      memcpy(A + (size_t)m * K + 64 * c, acts[m].xe + 32 * c, 32);
      memcpy(A + (size_t)m * K + 64 * c + 32, acts[m].xo + 32 * c, 32);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
static void gemm_amx(const Act *acts, const int8_t *A, int m0, int m1, const uint8_t *B, const float *S, int n0,
                     int n1, float *Y, size_t ystride) {
  const int K = acts[m0].K, bs = acts[m0].bs, nb = K / bs, gpb = bs / 8, cpb = bs / 64;
  const size_t pbytes = (size_t)K * 32, cbytes = ((size_t)(m1 - m0) * nb * 4 + 63) & ~(size_t)63;
  uint8_t *P = aligned_alloc(64, pbytes + (size_t)nb * GEMM_NT * 4 + cbytes + 2 * 1024 + 16 * GEMM_NT * 4);
  if (!P) {
    for (int m = m0; m < m1; m++) rows_avx512vnni(&acts[m], B, S, n0, n1, Y + (size_t)m * ystride);
    return;
  }
  float *St = (float *)(P + pbytes);
  int32_t *csum = (int32_t *)(St + (size_t)nb * GEMM_NT), *C = (int32_t *)((uint8_t *)csum + cbytes);
  float *F = (float *)(C + 512);
  for (int m = m0; m < m1; m++)
    for (int b = 0; b < nb; b++) {
      int32_t t = 0;
      for (int g = b * gpb; g < (b + 1) * gpb; g++) t += acts[m].corr[g];
      csum[(size_t)(m - m0) * nb + b] = t;
    }
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 5; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  for (int t0 = n0; t0 < n1; t0 += GEMM_NT) {
    const int nt = n1 - t0 < GEMM_NT ? n1 - t0 : GEMM_NT;
    unpack_weights(B, S, K, bs, t0, nt, 1, P, St);
    const __mmask16 k0 = (__mmask16)(nt >= 16 ? 0xFFFF : (1u << nt) - 1);
    const __mmask16 k1 = (__mmask16)(nt >= 32 ? 0xFFFF : nt > 16 ? (1u << (nt - 16)) - 1 : 0);
    int m = m0;
    for (; m + 16 <= m1; m += 16) {
      for (int i = 0; i < 16 * GEMM_NT; i += 16) _mm512_store_ps(F + i, _mm512_setzero_ps());
      for (int b = 0; b < nb; b++) {
        _tile_zero(3);
        _tile_zero(4);
        for (int c = b * cpb; c < (b + 1) * cpb; c++) {
          _tile_loadd(0, A + (size_t)m * K + 64 * c, K);
          _tile_loadd(1, P + (size_t)c * 2048, 128);
          _tile_loadd(2, P + (size_t)c * 2048 + 64, 128);
          _tile_dpbsud(3, 0, 1);
          _tile_dpbsud(4, 0, 2);
        }
        _tile_stored(3, C, 64);
        _tile_stored(4, C + 256, 64);
        const __m512 s0 = _mm512_load_ps(St + (size_t)b * GEMM_NT), s1 = _mm512_load_ps(St + (size_t)b * GEMM_NT + 16);
        for (int i = 0; i < 16; i++) {
          const __m512i cs = _mm512_set1_epi32(csum[(size_t)(m + i - m0) * nb + b]);
          const __m512 sx = _mm512_set1_ps(acts[m + i].sl[b * gpb]);
          const __m512 a0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_load_si512(C + 16 * i), cs)), sx);
          const __m512 a1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_load_si512(C + 256 + 16 * i), cs)), sx);
          _mm512_store_ps(F + 32 * i, _mm512_fmadd_ps(a0, s0, _mm512_load_ps(F + 32 * i)));
          _mm512_store_ps(F + 32 * i + 16, _mm512_fmadd_ps(a1, s1, _mm512_load_ps(F + 32 * i + 16)));
        }
      }
      for (int i = 0; i < 16; i++) {
        float *y = Y + (size_t)(m + i) * ystride + t0;
        _mm512_mask_storeu_ps(y, k0, _mm512_load_ps(F + 32 * i));
        _mm512_mask_storeu_ps(y + 16, k1, _mm512_load_ps(F + 32 * i + 16));
      }
    }
    for (; m < m1; m++) rows_avx512vnni(&acts[m], B, S, t0, t0 + nt, Y + (size_t)m * ystride);
  }
  _tile_release();
  free(P);
}
#endif  /* Q4_AMX */
#endif

typedef void (*RowsFn)(const Act *, const uint8_t *, const float *, int, int, float *);
static void rows_scalar_fn(const Act *a, const uint8_t *B, const float *S, int n0, int n1, float *y) {
  rows_scalar(a, B, S, n0, n1, y, 0, 0);
}

typedef void (*Rows4Fn)(const Act *, const uint8_t *, const float *, int, int, float *, size_t);
static RowsFn rows_impl = rows_scalar_fn;
static Rows4Fn rows4_impl;   /* NULL: prefill runs rows_impl once per activation row */
typedef void (*GemmFn)(const Act *, int, int, const uint8_t *, const float *, int, int, int, float *, size_t);
static GemmFn gemm_impl;     /* NULL: no across-rows prefill kernel on this path */
static const char *isa_name = "scalar";
#ifdef Q4_AMX
static int amx_on;           /* prefill on AMX tiles (gemm_amx) where K and the block allow it */
#endif

static pthread_once_t isa_once = PTHREAD_ONCE_INIT;
static void choose_isa_once(void);
static void choose_isa(void) { pthread_once(&isa_once, choose_isa_once); }
static void choose_isa_once(void) {
  const char *force = getenv("GLM_Q4_ISA");   /* tests run every path on one machine */
#ifdef Q4_X86
  __builtin_cpu_init();
  const int has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const int has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (force && strcmp(force, "scalar") == 0) return;
  if (has512 && !(force && strcmp(force, "avx2") == 0)) {
    rows_impl = rows_avx512vnni; rows4_impl = rows4_avx512vnni; gemm_impl = gemm_avx512vnni;
    act_impl32 = act_prepare_avx2; isa_name = "avx512vnni";
#ifdef Q4_AMX
    if (!(force && strcmp(force, "avx512vnni") == 0) && amx_usable()) { amx_on = 1; isa_name = "avx512vnni+amx"; }
#endif
    return;
  }
  if (has2) { rows_impl = rows_avx2; act_impl32 = act_prepare_avx2; isa_name = "avx2"; }
#else
  (void)force;
#endif
}

/* ---------------------------------------------------------------- a small thread pool */

/* ONNX Runtime's intra-op pool is not reachable through API version 8, so the kernel has its own: the calling
 * thread plus (threads - 1) workers that spin briefly between calls (decode calls this op every ~0.1-1 ms) and
 * then sleep. One job at a time; a second concurrent caller runs its job alone on its own thread. */

#define MTILE 64   /* activation rows per prefill work item: 64 x ~8 KB (K = 4096) of quantized activations */

typedef struct {
  const Act *acts; int M; const uint8_t *B; const float *S; int N; float *Y;
  int tiles, tile;          /* M == 1: contiguous row ranges per thread; M > 1: tiles of rows, taken in turn */
  atomic_int next;
  void (*task)(void *, int, int); void *task_arg;   /* set: a job of another kernel (glm_pool_run) */
  const int8_t *amx_a;      /* set: prefill on AMX, the activations in amx_layout; work items of AMX_MTILE rows */
  int mtile;
} Job;

static int pool_threads = 1;
static pthread_t *workers;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER, job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static Job *current;
static atomic_uint generation;
static atomic_int pending;
static int started;
static unsigned start_generation;   /* the generation when the workers were created (under pool_lock) */

static void run_share(Job *j, int who, int nthreads) {
  if (j->task) {
    j->task(j->task_arg, who, nthreads);
    return;
  }
  if (j->M == 1) {   /* contiguous halves: long streams (64 KB-1 MB chunks taken in turn measured 0-20 % slower) */
    const int n0 = (int)((long long)j->N * who / nthreads), n1 = (int)((long long)j->N * (who + 1) / nthreads);
    if (n1 > n0) rows_impl(&j->acts[0], j->B, j->S, n0, n1, j->Y);
    return;
  }
  /* work items: (block of MTILE activation rows) x (tile of weight rows), activation blocks outermost so both
   * threads share one block's activations in L2 while they stream different weight tiles */
  const int ntiles = (j->N + j->tile - 1) / j->tile;
  for (int t; (t = atomic_fetch_add(&j->next, 1)) < j->tiles;) {
    const int mb = (t / ntiles) * j->mtile, nt = t % ntiles;
    const int m1 = mb + j->mtile < j->M ? mb + j->mtile : j->M;
    const int n0 = nt * j->tile, n1 = n0 + j->tile < j->N ? n0 + j->tile : j->N;
    int m = mb;
#ifdef Q4_AMX
    if (j->amx_a) {
      gemm_amx(j->acts, j->amx_a, mb, m1, j->B, j->S, n0, n1, j->Y, (size_t)j->N);
      continue;
    }
#endif
    if (gemm_impl && j->M >= GEMM_MIN_M) {
      gemm_impl(j->acts, mb, m1, j->B, j->S, j->N, n0, n1, j->Y, (size_t)j->N);
      continue;
    }
    if (rows4_impl)
      for (; m + 4 <= m1; m += 4) rows4_impl(&j->acts[m], j->B, j->S, n0, n1, j->Y + (size_t)m * j->N, (size_t)j->N);
    for (; m < m1; m++) rows_impl(&j->acts[m], j->B, j->S, n0, n1, j->Y + (size_t)m * j->N);
  }
}

/* How long a worker spins before it sleeps: a decode step calls the kernel 4 times per layer with 0.05-0.3 ms of
 * other ops between; on GLM-4-9B 0.3-10 ms all gave the same speed within noise. */
static const double spin_seconds = 1e-3;
static double now_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *worker_main(void *arg) {
  const int who = (int)(intptr_t)arg;
  unsigned seen = start_generation;   /* not the live value: a job may be posted before this thread first runs */
  for (;;) {
    const double until = now_seconds() + spin_seconds;
    for (int spins = 0; atomic_load_explicit(&generation, memory_order_acquire) == seen; spins++) {
#ifdef Q4_X86
      _mm_pause();
#endif
      if ((spins & 63) == 63 && now_seconds() > until) break;
    }
    if (atomic_load_explicit(&generation, memory_order_acquire) == seen) {
      pthread_mutex_lock(&pool_lock);
      while (atomic_load(&generation) == seen) pthread_cond_wait(&pool_wake, &pool_lock);
      pthread_mutex_unlock(&pool_lock);
    }
    seen = atomic_load(&generation);
    run_share(current, who, pool_threads);
    atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
  }
  return NULL;
}

/* Called once, before the first session; later calls are ignored (the pool cannot shrink safely). */
int glm_q4_set_threads(int n) {
  pthread_mutex_lock(&pool_lock);
  if (!started) {
    pool_threads = n < 1 ? 1 : n > 256 ? 256 : n;
    start_generation = atomic_load(&generation);
    if (pool_threads > 1) {
      workers = calloc((size_t)pool_threads, sizeof(pthread_t));
      for (int i = 1; workers && i < pool_threads; i++)
        if (pthread_create(&workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0) { pool_threads = i; break; }
    }
    started = 1;
  }
  const int got = pool_threads;
  pthread_mutex_unlock(&pool_lock);
  return got;
}

const char *glm_q4_isa(void) { choose_isa(); return isa_name; }

static void run_job(Job *j) {
  if (pool_threads > 1 && pthread_mutex_trylock(&job_lock) == 0) {
    current = j;
    atomic_store(&pending, pool_threads - 1);
    pthread_mutex_lock(&pool_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run_share(j, 0, pool_threads);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) {
#ifdef Q4_X86
      _mm_pause();
#endif
    }
    pthread_mutex_unlock(&job_lock);
    return;
  }
  run_share(j, 0, 1);
}

void glm_pool_run(void (*fn)(void *, int, int), void *arg) {
  Job j = {.task = fn, .task_arg = arg};
  run_job(&j);
}

/* The whole product, callable without ONNX Runtime (tests, benchmarks). X [M][K] float, Y [M][N] float. */
int glm_q4_matmul(const float *X, int M, int K, const uint8_t *B, const float *S, int N, int bs, float *Y) {
  if (M < 0 || K <= 0 || N <= 0 || bs < 16 || (bs & (bs - 1)) || K % bs) return -1;
  if (M == 0) return 0;
  choose_isa();
  const size_t per = act_bytes(K);
  unsigned char *mem = aligned_alloc(64, ((per * (size_t)M) + 63) & ~(size_t)63);
  Act *acts = malloc(sizeof(Act) * (size_t)M);
  if (!mem || !acts) { free(mem); free(acts); return -2; }
  for (int m = 0; m < M; m++) act_prepare(X + (size_t)m * K, K, bs, mem + per * (size_t)m, &acts[m]);
  Job j = {.acts = acts, .M = M, .B = B, .S = S, .N = N, .Y = Y, .tile = 64, .mtile = MTILE};
  int8_t *amx_a = NULL;
#ifdef Q4_AMX
  if (amx_on && M >= GEMM_MIN_M && K % 64 == 0 && bs % 64 == 0 && (amx_a = aligned_alloc(64, (size_t)M * K))) {
    amx_layout(acts, M, K, amx_a);
    j.amx_a = amx_a;
    j.mtile = AMX_MTILE;
  }
#endif
  j.tiles = ((N + j.tile - 1) / j.tile) * ((M + j.mtile - 1) / j.mtile);
  atomic_init(&j.next, 0);
  run_job(&j);
  free(mem); free(acts); free(amx_a);
  return 0;
}

/* ---------------------------------------------------------------- the custom op */

/* weights: moved onto huge pages in the background after the node first runs (hugepages.c) */
typedef struct {
  int64_t K, N, bs;
  GlmHugeWeights weights;
} Kernel;
static atomic_long op_unsupported;

/* MatMulNBits nodes this kernel was asked to create and cannot run as ONNX Runtime would: glm_runtime reads the
 * count right after the session is created and, if it is not 0, creates the session again without this library. */
long glm_q4_unsupported(void) { return atomic_load(&op_unsupported); }

static void *create_kernel(const CustomOp *op, const OrtApiTable *api, const void *info) {
  (void)op; (void)api;
  Kernel *k = calloc(1, sizeof(Kernel));
  int64_t bits = 0, level = 0;
  if (!k) return NULL;
  glm_huge_init(&k->weights);
  GetAttrIntFn attr = ORT_FN(SLOT_KernelInfoGetAttribute_int64, GetAttrIntFn);
  const int ok = !status_failed(attr(info, "K", &k->K)) && !status_failed(attr(info, "N", &k->N)) &&
                 !status_failed(attr(info, "block_size", &k->bs)) && !status_failed(attr(info, "bits", &bits)) &&
                 !status_failed(attr(info, "accuracy_level", &level)) &&
                 bits == 4 && level == 4 && k->K > 0 && k->K <= INT32_MAX && k->N > 0 && k->N <= INT32_MAX &&
                 k->bs >= 16 && k->bs <= 4096 && (k->bs & (k->bs - 1)) == 0 && k->K % k->bs == 0;
  if (!ok) {
    k->K = 0;   /* never run: compute would fill the output with NaN */
    atomic_fetch_add(&op_unsupported, 1);
  }
  return k;
}

static void fill_nan(float *y, size_t n) { for (size_t i = 0; i < n; i++) y[i] = NAN; }

static atomic_long op_calls, op_bad_inputs;

/* Calls refused because the node's tensors do not match its attributes (see compute). */
long glm_q4_bad_inputs(void) { return atomic_load(&op_bad_inputs); }

/* How many times ONNX Runtime has run this kernel: glm_runtime checks the library is in use, not shadowed. */
long glm_q4_calls(void) { return atomic_load(&op_calls); }

int64_t glm_element_count(const void *value, int64_t dims[8], size_t *rank) {
  void *info = NULL;
  int64_t n = -1;
  *rank = 0;
  if (status_failed(ORT_FN(SLOT_GetTensorTypeAndShape, GetShapeFn)(value, &info))) return -1;
  if (!status_failed(ORT_FN(SLOT_GetDimensionsCount, GetDimCountFn)(info, rank)) && *rank >= 1 && *rank <= 8 &&
      !status_failed(ORT_FN(SLOT_GetDimensions, GetDimsFn)(info, dims, *rank))) {
    n = 1;
    for (size_t i = 0; i < *rank; i++) n = dims[i] < 0 || (dims[i] && n > INT64_MAX / dims[i]) ? -1 : n * dims[i];
  }
  ORT_FN(SLOT_ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  return n;
}

/* The weights come from the artifact, which is untrusted: B and the scales must hold exactly what K, N and the
 * block size say (ONNX Runtime's own kernel checks the same when it pre-packs them), and A's rows must be K long.
 * When they do not, the kernel creates no output, so the run fails with ONNX Runtime's error instead of reading
 * past a buffer; the engine reports that as a broken artifact. */
static void compute(void *kernel, void *ctx) {
  Kernel *k = kernel;
  atomic_fetch_add(&op_calls, 1);
  const void *in[3];
  void *out = NULL;
  size_t nin = 0, rank = 0, rank_b = 0;
  int64_t dims[8], dims_b[8];
  if (k->K <= 0 || status_failed(ORT_FN(SLOT_KernelContext_GetInputCount, GetCountFn)(ctx, &nin)) || nin != 3) return;
  for (size_t i = 0; i < 3; i++)
    if (status_failed(ORT_FN(SLOT_KernelContext_GetInput, GetInputFn)(ctx, i, &in[i])) || !in[i]) return;
  const int64_t a_count = glm_element_count(in[0], dims, &rank);
  if (a_count < 0 || dims[rank - 1] != k->K || glm_element_count(in[1], dims_b, &rank_b) != k->N * (k->K / 2) ||
      glm_element_count(in[2], dims_b, &rank_b) != k->N * (k->K / k->bs)) {
    atomic_fetch_add(&op_bad_inputs, 1);
    return;
  }
  const int64_t M = a_count / k->K;
  if (M > INT32_MAX) return;
  dims[rank - 1] = k->N;   /* the output: A's shape with N last */
  if (status_failed(ORT_FN(SLOT_KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &out))) return;
  float *y = NULL; void *x = NULL, *b = NULL, *s = NULL;
  GetDataFn data = ORT_FN(SLOT_GetTensorMutableData, GetDataFn);
  if (status_failed(data(out, (void **)&y))) return;
  if (status_failed(data((void *)in[0], &x)) || status_failed(data((void *)in[1], &b)) ||
      status_failed(data((void *)in[2], &s))) {
    fill_nan(y, (size_t)M * (size_t)k->N);
    return;
  }
  const void *w[2] = {b, s};
  const size_t w_bytes[2] = {(size_t)k->N * (size_t)(k->K / 2), (size_t)k->N * (size_t)(k->K / k->bs) * 4};
  glm_huge_use(&k->weights, w, w_bytes, 2);
  b = (void *)w[0];
  s = (void *)w[1];
  if (glm_q4_matmul(x, (int)M, (int)k->K, b, s, (int)k->N, (int)k->bs, y))
    fill_nan(y, (size_t)M * (size_t)k->N);   /* only out of memory gets here */
}

static void destroy_kernel(void *kernel) {
  Kernel *k = kernel;
  if (!k) return;
  glm_huge_release(&k->weights);
  free(k);
}
static const char *op_name(const CustomOp *op) { (void)op; return "MatMulNBits"; }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const CustomOp *op, size_t i) { (void)op; return i == 1 ? TYPE_UINT8 : TYPE_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 3; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }

static const CustomOp q4_op = {
  ORT_API_VERSION_USED, create_kernel, op_name, op_provider, input_type, input_count, output_type, output_count,
  compute, destroy_kernel, required, required,
};

static void *domain, *attention_domain[2];
static pthread_mutex_t register_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int registered, matmul_wanted = 1, attention_wanted;

/* What the next RegisterCustomOps (a session's register_custom_ops_library) adds: MatMulNBits (matmul != 0), and
 * the Attention of attention.c in the ONNX domain (attention 1: on the pool, 2: on the calling thread only, for
 * sessions whose other ops run on ONNX Runtime's pool; 0: not). glm_runtime asks for Attention only for graphs
 * whose Attention nodes all have the form it implements. */
void glm_q4_select(int matmul, int attention) {
  atomic_store(&matmul_wanted, matmul != 0);
  atomic_store(&attention_wanted, attention == 1 || attention == 2 ? attention : 0);
}

/* Whether RegisterCustomOps found the ABI it expects and added the kernel (else ONNX Runtime's runs). */
int glm_q4_registered(void) { return atomic_load(&registered); }

OrtStatus *RegisterCustomOps(void *session_options, const OrtApiBase *base) {
  glm_ort_api = base->GetApi(ORT_API_VERSION_USED);
  if (!glm_ort_api) return NULL;
  /* ABI check: a status made by slot 0 must read back through slot 2 */
  OrtStatus *probe = ORT_FN(SLOT_CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, "glm-q4-probe");
  const char *msg = probe ? ORT_FN(SLOT_GetErrorMessage, GetErrorMessageFn)(probe) : NULL;
  const int abi_ok = msg && strcmp(msg, "glm-q4-probe") == 0;
  if (probe) ORT_FN(SLOT_ReleaseStatus, ReleaseFn)(probe);
  if (!abi_ok) return NULL;   /* cannot even build a status to say so; glm_runtime checks the op ran */
  choose_isa();
  OrtStatus *st = NULL;
  pthread_mutex_lock(&register_lock);
  if (!domain && atomic_load(&matmul_wanted)) {
    void *d = NULL;
    st = ORT_FN(SLOT_CreateCustomOpDomain, CreateDomainFn)("com.microsoft", &d);
    if (!st) st = ORT_FN(SLOT_CustomOpDomain_Add, DomainAddFn)(d, &q4_op);
    if (!st) domain = d;   /* on failure the half-made domain is leaked: a few bytes, once */
  }
  if (!st && atomic_load(&matmul_wanted)) st = ORT_FN(SLOT_AddCustomOpDomain, AddDomainFn)(session_options, domain);
  const int attention = atomic_load(&attention_wanted);
  if (!st && attention) {
    if (!attention_domain[attention - 1]) {
      void *d = NULL;
      st = ORT_FN(SLOT_CreateCustomOpDomain, CreateDomainFn)("", &d);
      if (!st) st = ORT_FN(SLOT_CustomOpDomain_Add, DomainAddFn)(d, attention == 1 ? &glm_attention_op
                                                                                   : &glm_attention_op_single);
      if (!st) attention_domain[attention - 1] = d;
    }
    if (!st) st = ORT_FN(SLOT_AddCustomOpDomain, AddDomainFn)(session_options, attention_domain[attention - 1]);
  }
  if (!st) atomic_store(&registered, 1);
  pthread_mutex_unlock(&register_lock);
  return st;
}
