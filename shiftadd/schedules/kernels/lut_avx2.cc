// AVX2 LUT-add micro-kernels (T-MAC's technique on BCQ weights; method.md §5, cpu-lut-kernels.md).
//
// Called from TIR through call_extern (schedules/lut_avx2.py) and linked into the model's .so.
// Plain C ABI, no TVM headers: the TIR wrapper owns shapes, workspaces and the thread split.
//
// Tables. For every 4 activations x[4t..4t+3] (zero past K): T_t[idx] = sum_j (bit j of idx ? +x_j : -x_j),
// quantised to int8 with one scale per "unit" of u4 consecutive tables:
//   mx = max over the unit's tables of (|x0| + |x1| + |x2| + |x3|),  inv = 127 / mx,  scale = mx / 127,
//   tab = round_half_even(T * inv)   (float32 ops in exactly this order: the numpy reference repeats them)
// A unit is a whole weight group or an even divisor of it, so one scale per (row, plane, group) holds.
//
// Codes. uint8 [NB][P][Q][32]: row block rb (32 rows), table pair p (tables 2p, 2p+1), plane b; byte i is
// row 32 rb + i, low nibble = code of table 2p, high nibble = code of table 2p + 1.
// Scales. float16 (or float8 e5m2, its high byte) [NBA][NG][Q][W] alpha, [NBA][NG][W] offsets: W = 32 (one per row) when rows_per_alpha
// is 1, else W = 1 and row block rb reads block rb * 32 / rows_per_alpha (rows_per_alpha % 32 == 0).
// Tied scales ([NBA][NG][1][W]): plane b's scale is alpha * 2^-b (the uniform grid of int quantization as
// sign planes, quant.bcq.plane_weights); the LUT paths then add the planes' integer sums by shifts,
// sum_b 2^(Q-1-b) p_b in int32 (exact), and multiply once by alpha * 2^(1-Q).
// Row-interleaved codes (tied 4-bit, Shape::il): uint8 [NB][P][32][4], a row's 4 planes adjacent. After
// the two vpshufb each row's 4 plane values share one int32 lane, so multiply-adds by the constant plane
// weights (8, 4, 2, 1) sum the planes in place (vpdpbusd, or vpmaddubsw by (2, 1) then vpmaddwd by (4, 1))
// instead of unpacking: 7 (VNNI) or 9 ops per 64 code bytes instead of 11. At M = 1 the loop is memory-
// bound only when it leaves the loads room: measured, the 11-op loop ran 4096x11008 4-bit ~10 % slower
// than reading its bytes alone (the same loop without its arithmetic: within 1.5 %).
//
// Inner step (per 32 rows, 2 tables, 1 plane): 1 load, 3 ALU for the nibbles, 2 vpshufb, 2 unpack,
// 2 vpmaddubsw (widen + add the two tables' int8 values to int16), 2 int16 adds. int16 sums are
// flushed to float once per unit (at most 128 pairs: |sum| <= 128 * 254 < 32767).
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

}  // namespace

namespace {

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

using GemmFn = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, const uint8_t*,
                        const void*, const void*, int, int64_t, int64_t, const Shape&, float*);

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

GemmFn pick_q(int64_t q, int mt, int rbk) {
  switch (q) {
    case 1: return pick<1>(mt, rbk);
    case 2: return pick<2>(mt, rbk);
    case 3: return pick<3>(mt, rbk);
    case 4: return pick<4>(mt, rbk);
    default: return nullptr;
  }
}

