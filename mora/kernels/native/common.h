// What grouped_mm.cpp (the ops) and the ISA paths (isa_*.cpp, each the kernel of kernel.h built
// for one instruction set) share: the problem a kernel is given and the scalar conversions.
// Nothing here is compiled under a target pragma: an inline function every file may emit must
// hold baseline x86-64 instructions only, whichever copy the linker keeps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace mora_native {

constexpr int kPanel = 16;  // output columns per panel (a 64-byte line of float32 Mt)
constexpr int kMaxRows = 16;
constexpr int PF = 16;  // rows of Mt prefetched ahead: a row stride of 1-2 KB defeats the hardware prefetcher
// Panels of this M's Mt prefetched into L2 ahead of the one being multiplied (about 90 KB at
// n = 348: microseconds ahead, while a line from memory takes a tenth of one). The next M comes
// by its Stream (below), not by panels.
constexpr int kAhead = 4;

using bf16 = uint16_t;  // at::BFloat16's bits

// Inlined wherever it is called, whatever GCC's inlining heuristics say: a block calls pace_next
// between its products, and a call out of line clobbers every vector register, so a block's
// accumulators were stored and loaded around each one (24 zmm each way per 16 k in the bf16
// dot-product block, 12 x 2; on Zen 4 gate_proj decode with 16 adapters ran 1.3x as long).
#define MORA_INLINE inline __attribute__((always_inline))

// prefetcht1 (into L2) that the optimizer keeps: GCC deletes a loop of __builtin_prefetch that
// does nothing else.
inline void prefetch_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }

// What a thread reads next, requested into L2 in address order while it computes, at a pace
// set by the work: `pace(w)` after each w products of a block (rows x panels x terms of k)
// requests the lines their share comes to. Two streams run (Problem):
// * the next group's M, at kStreamPace of its lines over the current group's products, so it
//   ends near the group's end, the last lines left to the next group's own panel prefetches
//   (on Intel CPUs only: grouped_mm.cpp's kStreamNextM);
// * the next run's sources (x's or V's rows) and the y lines its products are added into, at
//   kRowsPace of their lines over the current run's products. (y's lines were requested while
//   a run's rows were packed, a burst of misses before its first product; x's were read cold.)
// Why: requested by panels (16 columns of each row, rows 1-2 KB apart, a new page every few
// lines) the next M's lines do not stream under the FMAs; in address order they do. One core
// running the kernel's 8 x 3 block FMAs at full rate while prefetching 16 MB (64 Ms of 256 x 256)
// took +3-9% in address order, +30-65% in panel order. Paced per piece of 16 k, not per k: the
// bookkeeping in the inner loop cost 3-7% of compute-bound calls. kStreamPace 0.8 beat 0.5,
// 0.65 and 1.15; kRowsPace 1.0 beat 1.5 (bench.kernel's cases, float32, Xeon with AMX;
// docs/benchmarks.md).
constexpr double kStreamPace = 0.8;
constexpr double kRowsPace = 1.0;

using Span = std::pair<const char*, const char*>;  // bytes [first, second), never empty

struct Stream {
  const char* line = nullptr;  // the next line to request (null: done)
  const char* end = nullptr;   // the end of the range it lies in
  int64_t ld = 0, len = 0, rows = 0;  // strided: bytes from a range to the next, a range's bytes, ranges left
  const Span* span = nullptr;         // listed: the ranges left (null: strided)
  int64_t spans = 0;
  uint64_t credit = 0, rate = 0;  // lines in units of 2^-32, per product

  static constexpr uint64_t kLine = uint64_t{1} << 32;

