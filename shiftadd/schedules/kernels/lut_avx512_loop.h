// The LUT path on 512-bit registers (path 2, M = 1): plane pairs per load on AVX-512 BW (lut512_block),
// the row-interleaved tied 4-bit loop on AVX-512 VNNI (lut512_block_il), and their picker (pick_lut512).
// Part of lut_avx2.cc's one translation unit.
#pragma once

#include "lut_common.h"

namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

// ---- the LUT path on 512-bit registers (path 2; AVX-512 BW): one load brings two planes of a 32-row
// block (they are adjacent in the code layout), so each vpshufb looks up 64 (row, plane) codes. The
// tables and their scales are the LUT path's, so the result equals it bit for bit up to float order.

// Widen the int16 sums of planes (b, b + 1) to floats: rows 0-15 and 16-31 of each plane.
inline void widen512(__m512i lo, __m512i hi, __m512 f[2][2]) {
  // lo lanes: (rows 0-7, 16-23) of plane b, then of plane b+1; hi: rows 8-15, 24-31
  const __m512i pb = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
  const __m512i pc = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
  f[0][0] = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(pb)));
  f[0][1] = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(pb, 1)));
  f[1][0] = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(pc)));
  f[1][1] = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(pc, 1)));
}

// widen512 as int32: e[e][h] = plane b + e, rows 16 h .. 16 h + 15.
inline void widen512_i(__m512i lo, __m512i hi, __m512i e[2][2]) {
  const __m512i pb = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
  const __m512i pc = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
  e[0][0] = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(pb));
  e[0][1] = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(pb, 1));
  e[1][0] = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(pc));
  e[1][1] = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(pc, 1));
}

// Offset z * (exact group sum) into the float sums of rows [32 rb, 32 rb + 32 RB), activation row m.
template <int RB>
inline void add_offsets512(const void* zoff, const float* gsum, int64_t m, int64_t g, int64_t rb, const Shape& s,
                           __m512 accf[RB][2]) {
  const int64_t w = s.ar == 1 ? 32 : 1;
  const __m512 gs = _mm512_set1_ps(gsum[m * s.ng + g]);
  for (int r = 0; r < RB; ++r) {
    const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
    const int64_t z = (ab * s.ng + g) * w;
    for (int h = 0; h < 2; ++h) {
      const __m512 zv = w == 32 ? scales16(zoff, z + 16 * h, s.f8) : _mm512_set1_ps(scale1(zoff, z, s.f8));
      accf[r][h] = _mm512_fmadd_ps(zv, gs, accf[r][h]);
    }
  }
}

template <int RB>
inline void store_rows512(__m512 accf[RB][2], int64_t m, int64_t rb, const Shape& s, float* y) {
  for (int r = 0; r < RB; ++r) {
    const int64_t row0 = (rb + r) * 32, left = s.n - row0;
    for (int h = 0; h < 2; ++h) _mm512_mask_storeu_ps(y + m * s.n + row0 + 16 * h, lanes16(left - 16 * h), accf[r][h]);
  }
}