// The int8 paths' per-thread panel buffer (grown, never shrunk; freed with the thread).
struct I8Scratch {
  uint8_t* p = nullptr;
  size_t cap = 0;
  ~I8Scratch() { free(p); }
  uint8_t* get(size_t n) {
    if (n > cap) {
      free(p);
      cap = (n + 63) / 64 * 64;
      p = static_cast<uint8_t*>(aligned_alloc(64, cap));
      if (!p) cap = 0;
    }
    return p;
  }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

// ---- the LUT path on 512-bit registers (path 2; AVX-512 BW): one load brings two planes of a 32-row
// block (they are adjacent in the code layout), so each vpshufb looks up 64 (row, plane) codes. The
// tables and their scales are the LUT path's, so the result equals it bit for bit up to float order.
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

// ---- the int8 path for M > 1: dequantise to int8, then an AVX-512 VNNI GEMM ---------------------------
// Per (row, group) the planes' scales become integers a_b = rint(alpha_b * inv), inv = (127 - Q) / S,
// S = sum_b |alpha_b| (so sum_b |a_b| <= 127), and the weight is the int8 wq = sum_b a_b s_b, step S / (127 - Q).
// Activations: one int8 scale per (row, group), xq = rint(x * 127 / max|x|), fed to vpdpbusd as xq + 128
// (unsigned); the 128 * sum(wq) this adds is subtracted up front. Offsets stay z * (exact group sum).
// A panel of 32 weight rows is dequantised once into a thread-local buffer ([quad][half][16 rows x 4]) and
// reused by every activation row: the dequantisation is three ops per plane per 64 weights.
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

struct I8Panel {
  __m512i* w;      // [t4p][2] 16 rows x 4 weights
  __m512i* cinit;  // [ng][2] -128 * sum of the group's weights, per row
  __m512* wsc;     // [ng][2] weight step per row
  __m512* zf;      // [ng][2] offsets per row
};

alignas(64) const uint8_t kRep0[64] = {0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                       0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                       0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                       0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12};
alignas(64) const uint8_t kRowRep[64] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                         4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7,
                                         8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
                                         12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15};
alignas(64) const uint8_t kBitLo[64] = {1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8,
                                        1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8,
                                        1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};


// Dequantise row block rb (32 rows) into the panel.
template <int Q>
void i8_dequant(const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb, const Shape& s,
                const I8Panel& P) {
  const __m512i rep0 = _mm512_load_si512(kRep0), rowrep = _mm512_load_si512(kRowRep);
  const __m512i bitlo = _mm512_load_si512(kBitLo), bithi = _mm512_slli_epi16(bitlo, 4);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512 lim = _mm512_set1_ps(float(127 - Q));
  const int64_t w = s.ar == 1 ? 32 : 1;
  const int64_t ab = s.ar == 1 ? rb : rb * 32 / s.ar;
  const int64_t ppg = s.g4 / 2;
  for (int64_t g = 0; g < s.ng; ++g) {
    __m512i twoa[2][Q], nega[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t al = (ab * s.ng + g) * s.qa(Q) * w, ps = s.pst(w);
      __m512 a[Q];
      for (int b = 0; b < Q; ++b)  // tied: alpha * 2^-b, exact
        a[b] = _mm512_mul_ps(w == 32 ? scales16(alpha, al + b * ps + 16 * h, s.f8) : _mm512_set1_ps(scale1(alpha, al + b * ps, s.f8)),
                             _mm512_set1_ps(s.tied ? ldexpf(1.0f, -b) : 1.0f));
      __m512 sum = _mm512_abs_ps(a[0]);
      for (int b = 1; b < Q; ++b) sum = _mm512_add_ps(sum, _mm512_abs_ps(a[b]));
      const __mmask16 nz = _mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __m512 inv = _mm512_maskz_div_ps(nz, lim, sum);
      P.wsc[g * 2 + h] = _mm512_div_ps(sum, lim);
      __m512i A = _mm512_setzero_si512();
      for (int b = 0; b < Q; ++b) {
        const __m512i ai = _mm512_cvtps_epi32(_mm512_mul_ps(a[b], inv));
        A = _mm512_add_epi32(A, ai);
        twoa[h][b] = _mm512_shuffle_epi8(_mm512_slli_epi32(ai, 1), rep0);
      }
      nega[h] = _mm512_shuffle_epi8(_mm512_sub_epi32(_mm512_setzero_si512(), A), rep0);
      if (use_z) {
        const int64_t z = (ab * s.ng + g) * w;
        P.zf[g * 2 + h] = w == 32 ? scales16(zoff, z + 16 * h, s.f8) : _mm512_set1_ps(scale1(zoff, z, s.f8));
      } else {
        P.zf[g * 2 + h] = _mm512_setzero_ps();
      }
    }
    __m512i csum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t pp = g * ppg; pp < (g + 1) * ppg; ++pp) {
      const uint8_t* c = codes + (rb * s.pairs + pp) * Q * 32;
      for (int h = 0; h < 2; ++h) {
        __m512i lo = nega[h], hi = nega[h];
        // row-interleaved: the 64 bytes of half h are its 16 rows' plane quads, lane by lane as the panel's
        const __m512i quads = s.il ? _mm512_loadu_si512(c + 64 * h) : _mm512_setzero_si512();
        for (int b = 0; b < Q; ++b) {
          const __m512i r = s.il ? _mm512_shuffle_epi8(quads, _mm512_add_epi8(rep0, _mm512_set1_epi8(char(b))))
                                 : _mm512_shuffle_epi8(
              _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 32 + 16 * h))), rowrep);
          lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(r, bitlo), lo, twoa[h][b]);
          hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(r, bithi), hi, twoa[h][b]);
        }
        csum[h] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(csum[h], ones, lo), ones, hi);
        _mm512_store_si512(P.w + (2 * pp) * 2 + h, lo);
        _mm512_store_si512(P.w + (2 * pp + 1) * 2 + h, hi);
      }
    }
    for (int h = 0; h < 2; ++h) P.cinit[g * 2 + h] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(csum[h], 7));
  }
}

