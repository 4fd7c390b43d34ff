/*
 * glm_runtime._q4_matmul, second kernel: ONNX's Attention (opset 23) in the form glm-export writes it, run over the
 * cache slots the mask admits instead of the whole KV buffer.
 *
 * Why: ONNX Runtime 1.32's CPU Attention computes every slot of the buffer, valid or not, per query head. On
 * GLM-4-9B a decode step cost 186 ms with a 64-slot buffer and 295 ms with 4096 slots (docs/runtime.md), where
 * reading 4096 slots of float32 K and V for 40 layers takes ~11 ms. This kernel reads each admitted K and V row
 * once per KV group (the group's query heads share it: GQA without repeating K/V) and stops after the last slot
 * the mask admits, so a buffer larger than the context costs nothing.
 *
 * What it takes: Q [B, Hq, S, D], K and V [B, Hkv, T, D] float32 with Hq a multiple of Hkv, a bool mask
 * [B or 1, 1, S, T], the attribute `scale`; no is_causal, softcap, past inputs or QK output (glm_export.model's
 * form). glm_runtime.cpu_kernel checks that every Attention node of a graph has this form before it lets the kernel
 * stand in; a node created with other attributes is counted (glm_attention_unsupported), and a run whose shapes
 * differ produces no output, so ONNX Runtime fails the run instead of this kernel reading past a buffer.
 *
 * Numerics, float32 as ONNX Runtime's: s = (scale * q) . k, p = exp(s - max s) over the admitted slots (a
 * degree-6 polynomial, Cephes' expf: ~2 ulp), y = (sum p v) / (sum p). A row the mask admits nothing of gets 0.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ATTN_X86 1
#endif

static atomic_long attn_calls, attn_unsupported, attn_bad_inputs;

/* Runs of the op: glm_runtime checks the session uses this kernel, not ONNX Runtime's. */
long glm_attention_calls(void) { return atomic_load(&attn_calls); }
/* Attention nodes created with attributes this kernel does not implement. */
long glm_attention_unsupported(void) { return atomic_load(&attn_unsupported); }
/* Runs refused because the inputs do not have the shapes above. */
long glm_attention_bad_inputs(void) { return atomic_load(&attn_bad_inputs); }

typedef struct {
  const float *q, *k, *v;
  const unsigned char *mask;
  float *y;
  int B, Hq, Hkv, S, T, D, mask_b;   /* mask_b: the mask has one row set per batch entry (else one for all) */
  float scale;
  int chunk, units;                  /* work items: (batch entry, KV group, `chunk` query rows) */
  atomic_int next, done;
} AttnJob;

/* exp(x) for x <= 0 (scores minus their maximum); 0 below -87.3, where expf is denormal or 0. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float keep = x < -87.3f ? 0.0f : 1.0f;
  x = x < -87.3f ? -87.3f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;   /* round to nearest: 1.5 * 2^23 */
  const float n = t - 12582912.0f;
  int32_t bits;
  memcpy(&bits, &t, 4);
  const int32_t e = (bits - 0x4B400000 + 127) << 23;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float scale;
  memcpy(&scale, &e, 4);
  return p * scale * keep;
}

/* Query row i of batch entry b against KV group g: where its mask, K, V and output rows are, and how many slots
 * count (tl: up to the last one the mask admits). Its G heads' queries go into qt transposed ([D][G]) and
 * pre-scaled. tl = 0: the mask admits nothing, and the output rows are already zero. */
typedef struct { const unsigned char *m; const float *K, *V; float *y; size_t head_stride; int tl; } Row;

