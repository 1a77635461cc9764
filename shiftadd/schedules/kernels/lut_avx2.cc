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
// Scales. float16 [NBA][NG][Q][W] alpha, [NBA][NG][W] offsets: W = 32 (one per row) when rows_per_alpha
// is 1, else W = 1 and row block rb reads block rb * 32 / rows_per_alpha (rows_per_alpha % 32 == 0).
//
// Inner step (per 32 rows, 2 tables, 1 plane): 1 load, 3 ALU for the nibbles, 2 vpshufb, 2 unpack,
// 2 vpmaddubsw (widen + add the two tables' int8 values to int16), 2 int16 adds. int16 sums are
// flushed to float once per unit (at most 128 pairs: |sum| <= 128 * 254 < 32767).
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

namespace {

inline __m256 cvt_f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 4 float vectors (rows 0-7, 8-15, 16-23, 24-31) from the two int16 accumulators of one plane.
inline void widen(__m256i lo, __m256i hi, __m256 f[4]) {
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
}

struct Shape {
  int64_t n, pairs, u4, g4, ng, ar;
  int64_t t4p() const { return 2 * pairs; }
  int64_t nunits() const { return t4p() / u4; }
};

// Rows [32 rb, 32 rb + 32 RB) for activation rows [m0, m1), MT rows at a time.
template <int Q, int MT, int RB>
void gemm_block(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                const uint8_t* codes, const uint16_t* alpha, const uint16_t* zoff, int use_z, int64_t rb,
                const Shape& s, float* y) {
  const __m256i ones = _mm256_set1_epi8(1);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t t4p = s.t4p(), nu = s.nunits(), upg = s.g4 / s.u4, ppu = s.u4 / 2;
  const int64_t w = s.ar == 1 ? 32 : 1;
  for (int64_t m = m0; m + MT <= m1; m += MT) {
    __m256 accf[MT][RB][4];
    for (int i = 0; i < MT; ++i)
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < 4; ++v) accf[i][r][v] = _mm256_setzero_ps();
    for (int64_t u = 0; u < nu; ++u) {
      const int64_t g = u / upg;
      __m256i acc[MT][RB][Q][2];
      for (int i = 0; i < MT; ++i)
        for (int r = 0; r < RB; ++r)
          for (int b = 0; b < Q; ++b) acc[i][r][b][0] = acc[i][r][b][1] = _mm256_setzero_si256();
      for (int64_t j = 0; j < ppu; ++j) {
        const int64_t p = u * ppu + j;
        __m256i ta[MT], tb[MT];
        for (int i = 0; i < MT; ++i) {
          const int8_t* t = tab + ((m + i) * t4p + 2 * p) * 16;
          ta[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
          tb[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        }
        for (int r = 0; r < RB; ++r) {
          const uint8_t* c = codes + ((rb + r) * s.pairs + p) * Q * 32;
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
        const uint16_t* al = alpha + (ab * s.ng + g) * Q * w;
        for (int i = 0; i < MT; ++i) {
          __m256 t[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
          for (int b = 0; b < Q; ++b) {
            __m256 f[4];
            widen(acc[i][r][b][0], acc[i][r][b][1], f);
            if (w == 32) {
              for (int v = 0; v < 4; ++v) t[v] = _mm256_fmadd_ps(f[v], cvt_f16x8(al + b * 32 + 8 * v), t[v]);
            } else {
              const __m256 a = _mm256_set1_ps(_cvtsh_ss(al[b]));
              for (int v = 0; v < 4; ++v) t[v] = _mm256_fmadd_ps(f[v], a, t[v]);
            }
          }
          const __m256 sc = _mm256_set1_ps(ls[(m + i) * nu + u]);
          for (int v = 0; v < 4; ++v) accf[i][r][v] = _mm256_fmadd_ps(t[v], sc, accf[i][r][v]);
        }
      }
      if (use_z && (u + 1) % upg == 0) {  // offset z * (sum of the group's activations), exact sums
        for (int r = 0; r < RB; ++r) {
          const int64_t ab = s.ar == 1 ? rb + r : (rb + r) * 32 / s.ar;
          const uint16_t* z = zoff + (ab * s.ng + g) * w;
          for (int i = 0; i < MT; ++i) {
            const __m256 gs = _mm256_set1_ps(gsum[(m + i) * s.ng + g]);
            for (int v = 0; v < 4; ++v) {
              const __m256 zv = w == 32 ? cvt_f16x8(z + 8 * v) : _mm256_set1_ps(_cvtsh_ss(z[0]));
              accf[i][r][v] = _mm256_fmadd_ps(zv, gs, accf[i][r][v]);
            }
          }
        }
      }
    }
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
}

template <int Q, int MT, int RB>
void gemm_range(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                const uint8_t* codes, const uint16_t* alpha, const uint16_t* zoff, int use_z,
                int64_t rb0, int64_t rb1, const Shape& s, float* y) {
  const int64_t mm = m0 + (m1 - m0) / MT * MT;  // whole MT tiles, then the rest one row at a time
  int64_t rb = rb0;
  for (; rb + RB <= rb1; rb += RB) {
    gemm_block<Q, MT, RB>(tab, ls, gsum, m0, mm, codes, alpha, zoff, use_z, rb, s, y);
    if (MT > 1) gemm_block<Q, 1, RB>(tab, ls, gsum, mm, m1, codes, alpha, zoff, use_z, rb, s, y);
  }
  for (; rb < rb1; ++rb) {
    gemm_block<Q, MT, 1>(tab, ls, gsum, m0, mm, codes, alpha, zoff, use_z, rb, s, y);
    if (MT > 1) gemm_block<Q, 1, 1>(tab, ls, gsum, mm, m1, codes, alpha, zoff, use_z, rb, s, y);
  }
}

using GemmFn = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, const uint8_t*,
                        const uint16_t*, const uint16_t*, int, int64_t, int64_t, const Shape&, float*);

template <int Q>
GemmFn pick(int mt, int rbk) {
  if (mt == 2) return rbk == 2 ? gemm_range<Q, 2, 2> : gemm_range<Q, 2, 1>;
  if (mt == 4) return gemm_range<Q, 4, 1>;
  return rbk == 2 ? gemm_range<Q, 1, 2> : gemm_range<Q, 1, 1>;
}

}  // namespace

extern "C" {

// Tables, their scales and exact group sums for activation rows [m0, m1) of x [M, k].
// tab int8 [M][2 pairs][16], ls float [M][nunits], gsum float [M][ng]. Returns 0.
int shiftadd_lut_tables(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t pairs, int64_t u4,
                        int64_t g4, int64_t ng, int8_t* tab, float* ls, float* gsum) {
  const int64_t t4p = 2 * pairs, nu = t4p / u4;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * k;
    for (int64_t u = 0; u < nu; ++u) {
      float mx = 0.0f;
      for (int64_t t = u * u4; t < (u + 1) * u4; ++t) {
        float a = 0.0f;
        for (int j = 0; j < 4; ++j) {
          const int64_t kk = 4 * t + j;
          a = a + (kk < k ? fabsf(xr[kk]) : 0.0f);
        }
        mx = a > mx ? a : mx;
      }
      const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
      ls[m * nu + u] = mx / 127.0f;
      for (int64_t t = u * u4; t < (u + 1) * u4; ++t) {
        float v[4];
        for (int j = 0; j < 4; ++j) v[j] = 4 * t + j < k ? xr[4 * t + j] : 0.0f;
        int8_t* out = tab + (m * t4p + t) * 16;
        for (int idx = 0; idx < 16; ++idx) {
          float e = 0.0f;
          for (int j = 0; j < 4; ++j) e = e + ((idx >> j) & 1 ? v[j] : -v[j]);
          out[idx] = static_cast<int8_t>(nearbyintf(e * inv));
        }
      }
    }
    for (int64_t g = 0; g < ng; ++g) {
      float a = 0.0f;
      for (int64_t kk = g * g4 * 4; kk < (g + 1) * g4 * 4 && kk < k; ++kk) a = a + xr[kk];
      gsum[m * ng + g] = a;
    }
  }
  return 0;
}

// y[M, n] rows [32 rb0, 32 rb1) for activation rows [m0, m1). q planes (1..4); mt activation rows and
// rbk row blocks per pass (tuning knobs). Returns 0, or -1 for an unsupported q / knob.
int shiftadd_lut_gemm(const int8_t* tab, const float* ls, const float* gsum, int64_t m0, int64_t m1,
                      const uint8_t* codes, const uint16_t* alpha, const uint16_t* zoff, int64_t use_z,
                      int64_t rb0, int64_t rb1, int64_t n, int64_t pairs, int64_t u4, int64_t g4, int64_t ng,
                      int64_t rows_per_alpha, int64_t q, int64_t mt, int64_t rbk, float* y) {
  const Shape s{n, pairs, u4, g4, ng, rows_per_alpha};
  GemmFn f = nullptr;
  switch (q) {
    case 1: f = pick<1>(int(mt), int(rbk)); break;
    case 2: f = pick<2>(int(mt), int(rbk)); break;
    case 3: f = pick<3>(int(mt), int(rbk)); break;
    case 4: f = pick<4>(int(mt), int(rbk)); break;
    default: return -1;
  }
  f(tab, ls, gsum, m0, m1, codes, alpha, zoff, int(use_z), rb0, rb1, s, y);
  return 0;
}

}  // extern "C"