// y rows [m0, m1), columns of row block rb, MT activation rows at a time.
template <int MT>
void i8_gemm(const uint8_t* xu, const float* asc, const float* gsum, int64_t m0, int64_t m1, int use_z, int64_t rb,
             const Shape& s, const I8Panel& P, float* y) {
  const int64_t kp = s.t4p() * 4;
  const int64_t row0 = rb * 32;
  const int64_t left = s.n - row0;
  const __mmask16 mk[2] = {lanes16(left), lanes16(left - 16)};
  for (int64_t m = m0; m + MT <= m1; m += MT) {
    __m512 f[MT][2];
    for (int i = 0; i < MT; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < s.ng; ++g) {
      __m512i acc[MT][2];
      for (int i = 0; i < MT; ++i) {
        acc[i][0] = P.cinit[g * 2];
        acc[i][1] = P.cinit[g * 2 + 1];
      }
      for (int64_t t = g * s.g4; t < (g + 1) * s.g4; ++t) {
        const __m512i w0 = _mm512_load_si512(P.w + t * 2), w1 = _mm512_load_si512(P.w + t * 2 + 1);
        for (int i = 0; i < MT; ++i) {
          int32_t xv;
          __builtin_memcpy(&xv, xu + (m + i) * kp + 4 * t, 4);
          const __m512i xb = _mm512_set1_epi32(xv);
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xb, w0);
          acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xb, w1);
        }
      }
      for (int i = 0; i < MT; ++i) {
        const __m512 as = _mm512_set1_ps(asc[(m + i) * s.ng + g]);
        for (int h = 0; h < 2; ++h)
          f[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][h]), _mm512_mul_ps(P.wsc[g * 2 + h], as), f[i][h]);
        if (use_z) {
          const __m512 gs = _mm512_set1_ps(gsum[(m + i) * s.ng + g]);
          for (int h = 0; h < 2; ++h) f[i][h] = _mm512_fmadd_ps(P.zf[g * 2 + h], gs, f[i][h]);
        }
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int h = 0; h < 2; ++h) _mm512_mask_storeu_ps(y + (m + i) * s.n + row0 + 16 * h, mk[h], f[i][h]);
  }
}

// Quantised activations (xq + 128, uint8 [M][Kp]) and their scales (float [M][ng]) of the (row, group)
// pairs [v0, v1): float32 ops as the numpy reference does them, rint = round half to even.
void i8_quantize(const float* x, int64_t k, const Shape& s, int64_t v0, int64_t v1, uint8_t* xu, float* asc) {
  const int64_t gk = s.g4 * 4, kp = s.t4p() * 4;
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t m = v / s.ng, g = v % s.ng, end = (g + 1) * gk;
    const float* xr = x + m * k;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t kk = g * gk; kk < end; kk += 16)  // groups of 8 end mid-vector: stop at the group and at k
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(std::min(end, k) - kk), xr + kk)));
    const float m1 = _mm512_reduce_max_ps(mx);
    const float inv = m1 > 0.0f ? 127.0f / m1 : 0.0f;
    asc[v] = m1 / 127.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t kk = g * gk; kk < end; kk += 16) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes16(std::min(end, k) - kk), xr + kk);
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(xv, vi)), off);
      _mm512_mask_cvtepi32_storeu_epi8(xu + m * kp + kk, lanes16(end - kk), q);  // padding past k: xq = 0
    }
  }
}

