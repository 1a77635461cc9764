// The int8 path (path 1, M > 1): weights dequantised to int8 panels, then exact int32 dots, on AVX-512
// VNNI (i8_dequant, i8_gemm, i8_quantize, i8_panels) or on AVX2 (the *_avx2 twins), and its picker
// (pick_i8). Part of lut_avx2.cc's one translation unit.
#pragma once

#include "lut_common.h"

namespace {

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

// ---- the int8 path for M > 1: dequantise to int8, then an AVX-512 VNNI GEMM ---------------------------
// Per (row, group) the planes' scales become integers a_b = rint(alpha_b * inv), inv = (127 - Q) / S,
// S = sum_b |alpha_b| (so sum_b |a_b| <= 127), and the weight is the int8 wq = sum_b a_b s_b, step S / (127 - Q).
// Activations: one int8 scale per (row, group), xq = rint(x * 127 / max|x|), fed to vpdpbusd as xq + 128
// (unsigned); the 128 * sum(wq) this adds is subtracted up front. Offsets stay z * (exact group sum).
// A panel of 32 weight rows is dequantised once into a thread-local buffer ([quad][half][16 rows x 4]) and
// reused by every activation row: the dequantisation is three ops per plane per 64 weights.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

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

}  // namespace