static inline __attribute__((always_inline)) Row row_begin(const AttnJob *j, int b, int g, int i, const int G,
                                                           float *qt) {
  const int D = j->D, T = j->T, S = j->S;
  Row r = {.m = j->mask + ((size_t)(j->mask_b ? b : 0) * (size_t)S + (size_t)i) * (size_t)T,
           .head_stride = (size_t)S * (size_t)D};
  const unsigned char *last = memrchr(r.m, 1, (size_t)T);
  const size_t first_head = ((size_t)b * (size_t)j->Hq + (size_t)g * (size_t)G) * r.head_stride + (size_t)i * D;
  r.y = j->y + first_head;
  if (!last) {
    for (int h = 0; h < G; h++) memset(r.y + h * r.head_stride, 0, sizeof(float) * (size_t)D);
    return r;
  }
  r.tl = (int)(last - r.m) + 1;
  r.K = j->k + ((size_t)b * (size_t)j->Hkv + (size_t)g) * (size_t)T * (size_t)D;
  r.V = j->v + ((size_t)b * (size_t)j->Hkv + (size_t)g) * (size_t)T * (size_t)D;
  const float *q = j->q + first_head;
  for (int h = 0; h < G; h++)
    for (int d = 0; d < D; d++) qt[d * G + h] = q[h * r.head_stride + d] * j->scale;
  return r;
}

/* One query row i of batch entry b against KV group g: its G heads at once. G is a constant where the caller
 * passes one (GLM-4: 32 / 2 = 16), so the head loops become whole vectors. buf: see scratch_floats. */
static inline __attribute__((always_inline)) void attn_row(const AttnJob *j, int b, int g, int i, float *buf,
                                                           const int G) {
  const int D = j->D;
  float *qt = buf, *acc = qt + (size_t)D * G, *mx = acc + (size_t)G * D, *sum = mx + G, *sc = sum + G;
  const Row r = row_begin(j, b, g, i, G, qt);
  if (!r.tl) return;
  const int tl = r.tl;
  const unsigned char *m = r.m;
  const float *K = r.K, *V = r.V;
  float *y = r.y;
  const size_t head_stride = r.head_stride;

  /* scores, four slots at a time: each column of qt is loaded once for four K rows */
  int t = 0;
  for (; t + 4 <= tl; t += 4) {
    float a0[G], a1[G], a2[G], a3[G];
    for (int h = 0; h < G; h++) a0[h] = a1[h] = a2[h] = a3[h] = 0.0f;
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      const float *c = qt + d * G;
      const float x0 = k0[d], x1 = k0[D + d], x2 = k0[2 * D + d], x3 = k0[3 * D + d];
      for (int h = 0; h < G; h++) {
        a0[h] += c[h] * x0; a1[h] += c[h] * x1; a2[h] += c[h] * x2; a3[h] += c[h] * x3;
      }
    }
    float *s = sc + (size_t)t * G;
    for (int h = 0; h < G; h++) { s[h] = a0[h]; s[G + h] = a1[h]; s[2 * G + h] = a2[h]; s[3 * G + h] = a3[h]; }
  }
  for (; t < tl; t++) {
    float a[G];
    for (int h = 0; h < G; h++) a[h] = 0.0f;
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++)
      for (int h = 0; h < G; h++) a[h] += qt[d * G + h] * k0[d];
    for (int h = 0; h < G; h++) sc[(size_t)t * G + h] = a[h];
  }
  for (t = 0; t < tl; t++)
    if (!m[t])
      for (int h = 0; h < G; h++) sc[(size_t)t * G + h] = -INFINITY;

  /* softmax over the admitted slots (slot tl - 1 is one, so each maximum is finite) */
  for (int h = 0; h < G; h++) { mx[h] = -INFINITY; sum[h] = 0.0f; }
  for (t = 0; t < tl; t++) {
    const float *s = sc + (size_t)t * G;
    for (int h = 0; h < G; h++) mx[h] = s[h] > mx[h] ? s[h] : mx[h];
  }
  for (t = 0; t < tl; t++) {
    float *s = sc + (size_t)t * G;
    for (int h = 0; h < G; h++) {
      const float p = exp_nonpositive(s[h] - mx[h]);
      s[h] = p;
      sum[h] += p;
    }
  }

  /* y = sum p v / sum p, four slots per pass over the accumulators */
  memset(acc, 0, sizeof(float) * (size_t)G * D);
  for (t = 0; t + 4 <= tl; t += 4) {
    const float *v0 = V + (size_t)t * D, *s = sc + (size_t)t * G;
    for (int h = 0; h < G; h++) {
      const float p0 = s[h], p1 = s[G + h], p2 = s[2 * G + h], p3 = s[3 * G + h];
      float *o = acc + (size_t)h * D;
      for (int d = 0; d < D; d++) o[d] += p0 * v0[d] + p1 * v0[D + d] + p2 * v0[2 * D + d] + p3 * v0[3 * D + d];
    }
  }
  for (; t < tl; t++) {
    const float *v0 = V + (size_t)t * D, *s = sc + (size_t)t * G;
    for (int h = 0; h < G; h++) {
      float *o = acc + (size_t)h * D;
      for (int d = 0; d < D; d++) o[d] += s[h] * v0[d];
    }
  }
  for (int h = 0; h < G; h++) {
    const float inv = 1.0f / sum[h];
    for (int d = 0; d < D; d++) y[h * head_stride + d] = acc[(size_t)h * D + d] * inv;
  }
}