template <int Q>
int i8_panels(const uint8_t* xu, const float* asc, const float* gsum, int64_t m, int mt, const uint8_t* codes,
               const void* alpha, const void* zoff, int use_z, int64_t rb0, int64_t rb1, const Shape& s, float* y) {
  static thread_local I8Scratch scratch;
  const int64_t t4p = s.t4p();
  uint8_t* base = scratch.get(size_t(t4p * 2 + s.ng * 8) * 64);
  if (!base) return -1;
  const I8Panel P{reinterpret_cast<__m512i*>(base), reinterpret_cast<__m512i*>(base + t4p * 2 * 64),
                  reinterpret_cast<__m512*>(base + (t4p * 2 + s.ng * 2) * 64),
                  reinterpret_cast<__m512*>(base + (t4p * 2 + s.ng * 4) * 64)};
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    i8_dequant<Q>(codes, alpha, zoff, use_z, rb, s, P);
    int64_t i = 0;
    if (mt >= 6) for (; i + 6 <= m; i += 6) i8_gemm<6>(xu, asc, gsum, i, i + 6, use_z, rb, s, P, y);
    if (mt >= 4) for (; i + 4 <= m; i += 4) i8_gemm<4>(xu, asc, gsum, i, i + 4, use_z, rb, s, P, y);
    if (mt >= 2) for (; i + 2 <= m; i += 2) i8_gemm<2>(xu, asc, gsum, i, i + 2, use_z, rb, s, P, y);
    for (; i < m; ++i) i8_gemm<1>(xu, asc, gsum, i, i + 1, use_z, rb, s, P, y);
  }
  return 0;
}

#pragma GCC pop_options

// ---- the int8 path on 256-bit registers (AVX2 only, e.g. Zen 3): the same integers as the VNNI path,
// hence the same result bit for bit. Panels in the same byte layout (per 4 inputs, 32 rows x 4 int8),
// dequantised by and/cmpeq/and/add per plane; exact int32 dots by vpmaddwd on int16 (i8_gemm_avx2).
struct I8Panel2 {
  uint8_t* w;  // [t4p][128]: 4 inputs x 32 rows, row r at bytes 4r..4r+3
  float* wsc;  // [ng][32] weight step per row
  float* zf;   // [ng][32] offsets per row
};

