/* keras_dp's CPU noise kernel: standard normal float32 numbers from a
 * 64-bit key, shared by the JAX FFI handler and the TensorFlow ops.
 *
 * Pair j (0 <= j < ceil(n / 2)) hashes the counter (j, 0) with Threefry-2x32
 * (20 rounds, JAX's `threefry_2x32`) under the key, and turns the two 32-bit
 * words into two independent normals by the Box-Muller transform:
 *
 *   u     = (top 24 bits of word 0 + 1) / 2**24            in (0, 1]
 *   r     = sqrt(-2 log u)                                  at most 5.77
 *   theta = q pi / 2 + phi, q = top 2 bits of word 1, phi uniform in
 *           [-pi / 4, pi / 4) from its other 30 bits
 *   z[j] = r cos(theta),  z[j + ceil(n / 2)] = r sin(theta)
 *
 * log, sin and cos are Cephes' single-precision polynomials (sin and cos
 * only on [-pi/4, pi/4], the quadrant comes from the bits), written as
 * branch-free arithmetic so that the compiler vectorises the loop. Each
 * number is within about 1e-6 of the same formula in float64
 * (tests/test_native.py).
 */
#ifndef KERAS_DP_NOISE_H_
#define KERAS_DP_NOISE_H_

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Pairs are made in blocks of this many: the words and the transform's
 * intermediates stay in the L1 cache. */
#define KDP_BLOCK 1024

static inline uint32_t kdp_rotl(uint32_t x, int r) {
  return (x << r) | (x >> (32 - r));
}

/* Natural log of x in (0, 1]: Cephes logf's polynomial, about 1 ulp. */
static inline float kdp_log(float x) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  float e = (float)((int32_t)(bits >> 23) - 126);
  bits = (bits & 0x007fffffu) | 0x3f000000u; /* mantissa in [0.5, 1) */
  float m;
  memcpy(&m, &bits, 4);
  const float below = (float)(m < 0.70710678f);
  e -= below;
  m = m + m * below - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

/* Threefry-2x32, 20 rounds (JAX's `threefry_2x32`): the words of counter
 * (c0, c1) under the key. */
static inline void kdp_threefry(uint32_t key0, uint32_t key1, uint32_t c0,
                                uint32_t c1, uint32_t *w0, uint32_t *w1) {
  const uint32_t ks2 = key0 ^ key1 ^ 0x1BD11BDAu;
  uint32_t x0 = c0 + key0, x1 = c1 + key1;
#define KDP_ROUND(r) \
  x0 += x1;          \
  x1 = kdp_rotl(x1, r); \
  x1 ^= x0;
  KDP_ROUND(13) KDP_ROUND(15) KDP_ROUND(26) KDP_ROUND(6)
  x0 += key1; x1 += ks2 + 1u;
  KDP_ROUND(17) KDP_ROUND(29) KDP_ROUND(16) KDP_ROUND(24)
  x0 += ks2; x1 += key0 + 2u;
  KDP_ROUND(13) KDP_ROUND(15) KDP_ROUND(26) KDP_ROUND(6)
  x0 += key0; x1 += key1 + 3u;
  KDP_ROUND(17) KDP_ROUND(29) KDP_ROUND(16) KDP_ROUND(24)
  x0 += key1; x1 += ks2 + 4u;
  KDP_ROUND(13) KDP_ROUND(15) KDP_ROUND(26) KDP_ROUND(6)
  x0 += ks2; x1 += key0 + 5u;
#undef KDP_ROUND
  *w0 = x0;
  *w1 = x1;
}

/* r (cos theta, sin theta) for the angle word w: theta = q pi / 2 + phi,
 * q the top 2 bits, phi uniform in [-pi / 4, pi / 4) from the other 30 bits;
 * sin and cos by Cephes' single-precision polynomials on [-pi/4, pi/4],
 * branch-free so that loops over it vectorise. */
static inline void kdp_polar(float r, uint32_t w, float *a, float *b) {
  const uint32_t q = w >> 30;
  const float phi =
      ((float)(w & 0x3FFFFFFFu) * 9.313225746154785e-10f - 0.5f) *
      1.5707963267948966f;
  const float p2 = phi * phi;
  float s = -1.9515295891E-4f;
  s = s * p2 + 8.3321608736E-3f;
  s = s * p2 - 1.6666654611E-1f;
  s = s * p2 * phi + phi;
  float c = 2.443315711809948E-5f;
  c = c * p2 - 1.388731625493765E-3f;
  c = c * p2 + 4.166664568298827E-2f;
  c = c * p2 * p2 - 0.5f * p2 + 1.0f;
  /* (c, s) turned by q quarter turns: q = 1 gives (-s, c), q = 2 gives
   * (-c, -s), q = 3 gives (s, -c). */
  const float odd = (float)(q & 1u);
  const float sign = 1.0f - 2.0f * (float)(q >> 1);
  *a = r * sign * (c - odd * (s + c));
  *b = r * sign * (s + odd * (c - s));
}

