// The LUT path on 256-bit registers (AVX2): the plane-major loop (gemm_block), the row-interleaved
// tied 4-bit loop (gemm_block_il), their row-block driver (gemm_range) and its pickers (pick, pick_q).
// Part of lut_avx2.cc's one translation unit.
#pragma once

#include "lut_common.h"

namespace {

// Rows [32 rb, 32 rb + 32 RB) for activation rows [m0, m1), MT rows at a time.
template <int Q, int MT, int RB>
void gemm_block(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                const Shape& s, float* y) {
  const __m256i ones = _mm256_set1_epi8(1);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t t4p = s.t4p(), nu = s.nunits(), upg = s.g4 / s.u4, ppu = s.u4 / 2;
  (void)nu;
  const int64_t w = s.ar == 1 ? 32 : 1;
  for (int64_t m = m0; m + MT <= m1; m += MT) {
    __m256 accf[MT][RB][4];
    zero_rows<MT, RB>(accf);
    for (int64_t g = 0, u = 0; g < s.ng; ++g)
    for (int64_t uu = 0; uu < upg; ++uu, ++u) {
      __m256i acc[MT][RB][Q][2];
      for (int i = 0; i < MT; ++i)
        for (int r = 0; r < RB; ++r)
          for (int b = 0; b < Q; ++b) acc[i][r][b][0] = acc[i][r][b][1] = _mm256_setzero_si256();
      for (int64_t j = 0; j < ppu; ++j) {
        const int64_t p = u * ppu + j;
        __m256i ta[MT], tb[MT];
        load_tables<MT>(tab, m, t4p, p, ta, tb);
        for (int r = 0; r < RB; ++r) {
          const uint8_t* c = codes + ((rb + r) * s.pairs + p) * Q * 32;
          if (MT == 1) prefetch_codes(c, Q * 32);
          for (int b = 0; b < Q; ++b) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32));
            const __m256i lo = _mm256_and_si256(v, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
            for (int i = 0; i < MT; ++i) {
              const __m256i x0 = _mm256_shuffle_epi8(ta[i], lo);
              const __m256i x1 = _mm256_shuffle_epi8(tb[i], hi);
              acc[i][r][b][0] = _mm256_add_epi16(acc[i][r][b][0],
                                                 _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(x0, x1)));
              acc[i][r][b][1] = _mm256_add_epi16(acc[i][r][b][1],
                                                 _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(x0, x1)));
            }
          }
        }
      }
      for (int r = 0; r < RB; ++r) {
        const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
        const int64_t al = (ab * s.ng + g) * s.qa(Q) * w;
        if (s.tied) {  // shifts and adds of the planes' sums, one scale
          const __m256 pw = _mm256_set1_ps(ldexpf(1.0f, 1 - Q));
          for (int i = 0; i < MT; ++i) {
            __m256i c[4];
            widen_i(acc[i][r][0][0], acc[i][r][0][1], c);
            for (int b = 1; b < Q; ++b) {
              __m256i e[4];
              widen_i(acc[i][r][b][0], acc[i][r][b][1], e);
              for (int v = 0; v < 4; ++v) c[v] = _mm256_add_epi32(_mm256_slli_epi32(c[v], 1), e[v]);
            }
            const __m256 sc = _mm256_set1_ps(ls[(m + i) * nu + u]);
            for (int v = 0; v < 4; ++v) {
              const __m256 a = _mm256_mul_ps(w == 32 ? scales8(alpha, al + 8 * v, s.f8) : _mm256_set1_ps(scale1(alpha, al, s.f8)), pw);
              accf[i][r][v] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c[v]), a), sc, accf[i][r][v]);
            }
          }
          continue;
        }
        for (int i = 0; i < MT; ++i) {
          __m256 t[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
          for (int b = 0; b < Q; ++b) {
            __m256 f[4];
            widen(acc[i][r][b][0], acc[i][r][b][1], f);
            if (w == 32) {
              for (int v = 0; v < 4; ++v) t[v] = _mm256_fmadd_ps(f[v], scales8(alpha, al + b * 32 + 8 * v, s.f8), t[v]);
            } else {
              const __m256 a = _mm256_set1_ps(scale1(alpha, al + b, s.f8));
              for (int v = 0; v < 4; ++v) t[v] = _mm256_fmadd_ps(f[v], a, t[v]);
            }
          }
          const __m256 sc = _mm256_set1_ps(ls[(m + i) * nu + u]);
          for (int v = 0; v < 4; ++v) accf[i][r][v] = _mm256_fmadd_ps(t[v], sc, accf[i][r][v]);
        }
      }
      if (use_z && uu + 1 == upg) add_offsets<MT, RB>(zoff, gsum, m, g, rb, s, accf);
    }
    store_rows<MT, RB>(accf, m, rb, s, y);
  }
}

// Q = kIl: the row-interleaved tied 4-bit layout (gemm_block_il below), else Q plane-major planes.
constexpr int kIl = 0;

template <int MT, int RB>
void gemm_block_il(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                   const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                   const Shape& s, float* y);

template <int Q, int MT, int RB>
void gemm_range(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                const uint8_t* codes, const void* alpha, const void* zoff, int use_z,
                int64_t rb0, int64_t rb1, const Shape& s, float* y) {
  const auto block = [&](auto mt, auto rbs, int64_t a, int64_t b, int64_t r) {
    if constexpr (Q == kIl) gemm_block_il<mt(), rbs()>(tab, ls, gsum, a, b, codes, alpha, zoff, use_z, r, s, y);
    else gemm_block<Q, mt(), rbs()>(tab, ls, gsum, a, b, codes, alpha, zoff, use_z, r, s, y);
  };
  using One = std::integral_constant<int, 1>;
  using Mt = std::integral_constant<int, MT>;
  using Rb = std::integral_constant<int, RB>;
  const int64_t mm = m0 + (m1 - m0) / MT * MT;  // whole MT tiles, then the rest one row at a time
  int64_t rb = rb0;
  for (; rb + RB <= rb1; rb += RB) {
    block(Mt{}, Rb{}, m0, mm, rb);
    if (MT > 1) block(One{}, Rb{}, mm, m1, rb);
  }
  for (; rb < rb1; ++rb) {
    block(Mt{}, One{}, m0, mm, rb);
    if (MT > 1) block(One{}, One{}, mm, m1, rb);
  }
}

