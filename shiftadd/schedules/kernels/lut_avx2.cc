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
//
// Files (one translation unit: the build compiles this file, which includes the others): lut_common.h
// (includes, Shape, shared helpers), lut_tables.h (table constructor, group sums), lut_avx2_loop.h (the
// LUT loop on 256-bit registers), lut_int8.h (the int8 path), lut_avx512_loop.h (the LUT loop on 512-bit
// registers); here: ISA and switch detection, the dispatch and the launch on TVM's thread pool. Include
// order: pick_i8 before pick_lut512, as in the one-file kernel, so g++ emits the same functions in the same
// order (the object's code is the one-file kernel's, byte for byte).
#include "lut_common.h"
#include "lut_tables.h"
#include "lut_avx2_loop.h"
#include "lut_int8.h"
#include "lut_avx512_loop.h"

namespace {

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