/* `count` (at most KDP_BLOCK) pairs from pair index `first`: the cosine
 * halves into `a`, the sine halves into `b`. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void kdp_pairs(uint32_t key0, uint32_t key1, int64_t first,
                      int64_t count, float *__restrict a,
                      float *__restrict b) {
  uint32_t w0[KDP_BLOCK], w1[KDP_BLOCK];
  for (int64_t j = 0; j < count; j++) {
    kdp_threefry(key0, key1, (uint32_t)(first + j), 0u, &w0[j], &w1[j]);
  }
  for (int64_t j = 0; j < count; j++) {
    const float u = (float)((w0[j] >> 8) + 1u) * 5.9604644775390625e-8f;
    kdp_polar(__builtin_sqrtf(-2.0f * kdp_log(u)), w1[j], &a[j], &b[j]);
  }
}

/* Number of pairs for n numbers. */
static inline int64_t kdp_num_pairs(int64_t n) { return (n + 1) / 2; }

/* z[0:n] for pair indices [lo, hi) (lo a multiple of KDP_BLOCK). */
static inline void kdp_standard_normal_range(uint32_t key0, uint32_t key1,
                                             float *z, int64_t n, int64_t lo,
                                             int64_t hi) {
  const int64_t half = kdp_num_pairs(n);
  if (hi > half) hi = half;
  float tail[KDP_BLOCK];
  for (int64_t start = lo; start < hi; start += KDP_BLOCK) {
    const int64_t count = hi - start < KDP_BLOCK ? hi - start : KDP_BLOCK;
    /* With n odd, the last pair's sine has no place: it goes to `tail`. */
    const int64_t count_b = n - half - start < count ? n - half - start : count;
    float *b = count_b == count ? z + half + start : tail;
    kdp_pairs(key0, key1, start, count, z + start, b);
    if (b == tail && count_b > 0) memcpy(z + half + start, tail, count_b * 4);
  }
}

/* A flat noise vector over several gradients: number i of the flat draw
 * belongs to gradient k for offsets[k] <= i < offsets[k + 1], and lands in
 * out[k][i - offsets[k]] as grads[k][i - offsets[k]] + stddev * z[i]. */
typedef struct {
  int64_t num;
  const int64_t *offsets; /* num + 1 entries, offsets[0] = 0 */
  const float *const *grads;
  float *const *out;
  float stddev;
} kdp_segments;

/* Adds stddev * z[0:count], flat numbers [flat, flat + count). */
static inline void kdp_add_run(const kdp_segments *seg, int64_t flat,
                               const float *z, int64_t count) {
  int64_t k = 0;
  while (seg->offsets[k + 1] <= flat) k++; /* few gradients: linear search */
  while (count > 0) {
    const int64_t local = flat - seg->offsets[k];
    int64_t take = seg->offsets[k + 1] - flat;
    if (take > count) take = count;
    const float *g = seg->grads[k] + local;
    float *o = seg->out[k] + local;
    const float s = seg->stddev;
    for (int64_t i = 0; i < take; i++) o[i] = g[i] + s * z[i];
    flat += take;
    z += take;
    count -= take;
    k++;
  }
}

/* The segments' noisy gradients for pair indices [lo, hi): the same
 * numbers as kdp_standard_normal_range over the flat vector, added as
 * they are made (one pass over memory). */
static inline void kdp_noisy_range(uint32_t key0, uint32_t key1,
                                   const kdp_segments *seg, int64_t lo,
                                   int64_t hi) {
  const int64_t n = seg->offsets[seg->num];
  const int64_t half = kdp_num_pairs(n);
  if (hi > half) hi = half;
  float a[KDP_BLOCK], b[KDP_BLOCK];
  for (int64_t start = lo; start < hi; start += KDP_BLOCK) {
    const int64_t count = hi - start < KDP_BLOCK ? hi - start : KDP_BLOCK;
    const int64_t count_b = n - half - start < count ? n - half - start : count;
    kdp_pairs(key0, key1, start, count, a, b);
    kdp_add_run(seg, start, a, count);
    if (count_b > 0) kdp_add_run(seg, half + start, b, count_b);
  }
}