#define ATTN_ROWS(name, target)                                                                        \
  static target void name(const AttnJob *j, int b, int g, int i0, int i1, float *buf) {               \
    const int G = j->Hq / j->Hkv;                                                                      \
    for (int i = i0; i < i1; i++) {                                                                    \
      if (G == 16) attn_row(j, b, g, i, buf, 16);                                                      \
      else if (G == 8) attn_row(j, b, g, i, buf, 8);                                                   \
      else attn_row(j, b, g, i, buf, G);                                                               \
    }                                                                                                  \
  }
ATTN_ROWS(rows_plain, )
#ifdef ATTN_X86
ATTN_ROWS(rows_avx2, __attribute__((target("avx2,fma"))))
ATTN_ROWS(rows_avx512, __attribute__((target("avx512f,avx512vl,fma"))))
#endif

#ifdef ATTN_X86
/* exp(x) for x <= 0, 16 lanes: exp_nonpositive's arithmetic. */
__attribute__((target("avx512f,fma"))) static inline __m512 exp512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t),
                                      _mm512_set1_epi32(0x4B400000)), _mm512_set1_epi32(127)), 23);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

#define VCHUNK 64   /* slots per pass of the output tiles: 64 V rows of D = 128 floats stay in L1 */

/* attn_row for 16 heads per KV group (GLM-4) and D a multiple of 64, with the heads as the 16 lanes of a vector.
 * Scores: four K rows at a time against the transposed queries. Output: tiles of 4 heads x 64 columns (16
 * accumulators) over chunks of VCHUNK slots. */