  // `rows` rows of `len` bytes, `ld` bytes apart from `first` (an M's), over `work` products.
  Stream(const void* first, int64_t rows_, int64_t len_, int64_t ld_, int64_t work) {
    if (len_ == ld_) len_ *= rows_, rows_ = 1;  // one run of memory
    const auto* at = static_cast<const char*>(first);
    line = down(at), end = at + len_, ld = ld_, len = len_, rows = rows_ - 1;
    set_rate(kStreamPace, static_cast<double>(rows_) * static_cast<double>(len_ / 64 + 2), work);
  }
  // The ranges [first, first + count) in order, over `work` products.
  Stream(const Span* first, int64_t count, int64_t work) {
    double lines = 0;
    for (int64_t i = 0; i < count; ++i) lines += static_cast<double>(up(first[i].second) - down(first[i].first)) / 64;
    if (count) line = down(first->first), end = first->second, span = first + 1, spans = count - 1;
    set_rate(kRowsPace, lines, work);
  }
  Stream() = default;

  MORA_INLINE void pace(uint64_t work) {
    take(work, [](const char* at) { prefetch_l2(at); });
  }

  // pace's schedule: request(line) for each line `work` more products come to, in address order.
  template <typename Request>
  MORA_INLINE void take(uint64_t work, Request request) {
    if (!line) return;
    credit += rate * work;
    for (; credit >= kLine; credit -= kLine) {
      request(line);
      line += 64;
      if (line >= end && !next_range()) return;
    }
  }

 private:
  static const char* down(const char* at) { return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(at) & ~uintptr_t{63}); }
  static const char* up(const char* at) { return down(at + 63); }

  void set_rate(double pace, double lines, int64_t work) {  // rounded up: at pace 1, every line by the work's end
    rate = static_cast<uint64_t>(std::ceil(pace * lines * static_cast<double>(kLine) / static_cast<double>(std::max<int64_t>(work, 1))));
  }

  // To the next range's first line; false (and done) when none is left.
  MORA_INLINE bool next_range() {
    const char* from;
    if (span) {
      if (spans == 0) return line = nullptr, false;
      from = span->first, end = span->second, ++span, --spans;
    } else {
      if (rows == 0) return line = nullptr, false;
      from = end - len + ld, end = from + len, --rows;
    }
    line = down(from);
    return true;
  }
};

// A storage type's values as float32 and back: `get` widens, `from` rounds (bf16: to nearest
// even, NaN to 0x7FC0, c10::BFloat16's conversion), `round` is the float32 value `from` stores.
template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  static float get(float v) { return v; }
  static float from(float v) { return v; }
  static float round(float v) { return v; }
};