template <int Q>
void i8_dequant_avx2(const uint8_t* codes, const void* alpha, const void* zoff, int use_z, int64_t rb,
                     const Shape& s, const I8Panel2& P) {
  const __m256i rep0 = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  // rows 8v..8v+7 of the 16-row half v / 2: code bytes 0-7 (v even) or 8-15 (v odd), each 4 times
  const __m256i rowrep[2] = {
      _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
      _mm256_setr_epi8(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
                       12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  const __m256i bitlo = _mm256_set1_epi32(0x08040201), bithi = _mm256_set1_epi32(int(0x80402010));
  const __m256 lim = _mm256_set1_ps(float(127 - Q));
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t w = s.ar == 1 ? 32 : 1;
  const int64_t ab = s.ar == 1 ? rb : rb * 32 / s.ar;
  const int64_t ppg = s.g4 / 2;
  for (int64_t g = 0; g < s.ng; ++g) {
    __m256i twoa[4][Q], nega[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t al = (ab * s.ng + g) * s.qa(Q) * w, ps = s.pst(w);
      __m256 a[Q];
      for (int b = 0; b < Q; ++b)  // tied: alpha * 2^-b, exact
        a[b] = _mm256_mul_ps(w == 32 ? scales8(alpha, al + b * ps + 8 * v, s.f8) : _mm256_set1_ps(scale1(alpha, al + b * ps, s.f8)),
                             _mm256_set1_ps(s.tied ? ldexpf(1.0f, -b) : 1.0f));
      __m256 sum = _mm256_and_ps(a[0], absm);
      for (int b = 1; b < Q; ++b) sum = _mm256_add_ps(sum, _mm256_and_ps(a[b], absm));
      const __m256 nz = _mm256_cmp_ps(sum, _mm256_setzero_ps(), _CMP_GT_OQ);
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(lim, sum), nz);
      _mm256_store_ps(P.wsc + g * 32 + 8 * v, _mm256_div_ps(sum, lim));
      __m256i A = _mm256_setzero_si256();
      for (int b = 0; b < Q; ++b) {
        const __m256i ai = _mm256_cvtps_epi32(_mm256_mul_ps(a[b], inv));
        A = _mm256_add_epi32(A, ai);
        twoa[v][b] = _mm256_shuffle_epi8(_mm256_slli_epi32(ai, 1), rep0);
      }
      nega[v] = _mm256_shuffle_epi8(_mm256_sub_epi32(_mm256_setzero_si256(), A), rep0);
      const int64_t z = (ab * s.ng + g) * w;
      _mm256_store_ps(P.zf + g * 32 + 8 * v,
                      !use_z ? _mm256_setzero_ps()
                             : w == 32 ? scales8(zoff, z + 8 * v, s.f8) : _mm256_set1_ps(scale1(zoff, z, s.f8)));
    }
    for (int64_t pp = g * ppg; pp < (g + 1) * ppg; ++pp) {
      const uint8_t* c = codes + (rb * s.pairs + pp) * Q * 32;
      for (int v = 0; v < 4; ++v) {
        __m256i lo = nega[v], hi = nega[v];
        // row-interleaved: the 32 bytes at 32 v are rows 8v..8v+7's plane quads, lane by lane as the panel's
        const __m256i quads = s.il ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * v)) : _mm256_setzero_si256();
        for (int b = 0; b < Q; ++b) {
          const __m256i r = s.il ? _mm256_shuffle_epi8(quads, _mm256_add_epi8(rep0, _mm256_set1_epi8(char(b))))
                                 : _mm256_shuffle_epi8(
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 32 + 16 * (v / 2)))),
              rowrep[v & 1]);
          lo = _mm256_add_epi8(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(r, bitlo), bitlo), twoa[v][b]));
          hi = _mm256_add_epi8(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(r, bithi), bithi), twoa[v][b]));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(P.w + (2 * pp) * 128 + 32 * v), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(P.w + (2 * pp + 1) * 128 + 32 * v), hi);
      }
    }
  }
}

// The first n of 8 lanes (n clamped to 0..8), as a vpmaskmovd mask.
inline __m256i lanes8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::max<int64_t>(0, std::min<int64_t>(8, n)))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y rows [m0, m1), columns of row block rb, MT activation rows at a time, 8 rows per pass. Exact int32
// dots by vpmaddwd on int16 (no saturation, one multiply op per 16 products; vpmaddubsw would need
// a vpsignb per activation row, and Intel runs all three on the same two ports): each 16 panel bytes
// (4 rows x 4 inputs) widen to int16, an activation row's 4 inputs are broadcast as int16, so each
// int32 lane sums half a row's quad; the two halves are added once per group (vphaddd).
template <int MT>
void i8_gemm_avx2(const int16_t* x16, const float* asc, const float* gsum, int64_t m0, int64_t m1, int use_z,
                  int64_t rb, const Shape& s, const I8Panel2& P, float* y) {
  const int64_t kp = s.t4p() * 4;
  const int64_t row0 = rb * 32;
  for (int64_t m = m0; m + MT <= m1; m += MT) {
    for (int e = 0; e < 4 && row0 + 8 * e < s.n; ++e) {
      __m256 f[MT];
      for (int i = 0; i < MT; ++i) f[i] = _mm256_setzero_ps();
      for (int64_t g = 0; g < s.ng; ++g) {
        __m256i acc[MT][2];
        for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (int64_t t = g * s.g4; t < (g + 1) * s.g4; ++t) {
          const uint8_t* wp = P.w + t * 128 + 32 * e;
          const __m256i w0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(wp)));
          const __m256i w1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(wp + 16)));
          for (int i = 0; i < MT; ++i) {
            int64_t xv;
            __builtin_memcpy(&xv, x16 + (m + i) * kp + 4 * t, 8);
            const __m256i xb = _mm256_set1_epi64x(xv);
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(w0, xb));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(w1, xb));
          }
        }
        const __m256 wsc = _mm256_load_ps(P.wsc + g * 32 + 8 * e);
        for (int i = 0; i < MT; ++i) {
          const __m256i dot = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xD8);  // rows 0-7
          const __m256 as = _mm256_set1_ps(asc[(m + i) * s.ng + g]);
          f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wsc, as), f[i]);
          if (use_z)
            f[i] = _mm256_fmadd_ps(_mm256_load_ps(P.zf + g * 32 + 8 * e), _mm256_set1_ps(gsum[(m + i) * s.ng + g]), f[i]);
        }
      }
      const int64_t r = row0 + 8 * e;
      for (int i = 0; i < MT; ++i) _mm256_maskstore_ps(y + (m + i) * s.n + r, lanes8(s.n - r), f[i]);
    }
  }
}