__attribute__((target("avx512f,fma"))) static void row16_avx512(const AttnJob *j, int b, int g, int i, float *buf) {
  const int D = j->D, G = 16;
  float *qt = buf, *acc = qt + (size_t)D * G, *sc = acc + (size_t)G * D + 2 * G;
  const Row r = row_begin(j, b, g, i, G, qt);
  if (!r.tl) return;
  const int tl = r.tl;
  const unsigned char *m = r.m;
  const float *K = r.K, *V = r.V;
  float *y = r.y;
  const size_t hs = r.head_stride;

  int t = 0;
  for (; t + 4 <= tl; t += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      const __m512 c = _mm512_load_ps(qt + d * G);
      a0 = _mm512_fmadd_ps(c, _mm512_set1_ps(k0[d]), a0);
      a1 = _mm512_fmadd_ps(c, _mm512_set1_ps(k0[D + d]), a1);
      a2 = _mm512_fmadd_ps(c, _mm512_set1_ps(k0[2 * D + d]), a2);
      a3 = _mm512_fmadd_ps(c, _mm512_set1_ps(k0[3 * D + d]), a3);
    }
    float *s = sc + (size_t)t * G;
    _mm512_store_ps(s, a0); _mm512_store_ps(s + G, a1); _mm512_store_ps(s + 2 * G, a2); _mm512_store_ps(s + 3 * G, a3);
  }
  for (; t < tl; t++) {
    __m512 a = _mm512_setzero_ps();
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++) a = _mm512_fmadd_ps(_mm512_load_ps(qt + d * G), _mm512_set1_ps(k0[d]), a);
    _mm512_store_ps(sc + (size_t)t * G, a);
  }
  __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
  for (t = 0; t < tl; t++) {
    if (!m[t]) _mm512_store_ps(sc + (size_t)t * G, _mm512_set1_ps(-INFINITY));
    else mx = _mm512_max_ps(mx, _mm512_load_ps(sc + (size_t)t * G));
  }
  for (t = 0; t < tl; t++) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(sc + (size_t)t * G), mx));
    _mm512_store_ps(sc + (size_t)t * G, p);
    sum = _mm512_add_ps(sum, p);
  }

  memset(acc, 0, sizeof(float) * (size_t)G * D);
  for (int t0 = 0; t0 < tl; t0 += VCHUNK) {
    const int t1 = t0 + VCHUNK < tl ? t0 + VCHUNK : tl;
    for (int h0 = 0; h0 < G; h0 += 4)
      for (int d0 = 0; d0 < D; d0 += 64) {
        __m512 o[4][4];
        for (int h = 0; h < 4; h++)
          for (int c = 0; c < 4; c++) o[h][c] = _mm512_load_ps(acc + (size_t)(h0 + h) * D + d0 + 16 * c);
        for (t = t0; t < t1; t++) {
          const float *vr = V + (size_t)t * D + d0, *p = sc + (size_t)t * G + h0;
          const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                       v3 = _mm512_loadu_ps(vr + 48);
          for (int h = 0; h < 4; h++) {
            const __m512 ph = _mm512_set1_ps(p[h]);
            o[h][0] = _mm512_fmadd_ps(ph, v0, o[h][0]); o[h][1] = _mm512_fmadd_ps(ph, v1, o[h][1]);
            o[h][2] = _mm512_fmadd_ps(ph, v2, o[h][2]); o[h][3] = _mm512_fmadd_ps(ph, v3, o[h][3]);
          }
        }
        for (int h = 0; h < 4; h++)
          for (int c = 0; c < 4; c++) _mm512_store_ps(acc + (size_t)(h0 + h) * D + d0 + 16 * c, o[h][c]);
      }
  }
  float sums[16] __attribute__((aligned(64)));
  _mm512_store_ps(sums, sum);
  for (int h = 0; h < G; h++) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[h]);
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(y + h * hs + d, _mm512_mul_ps(_mm512_load_ps(acc + (size_t)h * D + d), inv));
  }
}

__attribute__((target("avx512f,fma"))) static void rows16_avx512(const AttnJob *j, int b, int g, int i0, int i1,
                                                                   float *buf) {
  if (j->Hq / j->Hkv != 16 || j->D % 64) {
    rows_avx512(j, b, g, i0, i1, buf);
    return;
  }
  for (int i = i0; i < i1; i++) row16_avx512(j, b, g, i, buf);
}
#endif

#ifdef ATTN_X86
/* exp(x) for x <= 0, 8 lanes: exp_nonpositive's arithmetic. */
__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(12582912.0f));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(12582912.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t),
                                      _mm256_set1_epi32(0x4B400000)), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  return _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* row16_avx512 for CPUs with AVX2 and no AVX-512 (AMD Zen 2/3, Intel before Ice Lake): the 16 heads of a group
 * are two 8-lane halves. Scores: four K rows at a time (8 accumulators). Output: tiles of 2 heads x 32 columns
 * (8 accumulators, 4 V loads: 16 registers hold a tile) over chunks of VCHUNK slots. Same arithmetic as the
 * AVX-512 path, so the same error bound (tests/test_attention_kernel.py). */