template <>
struct Scalar<bf16> {
  static float get(bf16 v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static bf16 from(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return f != f ? 0x7FC0 : static_cast<bf16>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  static float round(float f) { return get(from(f)); }
};

// Type 6 straight from x to y (rope_apply): row r of a group is chunk k_lo + r % chunks of the
// group's token r / chunks. Its V row is that chunk of the padded input, rotated; its product's
// column q is output column (c * n + q) of every period `period`, added into y's columns
// [out_start, out_start + width). Type 1 (share_apply) is the same with one row per token
// (chunks 1, k_lo 0, period n: the tiled output), its V row the sum of the token's sum_chunks
// chunks of the padded input. Roundings are those of the reference's elementwise torch ops.
template <typename T>
struct Rope {
  const T* x;
  int64_t ldx, in_f;
  const int64_t* tokens;  // y/x row of each of the group's tokens (already offset to the group)
  const T* cos;           // [chunks, n]: the rows of chunks k_lo..
  const T* ssin;          // [chunks, n]: cat(-sin[:, :n/2], sin[:, n/2:])
  int64_t n, chunks, k_lo, period, out_start, width;
  T* y;  // null: grouped_mm
  int64_t ldy;
  int64_t sum_chunks = 0;  // share_apply (type 1): row r's V is the sum of its token's chunks 0..sum_chunks-1
};

template <typename T>
struct Problem {
  const T* V;
  int64_t ldv;
  const T* Mt;  // this group's Mt[slot]
  int64_t ldm;  // its row stride
  int64_t n;
  T* out;
  int64_t ldo;
  float alpha;
  Rope<T> rope{};  // rope_apply (rope.y set): rows are (token, chunk) pairs read from x and added into y
  // rope_apply, share_apply: the products, rounded to T, of rows tile_row0.. (ldt floats apart),
  // each unit's added into y after its last panel
  float* tile = nullptr;
  int64_t tile_row0 = 0, ldt = 0;
  // What the thread reads next (common.h's Stream), paced by this run's blocks (null: nothing):
  // the next group's M, and the next run's sources and y lines
  Stream* next_m = nullptr;
  Stream* next_rows = nullptr;
  bool y_requested = false;  // this run's y lines were (next_rows of the run before)
};

// A block's `work` more products: what the thread reads next, requested at their pace.
template <typename T>
MORA_INLINE void pace_next(const Problem<T>& p, uint64_t work) {
  if (p.next_m) p.next_m->pace(work);
  if (p.next_rows) p.next_rows->pace(work);
}

// A unit: rows [row0, row0 + RB) of one group (RB = the index in a path's table). `pack` packs
// them (as float32, k-major; the dot-product units as pairs of bf16) into `dst` (unit_floats(n)
// floats), with `scratch` (3n floats) for a rotation; `panels` multiplies the packed rows by
// panels [q0, q1) of the group's M; `np` is the panels one of its blocks multiplies at once.
template <typename T>
struct Unit {
  void (*pack)(const Problem<T>& p, int64_t row0, float* dst, float* scratch);
  void (*panels)(const Problem<T>& p, const float* packed, int64_t row0, int64_t q0, int64_t q1);
  int np;
};

// A direct op's rows around products that torch's GEMM computes (rope_rows, share_rows, rope_add,
// share_add):
// `v_row` writes row r's V (rotated, or chunk-summed) as T values into dst[0, n); `add_row` adds
// row r's products (T values at o) into y, as rope_apply adds a unit's. `buf`: 3n floats.
template <typename T>
struct RowOps {
  void (*v_row)(const Rope<T>& rope, int64_t r, T* dst, float* buf);
  void (*add_row)(const Rope<T>& rope, int64_t r, const T* o, float* buf);
};

// Up to kRun units of one group run panel-interleaved: each chunk of panels of M is multiplied
// by every unit's rows before the next is read, so M streams from memory once per run, under
// the run's compute. One unit after another, the first read M at memory speed with idle FMAs
// and the others from L2 with an idle memory bus: 64 adapters x 2 decode tokens ran 1.6x the
// roofline so.
constexpr int kRun = 4;

// A direct op's tile row, and a packed row (kernel.h's put_row): whole panels.
inline int64_t tile_stride(int64_t n) { return (n + kPanel - 1) / kPanel * kPanel; }
// A unit's packed rows, after one 64-byte header (the dot-product units' choice, kernel_dp.h).
inline int64_t unit_floats(int64_t n) { return kMaxRows * tile_stride(n) + kPanel; }
// A run's rows, then a rotation's scratch (2n) and its rotated row (n).
inline int64_t pack_floats(int64_t n) { return kRun * unit_floats(n) + 3 * n; }
// A run's tile (direct ops).
inline int64_t tile_floats(int64_t n) { return kRun * kMaxRows * tile_stride(n); }

// Each path's table of kernels by unit size (index 0 unused), from its isa_*.cpp.
namespace isa_portable {
const Unit<float>* units_float();
const Unit<bf16>* units_bf16();
const RowOps<float>* rows_float();
const RowOps<bf16>* rows_bf16();
}  // namespace isa_portable
namespace isa_avx2 {
const Unit<float>* units_float();
const Unit<bf16>* units_bf16();
const RowOps<float>* rows_float();
const RowOps<bf16>* rows_bf16();
}  // namespace isa_avx2
namespace isa_avx512 {
const Unit<float>* units_float();
const Unit<bf16>* units_bf16();
const RowOps<float>* rows_float();
const RowOps<bf16>* rows_bf16();
const Unit<bf16>* units_bf16_dot();  // vdpbf16ps (AVX512_BF16): kernel_dp.h
}  // namespace isa_avx512

}  // namespace mora_native