template <int Q, int RB>
void lut512_block(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                  const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                  const Shape& s, float* y) {
  constexpr int QP = Q / 2, QO = Q % 2;  // plane pairs on 512-bit registers, an odd last plane on 256-bit
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t t4p = s.t4p(), nu = s.nunits(), upg = s.g4 / s.u4, ppu = s.u4 / 2;
  const int64_t w = s.ar == 1 ? 32 : 1;
  for (int64_t m = m0; m < m1; ++m) {
    __m512 accf[RB][2];
    for (int r = 0; r < RB; ++r) accf[r][0] = accf[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0, u = 0; g < s.ng; ++g)
    for (int64_t uu = 0; uu < upg; ++uu, ++u) {
      __m512i acc[RB][QP + 1][2];
      __m256i acco[RB][2];
      for (int r = 0; r < RB; ++r) {
        for (int b = 0; b < QP; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_si512();
        acco[r][0] = acco[r][1] = _mm256_setzero_si256();
      }
      for (int64_t j = 0; j < ppu; ++j) {
        const int64_t p = u * ppu + j;
        const int8_t* t = tab + (m * t4p + 2 * p) * 16;
        const __m512i ta = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m512i tb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        for (int r = 0; r < RB; ++r) {
          const uint8_t* c = codes + ((rb + r) * s.pairs + p) * Q * 32;
          prefetch_codes(c, Q * 32);
          for (int b = 0; b < QP; ++b) {
            const __m512i v = _mm512_loadu_si512(c + b * 64);
            const __m512i x0 = _mm512_shuffle_epi8(ta, _mm512_and_si512(v, nib));
            const __m512i x1 = _mm512_shuffle_epi8(tb, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
            acc[r][b][0] = _mm512_add_epi16(acc[r][b][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(x0, x1)));
            acc[r][b][1] = _mm512_add_epi16(acc[r][b][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(x0, x1)));
          }
          if (QO) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + QP * 64));
            const __m256i n8 = _mm512_castsi512_si256(nib), o8 = _mm512_castsi512_si256(ones);
            const __m256i x0 = _mm256_shuffle_epi8(_mm512_castsi512_si256(ta), _mm256_and_si256(v, n8));
            const __m256i x1 = _mm256_shuffle_epi8(_mm512_castsi512_si256(tb), _mm256_and_si256(_mm256_srli_epi16(v, 4), n8));
            acco[r][0] = _mm256_add_epi16(acco[r][0], _mm256_maddubs_epi16(o8, _mm256_unpacklo_epi8(x0, x1)));
            acco[r][1] = _mm256_add_epi16(acco[r][1], _mm256_maddubs_epi16(o8, _mm256_unpackhi_epi8(x0, x1)));
          }
        }
      }
      const __m512 sc = _mm512_set1_ps(ls[m * nu + u]);
      for (int r = 0; r < RB; ++r) {
        const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
        const int64_t al = (ab * s.ng + g) * s.qa(Q) * w;
        if (s.tied) {  // shifts and adds of the planes' sums (int32, exact), one scale
          __m512i c[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
          for (int b = 0; b < QP; ++b) {
            __m512i e[2][2];
            widen512_i(acc[r][b][0], acc[r][b][1], e);
            for (int h = 0; h < 2; ++h)
              c[h] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(c[h], 1), e[0][h]), 1), e[1][h]);
          }
          if (QO)
            for (int h = 0; h < 2; ++h)
              c[h] = _mm512_add_epi32(_mm512_slli_epi32(c[h], 1), _mm512_cvtepi16_epi32(
                                          _mm256_permute2x128_si256(acco[r][0], acco[r][1], h ? 0x31 : 0x20)));
          const __m512 pw = _mm512_set1_ps(ldexpf(1.0f, 1 - Q));
          for (int h = 0; h < 2; ++h) {
            const __m512 a = _mm512_mul_ps(w == 32 ? scales16(alpha, al + 16 * h, s.f8) : _mm512_set1_ps(scale1(alpha, al, s.f8)), pw);
            accf[r][h] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c[h]), a), sc, accf[r][h]);
          }
          continue;
        }
        __m512 t2[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int b = 0; b < QP; ++b) {
          __m512 f[2][2];
          widen512(acc[r][b][0], acc[r][b][1], f);
          for (int e = 0; e < 2; ++e)
            for (int h = 0; h < 2; ++h) {
              const __m512 a = w == 32 ? scales16(alpha, al + (2 * b + e) * 32 + 16 * h, s.f8)
                                       : _mm512_set1_ps(scale1(alpha, al + 2 * b + e, s.f8));
              t2[h] = _mm512_fmadd_ps(f[e][h], a, t2[h]);
            }
        }
        if (QO) {  // lo: rows 0-7 | 16-23, hi: rows 8-15 | 24-31
          for (int h = 0; h < 2; ++h) {
            const __m256i rows = _mm256_permute2x128_si256(acco[r][0], acco[r][1], h ? 0x31 : 0x20);
            const __m512 a = w == 32 ? scales16(alpha, al + (Q - 1) * 32 + 16 * h, s.f8)
                                     : _mm512_set1_ps(scale1(alpha, al + Q - 1, s.f8));
            t2[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(rows)), a, t2[h]);
          }
        }
        for (int h = 0; h < 2; ++h) accf[r][h] = _mm512_fmadd_ps(t2[h], sc, accf[r][h]);
      }
      if (use_z && uu + 1 == upg) add_offsets512<RB>(zoff, gsum, m, g, rb, s, accf);
    }
    store_rows512<RB>(accf, m, rb, s, y);
  }
}