__attribute__((target("avx2,fma"))) static void row16_avx2(const AttnJob *j, int b, int g, int i, float *buf) {
  const int D = j->D, G = 16;
  float *qt = buf, *acc = qt + (size_t)D * G, *sc = acc + (size_t)G * D + 2 * G;
  const Row r = row_begin(j, b, g, i, G, qt);
  if (!r.tl) return;
  const int tl = r.tl;
  const unsigned char *m = r.m;
  const float *K = r.K, *V = r.V;
  float *y = r.y;
  const size_t hs = r.head_stride;

  int t = 0;
  for (; t + 4 <= tl; t += 4) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      const __m256 lo = _mm256_load_ps(qt + d * G), hi = _mm256_load_ps(qt + d * G + 8);
      __m256 x = _mm256_broadcast_ss(k0 + d);
      a0 = _mm256_fmadd_ps(lo, x, a0); b0 = _mm256_fmadd_ps(hi, x, b0);
      x = _mm256_broadcast_ss(k0 + D + d);
      a1 = _mm256_fmadd_ps(lo, x, a1); b1 = _mm256_fmadd_ps(hi, x, b1);
      x = _mm256_broadcast_ss(k0 + 2 * D + d);
      a2 = _mm256_fmadd_ps(lo, x, a2); b2 = _mm256_fmadd_ps(hi, x, b2);
      x = _mm256_broadcast_ss(k0 + 3 * D + d);
      a3 = _mm256_fmadd_ps(lo, x, a3); b3 = _mm256_fmadd_ps(hi, x, b3);
    }
    float *s = sc + (size_t)t * G;
    _mm256_store_ps(s, a0); _mm256_store_ps(s + 8, b0); _mm256_store_ps(s + G, a1); _mm256_store_ps(s + G + 8, b1);
    _mm256_store_ps(s + 2 * G, a2); _mm256_store_ps(s + 2 * G + 8, b2);
    _mm256_store_ps(s + 3 * G, a3); _mm256_store_ps(s + 3 * G + 8, b3);
  }
  for (; t < tl; t++) {
    __m256 a = _mm256_setzero_ps(), c = a;
    const float *k0 = K + (size_t)t * D;
    for (int d = 0; d < D; d++) {
      const __m256 x = _mm256_broadcast_ss(k0 + d);
      a = _mm256_fmadd_ps(_mm256_load_ps(qt + d * G), x, a);
      c = _mm256_fmadd_ps(_mm256_load_ps(qt + d * G + 8), x, c);
    }
    _mm256_store_ps(sc + (size_t)t * G, a); _mm256_store_ps(sc + (size_t)t * G + 8, c);
  }
  __m256 mlo = _mm256_set1_ps(-INFINITY), mhi = mlo, slo = _mm256_setzero_ps(), shi = slo;
  for (t = 0; t < tl; t++) {
    float *s = sc + (size_t)t * G;
    if (!m[t]) { _mm256_store_ps(s, _mm256_set1_ps(-INFINITY)); _mm256_store_ps(s + 8, _mm256_set1_ps(-INFINITY)); }
    else { mlo = _mm256_max_ps(mlo, _mm256_load_ps(s)); mhi = _mm256_max_ps(mhi, _mm256_load_ps(s + 8)); }
  }
  for (t = 0; t < tl; t++) {
    float *s = sc + (size_t)t * G;
    const __m256 plo = exp256(_mm256_sub_ps(_mm256_load_ps(s), mlo));
    const __m256 phi = exp256(_mm256_sub_ps(_mm256_load_ps(s + 8), mhi));
    _mm256_store_ps(s, plo); _mm256_store_ps(s + 8, phi);
    slo = _mm256_add_ps(slo, plo); shi = _mm256_add_ps(shi, phi);
  }

  memset(acc, 0, sizeof(float) * (size_t)G * D);
  for (int t0 = 0; t0 < tl; t0 += VCHUNK) {
    const int t1 = t0 + VCHUNK < tl ? t0 + VCHUNK : tl;
    for (int d0 = 0; d0 < D; d0 += 32)
      for (int h0 = 0; h0 < G; h0 += 2) {
        float *o0 = acc + (size_t)h0 * D + d0, *o1 = o0 + D;
        __m256 x0 = _mm256_load_ps(o0), x1 = _mm256_load_ps(o0 + 8), x2 = _mm256_load_ps(o0 + 16),
               x3 = _mm256_load_ps(o0 + 24), z0 = _mm256_load_ps(o1), z1 = _mm256_load_ps(o1 + 8),
               z2 = _mm256_load_ps(o1 + 16), z3 = _mm256_load_ps(o1 + 24);
        for (t = t0; t < t1; t++) {
          const float *vr = V + (size_t)t * D + d0, *p = sc + (size_t)t * G + h0;
          const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), v2 = _mm256_loadu_ps(vr + 16),
                       v3 = _mm256_loadu_ps(vr + 24);
          __m256 ph = _mm256_broadcast_ss(p);
          x0 = _mm256_fmadd_ps(ph, v0, x0); x1 = _mm256_fmadd_ps(ph, v1, x1);
          x2 = _mm256_fmadd_ps(ph, v2, x2); x3 = _mm256_fmadd_ps(ph, v3, x3);
          ph = _mm256_broadcast_ss(p + 1);
          z0 = _mm256_fmadd_ps(ph, v0, z0); z1 = _mm256_fmadd_ps(ph, v1, z1);
          z2 = _mm256_fmadd_ps(ph, v2, z2); z3 = _mm256_fmadd_ps(ph, v3, z3);
        }
        _mm256_store_ps(o0, x0); _mm256_store_ps(o0 + 8, x1); _mm256_store_ps(o0 + 16, x2);
        _mm256_store_ps(o0 + 24, x3); _mm256_store_ps(o1, z0); _mm256_store_ps(o1 + 8, z1);
        _mm256_store_ps(o1 + 16, z2); _mm256_store_ps(o1 + 24, z3);
      }
  }
  float sums[16] __attribute__((aligned(32)));
  _mm256_store_ps(sums, slo);
  _mm256_store_ps(sums + 8, shi);
  for (int h = 0; h < G; h++) {
    const __m256 inv = _mm256_set1_ps(1.0f / sums[h]);
    for (int d = 0; d < D; d += 8)
      _mm256_storeu_ps(y + h * hs + d, _mm256_mul_ps(_mm256_load_ps(acc + (size_t)h * D + d), inv));
  }
}