// i8_quantize without AVX-512: the same float32 ops per element (rint = round half to even); the
// activations go out as int16 xq ([M][Kp], in the same workspace) for vpmaddwd.
void i8_quantize_avx2(const float* x, int64_t k, const Shape& s, int64_t v0, int64_t v1, uint8_t* xu, float* asc) {
  int16_t* x16 = reinterpret_cast<int16_t*>(xu);
  const int64_t gk = s.g4 * 4, kp = s.t4p() * 4;
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t m = v / s.ng, g = v % s.ng, end = (g + 1) * gk, stop = std::min(end, k);
    const float* xr = x + m * k;
    float m1 = 0.0f;
    for (int64_t kk = g * gk; kk < stop; ++kk) m1 = std::max(m1, fabsf(xr[kk]));
    const float inv = m1 > 0.0f ? 127.0f / m1 : 0.0f;
    asc[v] = m1 / 127.0f;
    for (int64_t kk = g * gk; kk < end; ++kk)
      x16[m * kp + kk] = int16_t(kk < k ? nearbyintf(xr[kk] * inv) : 0.0f);  // padding past k: xq = 0
  }
}

template <int Q>
int i8_panels_avx2(const uint8_t* xu, const float* asc, const float* gsum, int64_t m, int mt, const uint8_t* codes,
                   const void* alpha, const void* zoff, int use_z, int64_t rb0, int64_t rb1, const Shape& s,
                   float* y) {
  static thread_local I8Scratch scratch;
  const int64_t t4p = s.t4p();
  uint8_t* base = scratch.get(size_t(t4p * 128 + s.ng * 32 * 4 * 2));
  if (!base) return -1;
  const int16_t* x16 = reinterpret_cast<const int16_t*>(xu);  // i8_quantize_avx2's int16 activations
  const I8Panel2 P{base, reinterpret_cast<float*>(base + t4p * 128), reinterpret_cast<float*>(base + t4p * 128) + s.ng * 32};
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    i8_dequant_avx2<Q>(codes, alpha, zoff, use_z, rb, s, P);
    int64_t i = 0;  // 16 ymm registers: at most 4 activation rows per pass (mt 6 runs as 4)
    if (mt >= 4) for (; i + 4 <= m; i += 4) i8_gemm_avx2<4>(x16, asc, gsum, i, i + 4, use_z, rb, s, P, y);
    if (mt >= 2) for (; i + 2 <= m; i += 2) i8_gemm_avx2<2>(x16, asc, gsum, i, i + 2, use_z, rb, s, P, y);
    for (; i < m; ++i) i8_gemm_avx2<1>(x16, asc, gsum, i, i + 1, use_z, rb, s, P, y);
  }
  return 0;
}

using I8Fn = int (*)(const uint8_t*, const float*, const float*, int64_t, int, const uint8_t*, const void*,
                      const void*, int, int64_t, int64_t, const Shape&, float*);

I8Fn pick_i8(int64_t q, bool vnni) {
  switch (q) {
    case 1: return vnni ? i8_panels<1> : i8_panels_avx2<1>;
    case 2: return vnni ? i8_panels<2> : i8_panels_avx2<2>;
    case 3: return vnni ? i8_panels<3> : i8_panels_avx2<3>;
    case 4: return vnni ? i8_panels<4> : i8_panels_avx2<4>;
    default: return nullptr;
  }
}

