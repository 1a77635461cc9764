// The table constructor of the LUT path (built once per call, before any look-up): the int8 tables of
// 4 activations and their per-unit scales (build_tables), and the exact group sums the offsets use
// (group_sums). Part of lut_avx2.cc's one translation unit.
#pragma once

#include "lut_common.h"

namespace {

// Tables of the (row, unit) pairs [w0, w1) (w = m * nunits + u). Float ops in the reference's order:
// p = (s0 x0 + s1 x1) + s2 x2 for entries 0-7, then entry i = p - x3, entry i + 8 = p + x3 (sign flips
// are exact), scaled by inv and rounded half to even (cvtps under the default MXCSR rounding).
void build_tables(const float* x, int64_t k, const Shape& s, int64_t w0, int64_t w1, int8_t* tab, float* ls) {
  const int64_t t4p = s.t4p(), nu = s.nunits();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // lane i (entry i of 0-7): bit j of i set -> +x_j, else -x_j (xor with -0.0 flips the sign)
  const __m256 m0 = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1)), sign);
  const __m256 m1 = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1)), sign);
  const __m256 m2 = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1)), sign);
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t m = w / nu, u = w % nu;
    const float* xr = x + m * k;
    float mx = 0.0f;
    for (int64_t t = u * s.u4; t < (u + 1) * s.u4; ++t) {
      float a = 0.0f;
      for (int j = 0; j < 4; ++j) {
        const int64_t kk = 4 * t + j;
        a = a + (kk < k ? fabsf(xr[kk]) : 0.0f);
      }
      mx = a > mx ? a : mx;
    }
    const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
    ls[m * nu + u] = mx / 127.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t t = u * s.u4; t < (u + 1) * s.u4; ++t) {
      float v[4];
      for (int j = 0; j < 4; ++j) v[j] = 4 * t + j < k ? xr[4 * t + j] : 0.0f;
      const __m256 p = _mm256_add_ps(_mm256_add_ps(_mm256_xor_ps(_mm256_set1_ps(v[0]), m0),
                                                   _mm256_xor_ps(_mm256_set1_ps(v[1]), m1)),
                                     _mm256_xor_ps(_mm256_set1_ps(v[2]), m2));
      const __m256 x3 = _mm256_set1_ps(v[3]);
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(p, x3), vinv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_add_ps(p, x3), vinv));
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tab + (m * t4p + t) * 16), b);
    }
  }
}

// Exact sums of each group's activations for the (row, group) pairs [v0, v1).
void group_sums(const float* x, int64_t k, const Shape& s, int64_t v0, int64_t v1, float* gsum) {
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t m = v / s.ng, g = v % s.ng;
    const float* xr = x + m * k;
    float a = 0.0f;
    for (int64_t kk = g * s.g4 * 4; kk < (g + 1) * s.g4 * 4 && kk < k; ++kk) a = a + xr[kk];
    gsum[v] = a;
  }
}

}  // namespace