template <int Q>
GemmFn pick(int mt, int rbk) {
  if (mt == 2) return rbk == 2 ? gemm_range<Q, 2, 2> : gemm_range<Q, 2, 1>;
  if (mt == 4) return gemm_range<Q, 4, 1>;
  if (rbk == 4) return gemm_range<Q, 1, 4>;
  if (rbk == 8) return gemm_range<Q, 1, 8>;
  return rbk == 2 ? gemm_range<Q, 1, 2> : gemm_range<Q, 1, 1>;
}

// Row-interleaved tied 4-bit codes (Shape::il) on 256-bit registers: rows [32 rb, 32 rb + 32 RB), MT
// activation rows at a time. Register e of a pair's 128 code bytes is rows 8e..8e+7 x 4 planes; after
// the lookups vpmaddubsw by (2, 1) gives (2 p0 + p1, 2 p2 + p3) per row as int16 (<= 381 per table), added
// over at most kIlChunk pairs (2 tables each: <= 43 pairs fit int16), then vpmaddwd by (4, 1) makes the
// row's int32 8 p0 + 4 p1 + 2 p2 + p3: the same integer as the plane-major tied path, the same float ops.
constexpr int64_t kIlChunk = 32;

template <int MT, int RB>
void gemm_block_il(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                   const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                   const Shape& s, float* y) {
  const __m256i w21 = _mm256_set1_epi16(0x0102), w41 = _mm256_set1_epi32(0x00010004);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t t4p = s.t4p(), nu = s.nunits(), upg = s.g4 / s.u4, ppu = s.u4 / 2;
  const int64_t w = s.ar == 1 ? 32 : 1;
  const __m256 pw = _mm256_set1_ps(ldexpf(1.0f, -3));
  for (int64_t m = m0; m + MT <= m1; m += MT) {
    __m256 accf[MT][RB][4];
    zero_rows<MT, RB>(accf);
    for (int64_t g = 0, u = 0; g < s.ng; ++g)
    for (int64_t uu = 0; uu < upg; ++uu, ++u) {
      __m256i acc[MT][RB][4];
      for (int i = 0; i < MT; ++i)
        for (int r = 0; r < RB; ++r)
          for (int v = 0; v < 4; ++v) acc[i][r][v] = _mm256_setzero_si256();
      for (int64_t j0 = 0; j0 < ppu; j0 += kIlChunk) {
        __m256i a16[MT][RB][4];
        for (int i = 0; i < MT; ++i)
          for (int r = 0; r < RB; ++r)
            for (int v = 0; v < 4; ++v) a16[i][r][v] = _mm256_setzero_si256();
        for (int64_t j = j0; j < std::min(ppu, j0 + kIlChunk); ++j) {
          const int64_t p = u * ppu + j;
          __m256i ta[MT], tb[MT];
          load_tables<MT>(tab, m, t4p, p, ta, tb);
          for (int r = 0; r < RB; ++r) {
            const uint8_t* c = codes + ((rb + r) * s.pairs + p) * 128;
            if (MT == 1) prefetch_codes(c, 128);
            for (int v = 0; v < 4; ++v) {
              const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * v));
              const __m256i lo = _mm256_and_si256(cv, nib);
              const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(cv, 4), nib);
              for (int i = 0; i < MT; ++i)
                a16[i][r][v] = _mm256_add_epi16(a16[i][r][v],
                                                _mm256_add_epi16(_mm256_maddubs_epi16(w21, _mm256_shuffle_epi8(ta[i], lo)),
                                                                 _mm256_maddubs_epi16(w21, _mm256_shuffle_epi8(tb[i], hi))));
            }
          }
        }
        for (int i = 0; i < MT; ++i)
          for (int r = 0; r < RB; ++r)
            for (int v = 0; v < 4; ++v) acc[i][r][v] = _mm256_add_epi32(acc[i][r][v], _mm256_madd_epi16(a16[i][r][v], w41));
      }
      for (int r = 0; r < RB; ++r) {
        const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
        const int64_t al = (ab * s.ng + g) * w;
        for (int i = 0; i < MT; ++i) {
          const __m256 sc = _mm256_set1_ps(ls[(m + i) * nu + u]);
          for (int v = 0; v < 4; ++v) {
            const __m256 a = _mm256_mul_ps(w == 32 ? scales8(alpha, al + 8 * v, s.f8) : _mm256_set1_ps(scale1(alpha, al, s.f8)), pw);
            accf[i][r][v] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][r][v]), a), sc, accf[i][r][v]);
          }
        }
      }
      if (use_z && uu + 1 == upg) add_offsets<MT, RB>(zoff, gsum, m, g, rb, s, accf);
    }
    store_rows<MT, RB>(accf, m, rb, s, y);
  }
}

GemmFn pick_q(int64_t q, int mt, int rbk) {
  switch (q) {
    case 1: return pick<1>(mt, rbk);
    case 2: return pick<2>(mt, rbk);
    case 3: return pick<3>(mt, rbk);
    case 4: return pick<4>(mt, rbk);
    default: return nullptr;
  }
}

}  // namespace