GemmFn pick_lut512(int64_t q, int rbk, bool il, bool vnni) {
  if (il)  // without VNNI the 256-bit row-interleaved path serves (nullptr here)
    return !vnni ? nullptr : rbk == 4 ? lut512_range_il<4> : rbk == 2 ? lut512_range_il<2> : lut512_range_il<1>;
  if (q == 2) return rbk == 4 ? lut512_range<2, 4> : rbk == 2 ? lut512_range<2, 2> : lut512_range<2, 1>;
  if (q == 4) return rbk == 4 ? lut512_range<4, 4> : rbk == 2 ? lut512_range<4, 2> : lut512_range<4, 1>;
  if (q == 3) return rbk == 4 ? lut512_range<3, 4> : rbk == 2 ? lut512_range<3, 2> : lut512_range<3, 1>;
  if (q == 1) return rbk == 4 ? lut512_range<1, 4> : rbk == 2 ? lut512_range<1, 2> : lut512_range<1, 1>;
  return nullptr;
}

// What this CPU runs, from its features and two switches. SHIFTADD_NO_AVX512=1 turns the 512-bit
// registers off (what an AVX2-only CPU runs: the LUT path, the int8 path on 256-bit registers);
// SHIFTADD_NO_INT8=1 the int8 path (M > 1 then takes the LUT path, as M = 1 does). Read once, not per
// call (a decode step makes ~200 calls); shiftadd_paths() reads them again (tests flip them in-process).
enum : int { kWide = 1, kVnni = 2, kInt8 = 4 };

bool env_on(const char* name) {
  const char* v = getenv(name);
  return v && v[0] && v[0] != '0';
}