__attribute__((target("avx2,fma"))) static void rows16_avx2(const AttnJob *j, int b, int g, int i0, int i1,
                                                               float *buf) {
  if (j->Hq / j->Hkv != 16 || j->D % 32) {
    rows_avx2(j, b, g, i0, i1, buf);
    return;
  }
  for (int i = i0; i < i1; i++) row16_avx2(j, b, g, i, buf);
}
#endif

typedef void (*AttnRowsFn)(const AttnJob *, int, int, int, int, float *);
static AttnRowsFn attn_rows = rows_plain;
static const char *attn_isa = "scalar";
static pthread_once_t attn_once = PTHREAD_ONCE_INIT;
static void attn_choose_isa(void) {
#ifdef ATTN_X86
  const char *force = getenv("GLM_Q4_ISA");   /* the same switch as the int4 kernel: tests run every path */
  __builtin_cpu_init();
  if (force && strcmp(force, "scalar") == 0) return;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && !(force && strcmp(force, "avx2") == 0)) {
    attn_rows = rows16_avx512; attn_isa = "avx512"; return;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) { attn_rows = rows16_avx2; attn_isa = "avx2"; }
#endif
}

const char *glm_attention_isa(void) { pthread_once(&attn_once, attn_choose_isa); return attn_isa; }

/* Floats of scratch per thread for rows reaching slot tl: q transposed [D][G], accumulators [G][D], max and sum
 * [G], scores [tl][G]. */
static size_t scratch_floats(const AttnJob *j) {
  const size_t G = (size_t)(j->Hq / j->Hkv);
  return 2 * (size_t)j->D * G + 2 * G + (size_t)j->T * G + 64;
}

/* Each pool thread keeps its scratch (grown, never shrunk): a decode step calls the op once per layer. */
static _Thread_local float *tl_buf;
static _Thread_local size_t tl_cap;

static float *scratch(size_t floats) {
  if (floats > tl_cap) {
    free(tl_buf);
    tl_buf = aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
    tl_cap = tl_buf ? floats : 0;
  }
  return tl_buf;
}

