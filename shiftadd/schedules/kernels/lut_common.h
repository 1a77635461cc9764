// Shared by every part of the LUT-add micro-kernel (lut_avx2.cc, its one translation unit): includes,
// the prefetch distance, the Shape of a call, and the inline helpers of more than one loop (scale loads,
// widening, table loads, offsets, stores, code prefetch; the 512-bit lanes16/scales16 of the 512-bit
// LUT loop and the int8 VNNI path).
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

// Software prefetch distance (bytes ahead in each row block's code stream) of the M = 1 LUT loops:
// cold 4096-class GEMVs ran 10-20 % faster with 2048 than with the hardware prefetchers alone
// (11008x4096 4-bit, 2 threads: 1.26-1.34 -> 1.08-1.16 ms; 512 and 1024 were in between, 4096 no better).
#ifndef SHIFTADD_PFD
#define SHIFTADD_PFD 2048
#endif

namespace {

// Prefetch the code bytes [c, c + n) + SHIFTADD_PFD, one request per 64-byte line.
inline void prefetch_codes(const uint8_t* c, int64_t n) {
  if (SHIFTADD_PFD > 0)
    for (int64_t l = 0; l < n; l += 64) _mm_prefetch(reinterpret_cast<const char*>(c + l + SHIFTADD_PFD), _MM_HINT_T0);
}

// Scales and offsets: float16, or float8 e5m2 = the high byte of the same float16 (f8).
inline __m256 scales8(const void* base, int64_t i, int f8) {
  if (f8)
    return _mm256_cvtph_ps(_mm_unpacklo_epi8(
        _mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(base) + i))));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
}

inline float scale1(const void* base, int64_t i, int f8) {
  const uint16_t h = f8 ? uint16_t(static_cast<const uint8_t*>(base)[i]) << 8 : static_cast<const uint16_t*>(base)[i];
  return _cvtsh_ss(h);
}

// 4 float vectors (rows 0-7, 8-15, 16-23, 24-31) from the two int16 accumulators of one plane.
inline void widen(__m256i lo, __m256i hi, __m256 f[4]) {
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
}

// The same 4 vectors as int32 (rows 0-7, 8-15, 16-23, 24-31).
inline void widen_i(__m256i lo, __m256i hi, __m256i e[4]) {
  e[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo));
  e[1] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi));
  e[2] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1));
  e[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1));
}

struct Shape {
  int64_t n, pairs, u4, g4, ng, ar;
  int f8;  // scales stored as float8 e5m2 (1 byte) instead of float16
  int tied;  // one stored scale per (row, group): plane b's is alpha * 2^-b
  int il;  // row-interleaved codes [NB][P][32][4] (tied 4-bit only)
  int64_t qa(int q) const { return tied ? 1 : q; }  // planes stored in alpha
  int64_t pst(int64_t w) const { return tied ? 0 : w; }  // alpha index step from plane b to b + 1
  int64_t t4p() const { return 2 * pairs; }
  int64_t nunits() const { return t4p() / u4; }
};

// The two tables of pair p for activation rows [m, m + MT), each broadcast to both 128-bit lanes.
template <int MT>
inline void load_tables(const int8_t* tab, int64_t m, int64_t t4p, int64_t p, __m256i ta[MT], __m256i tb[MT]) {
  for (int i = 0; i < MT; ++i) {
    const int8_t* t = tab + ((m + i) * t4p + 2 * p) * 16;
    ta[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    tb[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
  }
}

template <int MT, int RB>
inline void zero_rows(__m256 accf[MT][RB][4]) {
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < 4; ++v) accf[i][r][v] = _mm256_setzero_ps();
}

// Offset z * (sum of group g's activations, exact) into the float sums of rows [32 rb, 32 rb + 32 RB).
template <int MT, int RB>
inline void add_offsets(const void* zoff, const float* gsum, int64_t m, int64_t g, int64_t rb, const Shape& s,
                        __m256 accf[MT][RB][4]) {
  const int64_t w = s.ar == 1 ? 32 : 1;
  for (int r = 0; r < RB; ++r) {
    const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
    const int64_t z = (ab * s.ng + g) * w;
    for (int i = 0; i < MT; ++i) {
      const __m256 gs = _mm256_set1_ps(gsum[(m + i) * s.ng + g]);
      for (int v = 0; v < 4; ++v) {
        const __m256 zv = w == 32 ? scales8(zoff, z + 8 * v, s.f8) : _mm256_set1_ps(scale1(zoff, z, s.f8));
        accf[i][r][v] = _mm256_fmadd_ps(zv, gs, accf[i][r][v]);
      }
    }
  }
}

// Store rows [32 rb, 32 rb + 32 RB) of activation rows [m, m + MT), the last block cut at n.
template <int MT, int RB>
inline void store_rows(__m256 accf[MT][RB][4], int64_t m, int64_t rb, const Shape& s, float* y) {
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < RB; ++r) {
      const int64_t row0 = (rb + r) * 32;
      float* out = y + (m + i) * s.n + row0;
      if (row0 + 32 <= s.n) {
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, accf[i][r][v]);
      } else if (row0 < s.n) {
        alignas(32) float tmp[32];
        for (int v = 0; v < 4; ++v) _mm256_store_ps(tmp + 8 * v, accf[i][r][v]);
        for (int64_t e = 0; e < s.n - row0; ++e) out[e] = tmp[e];
      }
    }
}

// A LUT loop over row blocks [rb0, rb1): what pick_q (256-bit) and pick_lut512 (512-bit) return.
using GemmFn = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, const uint8_t*,
                        const void*, const void*, int, int64_t, int64_t, const Shape&, float*);

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

// The first n of 16 lanes (n clamped to 0..16): stores and loads of a ragged row block or group.
inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

inline __m512 scales16(const void* base, int64_t i, int f8) {
  if (f8)
    return _mm512_cvtph_ps(_mm256_slli_epi16(
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(base) + i))), 8));
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
}

#pragma GCC pop_options

}  // namespace