int cpu_check() {
  int f = env_on("SHIFTADD_NO_INT8") ? 0 : kInt8;
  if (!env_on("SHIFTADD_NO_AVX512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    f |= kWide | (__builtin_cpu_supports("avx512vnni") ? kVnni : 0);
  return f;
}

std::atomic<int> g_cpu{-1};

int cpu() {
  int f = g_cpu.load(std::memory_order_relaxed);
  if (f < 0) g_cpu.store(f = cpu_check(), std::memory_order_relaxed);
  return f;
}

// TVM runtime thread pool (c_backend_api.h), resolved from libtvm_runtime at load time.
struct ParallelEnv {
  void* sync_handle;
  int32_t num_task;
};
extern "C" int TVMBackendParallelLaunch(int (*f)(int, ParallelEnv*, void*), void* cdata, int num_task);
extern "C" int TVMBackendParallelBarrier(int task_id, ParallelEnv* penv);

struct Job {
  const float* x;
  int64_t m, k;
  const uint8_t* codes;
  const void* alpha;
  const void* zoff;
  int use_z;
  Shape s;
  int64_t nb;
  int rbk;
  GemmFn gemm;
  I8Fn i8;  // the int8 path (M > 1) when chosen and not switched off, else null
  bool vnni;  // the int8 path on AVX-512 VNNI (else on AVX2)
  int mt;
  int8_t* tab;
  float* ls;
  float* gsum;
  float* y;
};

inline void share(int64_t total, int task, int ntask, int64_t align, int64_t* a, int64_t* b) {
  const int64_t units = (total + align - 1) / align;
  const int64_t per = (units + ntask - 1) / ntask;
  *a = std::min(total, task * per * align);
  *b = std::min(total, (task + 1) * per * align);
}

int run_task(int task, ParallelEnv* penv, void* cdata) {
  const Job& j = *static_cast<const Job*>(cdata);
  const int nt = penv ? penv->num_task : 1;
  int64_t a, b;
  if (j.i8) {
    share(j.m * j.s.ng, task, nt, 1, &a, &b);
    (j.vnni ? i8_quantize : i8_quantize_avx2)(j.x, j.k, j.s, a, b, reinterpret_cast<uint8_t*>(j.tab), j.ls);
  } else {
    share(j.m * j.s.nunits(), task, nt, 1, &a, &b);
    build_tables(j.x, j.k, j.s, a, b, j.tab, j.ls);
  }
  if (j.use_z) {
    share(j.m * j.s.ng, task, nt, 1, &a, &b);
    group_sums(j.x, j.k, j.s, a, b, j.gsum);
  }
  if (nt > 1) TVMBackendParallelBarrier(task, penv);
  if (j.i8) {
    share(j.nb, task, nt, 1, &a, &b);
    if (a < b) return j.i8(reinterpret_cast<const uint8_t*>(j.tab), j.ls, j.gsum, j.m, j.mt, j.codes, j.alpha, j.zoff,
                           j.use_z, a, b, j.s, j.y);  // -1: no memory for the panel
    return 0;
  }
  share(j.nb, task, nt, j.rbk, &a, &b);
  if (a < b) j.gemm(j.tab, j.ls, j.gsum, 0, j.m, j.codes, j.alpha, j.zoff, j.use_z, a, b, j.s, j.y);
  return 0;
}

}  // namespace

extern "C" {

// y[M, n] = LUT-add matmul of x[M, k] (tables, scales and group sums into the caller's workspaces
// tab int8 [M][2 pairs][16], ls float [M][nunits], gsum float [M][ng]). One launch on TVM's thread
// pool (``tasks`` 0: all its threads; 1: this thread only): every task builds its share of the tables,
// a barrier, then its share of the 32-row blocks. q planes (1..4); mt activation rows and rbk row blocks
// per pass (tuning knobs). ``path`` 1 takes the int8 path (dequantised panels; mt rows per pass,
// 1/2/4/6; AVX-512 VNNI where the CPU has it, else AVX2 with at most 4), or with SHIFTADD_NO_INT8 the
// LUT path with mt <= 2 and rbk 1 (same workspaces: the int8 path keeps its activations in tab and
// their scales in ls); ``path`` 2 with mt 1 the LUT path on
// 512-bit registers (AVX-512 BW) where the CPU has it, else the LUT path with the same knobs.
// ``scale_flags``: bit 0 scales and offsets are float8 e5m2 bytes (else float16), bit 1 tied scales
// (one per row and group: alpha [NBA][NG][1][W]), bit 2 row-interleaved codes [NB][P][32][4] (tied
// 4-bit only). Returns 0,
// or -1 for an unsupported q / knob.
int shiftadd_lut_matmul(const float* x, int64_t m, int64_t k, const uint8_t* codes, const void* alpha,
                        const void* zoff, int64_t use_z, int64_t n, int64_t pairs, int64_t u4, int64_t g4,
                        int64_t ng, int64_t rows_per_alpha, int64_t scale_flags, int64_t q, int64_t mt, int64_t rbk,
                        int64_t path, int64_t tasks, int8_t* tab, float* ls, float* gsum, float* y) {
  const int f = cpu();
  const bool i8 = path == 1 && (f & kInt8), vnni = f & kVnni;
  if (path == 1 && !i8) mt = std::min<int64_t>(mt, 2), rbk = 1;
  const int tied = int((scale_flags >> 1) & 1), il = int((scale_flags >> 2) & 1);
  if (il && (q != 4 || !tied)) return -1;
  GemmFn gemm = il ? pick<kIl>(int(mt), int(rbk)) : pick_q(q, int(mt), int(rbk));
  if (path == 2 && (f & kWide) && mt == 1) {
    if (GemmFn wide = pick_lut512(q, int(rbk), il, vnni)) gemm = wide;
  }
  Job j{x, m, k, codes, alpha, zoff, int(use_z), Shape{n, pairs, u4, g4, ng, rows_per_alpha, int(scale_flags & 1), tied, il},
        (n + 31) / 32,
        int(rbk), gemm, i8 ? pick_i8(q, vnni) : nullptr, vnni, int(mt), tab, ls, gsum, y};
  if (path < 0 || path > 2 || (i8 ? !j.i8 || (mt != 1 && mt != 2 && mt != 4 && mt != 6) : !j.gemm) || u4 % 2 ||
      g4 % u4 || g4 % 2)
    return -1;
  if (tasks == 1) return run_task(0, nullptr, &j);
  return TVMBackendParallelLaunch(run_task, &j, int(tasks));
}

// The paths this CPU takes when asked (the switches read again here): bit 0 the LUT path (always),
// bit 1 the int8 path (unless SHIFTADD_NO_INT8), bit 2 the 512-bit LUT path (AVX-512 F/BW, unless
// SHIFTADD_NO_AVX512), bit 3 set when the int8 path runs on AVX-512 VNNI (else on AVX2).
int shiftadd_paths() {
  const int f = cpu_check();
  g_cpu.store(f, std::memory_order_relaxed);
  return 1 | (f & kInt8 ? 2 : 0) | (f & kWide ? 4 : 0) | ((f & kInt8) && (f & kVnni) ? 8 : 0);
}

}  // extern "C"