static void attn_task(void *arg, int who, int nthreads) {
  (void)who; (void)nthreads;
  AttnJob *j = arg;
  float *buf = scratch(scratch_floats(j));
  if (!buf) return;   /* out of memory: the other threads take the work, or the call reports it undone */
  const int chunks = (j->S + j->chunk - 1) / j->chunk;
  for (int u; (u = atomic_fetch_add(&j->next, 1)) < j->units;) {
    const int c = u % chunks, bg = u / chunks, g = bg % j->Hkv, b = bg / j->Hkv;
    const int i0 = c * j->chunk, i1 = i0 + j->chunk < j->S ? i0 + j->chunk : j->S;
    attn_rows(j, b, g, i0, i1, buf);
    atomic_fetch_add(&j->done, 1);
  }
}

/* The whole op, callable without ONNX Runtime (tests). pool: split the work over the pool (else the calling thread
 * does it all). Returns 0, -1 for bad shapes, -2 when out of memory. */
int glm_attention(const float *q, const float *k, const float *v, const unsigned char *mask, float *y, int B,
                  int Hq, int Hkv, int S, int T, int D, int mask_b, float scale, int pool) {
  if (B < 0 || S < 0 || T < 0 || Hkv <= 0 || Hq <= 0 || Hq % Hkv || D <= 0 || D > 4096 || Hq / Hkv > 256) return -1;
  if ((long long)B * Hq * S == 0) return 0;
  pthread_once(&attn_once, attn_choose_isa);
  AttnJob j = {.q = q, .k = k, .v = v, .mask = mask, .y = y, .B = B, .Hq = Hq, .Hkv = Hkv, .S = S, .T = T,
               .D = D, .mask_b = mask_b, .scale = scale, .chunk = S < 16 ? S : 16};
  const long long units = (long long)B * Hkv * ((S + j.chunk - 1) / j.chunk);
  if (units > INT32_MAX) return -1;
  j.units = (int)units;
  atomic_init(&j.next, 0);
  atomic_init(&j.done, 0);
  if (T == 0) {   /* nothing admitted anywhere */
    memset(y, 0, sizeof(float) * (size_t)B * Hq * S * D);
    return 0;
  }
  if (pool) glm_pool_run(attn_task, &j);
  else attn_task(&j, 0, 1);
  if (atomic_load(&j.done) < j.units) {   /* every thread failed to get its scratch */
    float *buf = scratch(scratch_floats(&j));
    if (!buf) return -2;
    atomic_store(&j.next, 0);
    atomic_store(&j.done, 0);
    attn_task(&j, 0, 1);
  }
  return 0;
}

/* ---------------------------------------------------------------- the custom op */

typedef struct { float scale; int has_scale, ok, pool; } AttnKernel;

static void *attn_create(const CustomOp *op, const OrtApiTable *api, const void *info) {
  (void)api;
  AttnKernel *k = calloc(1, sizeof(AttnKernel));
  if (!k) return NULL;
  k->pool = op == &glm_attention_op;
  GetAttrIntFn attr_int = ORT_FN(SLOT_KernelInfoGetAttribute_int64, GetAttrIntFn);
  GetAttrFloatFn attr_float = ORT_FN(SLOT_KernelInfoGetAttribute_float, GetAttrFloatFn);
  int64_t value = 0;
  float softcap = 0.0f;
  k->has_scale = !status_failed(attr_float(info, "scale", &k->scale));
  k->ok = 1;
  /* attributes whose presence (or a non-default value) changes the op's meaning */
  const char *absent[] = {"q_num_heads", "kv_num_heads"};   /* 3-D inputs */
  for (size_t a = 0; a < 2; a++)
    if (!status_failed(attr_int(info, absent[a], &value))) k->ok = 0;
  const char *zero[] = {"is_causal", "qk_matmul_output_mode"};
  for (size_t a = 0; a < 2; a++)
    if (!status_failed(attr_int(info, zero[a], &value)) && value != 0) k->ok = 0;
  if (!status_failed(attr_float(info, "softcap", &softcap)) && softcap != 0.0f) k->ok = 0;
  if (k->has_scale && !isfinite(k->scale)) k->ok = 0;
  if (!k->ok) atomic_fetch_add(&attn_unsupported, 1);
  return k;
}