template <int Q, int RB>
void lut512_range(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                  const uint8_t* codes, const void* alpha, const void* zoff, int use_z,
                  int64_t rb0, int64_t rb1, const Shape& s, float* y) {
  int64_t rb = rb0;
  for (; rb + RB <= rb1; rb += RB) lut512_block<Q, RB>(tab, ls, gsum, m0, m1, codes, alpha, zoff, use_z, rb, s, y);
  for (; rb < rb1; ++rb) lut512_block<Q, 1>(tab, ls, gsum, m0, m1, codes, alpha, zoff, use_z, rb, s, y);
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

// Row-interleaved tied 4-bit codes (Shape::il) on 512-bit registers with VNNI (the M = 1 path 2 where
// the CPU has both): half h of a pair's 128 code bytes is rows 16h..16h+15 x 4 planes; vpdpbusd by the
// plane weights (8, 4, 2, 1) adds each looked-up row quad straight into the row's int32 sum, no unpacking
// and no int16 stage. The integers and float ops are the plane-major tied path's.
template <int RB>
void lut512_block_il(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                     const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                     const Shape& s, float* y) {
  const __m512i w8421 = _mm512_set1_epi32(0x01020408);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t t4p = s.t4p(), nu = s.nunits(), upg = s.g4 / s.u4, ppu = s.u4 / 2;
  const int64_t w = s.ar == 1 ? 32 : 1;
  const __m512 pw = _mm512_set1_ps(ldexpf(1.0f, -3));
  for (int64_t m = m0; m < m1; ++m) {
    __m512 accf[RB][2];
    for (int r = 0; r < RB; ++r) accf[r][0] = accf[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0, u = 0; g < s.ng; ++g)
    for (int64_t uu = 0; uu < upg; ++uu, ++u) {
      __m512i acc[RB][2];  // [row block][half]
      for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
      for (int64_t j = 0; j < ppu; ++j) {
        const int64_t p = u * ppu + j;
        const int8_t* t = tab + (m * t4p + 2 * p) * 16;
        const __m512i ta = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m512i tb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        for (int r = 0; r < RB; ++r) {
          const uint8_t* c = codes + ((rb + r) * s.pairs + p) * 128;
          prefetch_codes(c, 128);
          for (int h = 0; h < 2; ++h) {
            const __m512i v = _mm512_loadu_si512(c + 64 * h);
            acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], w8421, _mm512_shuffle_epi8(ta, _mm512_and_si512(v, nib)));
            acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], w8421,
                                            _mm512_shuffle_epi8(tb, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)));
          }
        }
      }
      const __m512 sc = _mm512_set1_ps(ls[m * nu + u]);
      for (int r = 0; r < RB; ++r) {
        const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
        const int64_t al = (ab * s.ng + g) * w;
        for (int h = 0; h < 2; ++h) {
          const __m512i c = acc[r][h];
          const __m512 a = _mm512_mul_ps(w == 32 ? scales16(alpha, al + 16 * h, s.f8) : _mm512_set1_ps(scale1(alpha, al, s.f8)), pw);
          accf[r][h] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c), a), sc, accf[r][h]);
        }
      }
      if (use_z && uu + 1 == upg) add_offsets512<RB>(zoff, gsum, m, g, rb, s, accf);
    }
    store_rows512<RB>(accf, m, rb, s, y);
  }
}

template <int RB>
void lut512_range_il(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                     const uint8_t* codes, const void* alpha, const void* zoff, int use_z,
                     int64_t rb0, int64_t rb1, const Shape& s, float* y) {
  int64_t rb = rb0;
  for (; rb + RB <= rb1; rb += RB) lut512_block_il<RB>(tab, ls, gsum, m0, m1, codes, alpha, zoff, use_z, rb, s, y);
  for (; rb < rb1; ++rb) lut512_block_il<1>(tab, ls, gsum, m0, m1, codes, alpha, zoff, use_z, rb, s, y);
}

#pragma GCC pop_options

GemmFn pick_lut512(int64_t q, int rbk, bool il, bool vnni) {
  if (il)  // without VNNI the 256-bit row-interleaved path serves (nullptr here)
    return !vnni ? nullptr : rbk == 4 ? lut512_range_il<4> : rbk == 2 ? lut512_range_il<2> : lut512_range_il<1>;
  if (q == 2) return rbk == 4 ? lut512_range<2, 4> : rbk == 2 ? lut512_range<2, 2> : lut512_range<2, 1>;
  if (q == 4) return rbk == 4 ? lut512_range<4, 4> : rbk == 2 ? lut512_range<4, 2> : lut512_range<4, 1>;
  if (q == 3) return rbk == 4 ? lut512_range<3, 4> : rbk == 2 ? lut512_range<3, 2> : lut512_range<3, 1>;
  if (q == 1) return rbk == 4 ? lut512_range<1, 4> : rbk == 2 ? lut512_range<1, 2> : lut512_range<1, 1>;
  return nullptr;
}

}  // namespace