/* Secure mode (keras_dp/secure_noise.py has the same formulas in framework
 * ops): number i is half the sum of the four normals of pairs 2i and
 * 2i + 1. Pair p hashes the counter (p, 1): word 0 gives the angle
 * (`kdp_polar`, as above), word 1 the radius sqrt(2 X) with
 * X = -log((w + 1/2) / 2**32).
 * A zero radius word (probability 2**-32) continues the exponential by
 * memorylessness: X += 32 log 2 and the next word of the counter (p, 2)
 * decides, then the word after it; the chain stops after three words.
 * Units of work are numbers, not pairs. */
/* -log((w + 1/2) / 2**32), continued through the counter (p, 2) when w is
 * zero (rare: a scalar branch). */
static inline float kdp_secure_exponential(uint32_t key0, uint32_t key1,
                                           uint32_t p, uint32_t w) {
  float extra = 0.0f;
  if (w == 0u) {
    uint32_t w2, w3;
    kdp_threefry(key0, key1, p, 2u, &w2, &w3);
    extra = 22.18070977791825f; /* 32 log 2 */
    w = w2;
    if (w == 0u) {
      extra += 22.18070977791825f;
      w = w3;
    }
  }
  const float u = ((float)w + 0.5f) * 2.3283064365386963e-10f;
  return extra - kdp_log(u);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void kdp_secure_numbers(uint32_t key0, uint32_t key1, int64_t first,
                               int64_t count, float *__restrict z) {
  uint32_t wa[2 * KDP_BLOCK], wr[2 * KDP_BLOCK];
  const int64_t pairs = 2 * count;
  const uint32_t p0 = (uint32_t)(2 * first);
  for (int64_t j = 0; j < pairs; j++) {
    kdp_threefry(key0, key1, p0 + (uint32_t)j, 1u, &wa[j], &wr[j]);
  }
  float x[2 * KDP_BLOCK];
  for (int64_t j = 0; j < pairs; j++) {
    const float u = ((float)wr[j] + 0.5f) * 2.3283064365386963e-10f;
    x[j] = -kdp_log(u);
  }
  for (int64_t j = 0; j < pairs; j++) {
    if (wr[j] == 0u) {
      x[j] = kdp_secure_exponential(key0, key1, p0 + (uint32_t)j, 0u);
    }
  }
  float pair_sum[2 * KDP_BLOCK];
  for (int64_t j = 0; j < pairs; j++) {
    float c, s;
    kdp_polar(__builtin_sqrtf(2.0f * x[j]), wa[j], &c, &s);
    pair_sum[j] = c + s;
  }
  for (int64_t i = 0; i < count; i++) {
    z[i] = 0.5f * (pair_sum[2 * i] + pair_sum[2 * i + 1]);
  }
}

/* Secure mode: z[lo:hi] of n numbers (lo a multiple of KDP_BLOCK). */
static inline void kdp_secure_standard_normal_range(uint32_t key0,
                                                    uint32_t key1, float *z,
                                                    int64_t n, int64_t lo,
                                                    int64_t hi) {
  if (hi > n) hi = n;
  for (int64_t start = lo; start < hi; start += KDP_BLOCK) {
    const int64_t count = hi - start < KDP_BLOCK ? hi - start : KDP_BLOCK;
    kdp_secure_numbers(key0, key1, start, count, z + start);
  }
}

/* Secure mode: the segments' noisy gradients for numbers [lo, hi). */
static inline void kdp_secure_noisy_range(uint32_t key0, uint32_t key1,
                                          const kdp_segments *seg, int64_t lo,
                                          int64_t hi) {
  const int64_t n = seg->offsets[seg->num];
  if (hi > n) hi = n;
  float z[KDP_BLOCK];
  for (int64_t start = lo; start < hi; start += KDP_BLOCK) {
    const int64_t count = hi - start < KDP_BLOCK ? hi - start : KDP_BLOCK;
    kdp_secure_numbers(key0, key1, start, count, z);
    kdp_add_run(seg, start, z, count);
  }
}

/* Units of work (pairs, or numbers in secure mode) for n numbers. */
static inline int64_t kdp_num_units(int64_t n, int secure) {
  return secure ? n : kdp_num_pairs(n);
}

#ifdef __cplusplus
}
#endif

#endif /* KERAS_DP_NOISE_H_ */