static void attn_compute(void *kernel, void *ctx) {
  const AttnKernel *k = kernel;
  atomic_fetch_add(&attn_calls, 1);
  size_t nin = 0;
  const void *in[4];
  if (!k->ok || status_failed(ORT_FN(SLOT_KernelContext_GetInputCount, GetCountFn)(ctx, &nin)) || nin != 4) {
    atomic_fetch_add(&attn_bad_inputs, 1);
    return;
  }
  for (size_t i = 0; i < 4; i++)
    if (status_failed(ORT_FN(SLOT_KernelContext_GetInput, GetInputFn)(ctx, i, &in[i])) || !in[i]) return;
  int64_t qd[8], kd[8], vd[8], md[8];
  size_t qr = 0, kr = 0, vr = 0, mr = 0;
  const int shapes_ok =
      glm_element_count(in[0], qd, &qr) >= 0 && glm_element_count(in[1], kd, &kr) >= 0 &&
      glm_element_count(in[2], vd, &vr) >= 0 && glm_element_count(in[3], md, &mr) >= 0 && qr == 4 && kr == 4 &&
      vr == 4 && mr == 4 && kd[0] == qd[0] && vd[0] == qd[0] && vd[1] == kd[1] && vd[2] == kd[2] &&
      kd[3] == qd[3] && vd[3] == qd[3] && kd[1] > 0 && qd[1] % kd[1] == 0 && (md[0] == 1 || md[0] == qd[0]) &&
      md[1] == 1 && md[2] == qd[2] && md[3] == kd[2] && qd[0] <= INT32_MAX && qd[1] <= INT32_MAX &&
      qd[2] <= INT32_MAX && kd[2] <= INT32_MAX && qd[3] <= 4096 && qd[1] / kd[1] <= 256;
  if (!shapes_ok) {
    atomic_fetch_add(&attn_bad_inputs, 1);
    return;
  }
  void *out = NULL, *y = NULL, *q = NULL, *kk = NULL, *v = NULL, *m = NULL;
  GetDataFn data = ORT_FN(SLOT_GetTensorMutableData, GetDataFn);
  if (status_failed(ORT_FN(SLOT_KernelContext_GetOutput, GetOutputFn)(ctx, 0, qd, 4, &out)) ||
      status_failed(data(out, &y)))
    return;
  if (status_failed(data((void *)in[0], &q)) || status_failed(data((void *)in[1], &kk)) ||
      status_failed(data((void *)in[2], &v)) || status_failed(data((void *)in[3], &m)))
    return;
  const float scale = k->has_scale ? k->scale : 1.0f / sqrtf((float)qd[3]);
  if (glm_attention(q, kk, v, m, y, (int)qd[0], (int)qd[1], (int)kd[1], (int)qd[2], (int)kd[2], (int)qd[3],
                    md[0] != 1 || qd[0] == 1, scale, k->pool)) {
    const size_t n = (size_t)qd[0] * (size_t)qd[1] * (size_t)qd[2] * (size_t)qd[3];
    for (size_t i = 0; i < n; i++) ((float *)y)[i] = NAN;   /* only out of memory gets here */
  }
}

static void attn_destroy(void *kernel) { free(kernel); }
static const char *attn_name(const CustomOp *op) { (void)op; return "Attention"; }
static const char *attn_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int attn_input_type(const CustomOp *op, size_t i) { (void)op; return i == 3 ? TYPE_BOOL : TYPE_FLOAT; }
static size_t attn_input_count(const CustomOp *op) { (void)op; return 4; }
static int attn_output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t attn_output_count(const CustomOp *op) { (void)op; return 1; }
static int attn_required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }

const CustomOp glm_attention_op = {
  ORT_API_VERSION_USED, attn_create, attn_name, attn_provider, attn_input_type, attn_input_count,
  attn_output_type, attn_output_count, attn_compute, attn_destroy, attn_required, attn_required,
};
const CustomOp glm_attention_op_single = {
  ORT_API_VERSION_USED, attn_create, attn_name, attn_provider, attn_input_type, attn_input_count,
  attn_output_type, attn_output_count, attn_compute, attn_destroy, attn_required, attn_required,
};
