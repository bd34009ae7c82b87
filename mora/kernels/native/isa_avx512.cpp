// The avx512 path: kernel.h with one panel as one zmm register (AVX-512F/BW/VL); and the
// avx512_bf16 path's bfloat16 units (kernel_dp.h), which add AVX512_BF16 and AVX512DQ.
#include <immintrin.h>

#include <vector>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
namespace mora_native::isa_avx512 {
namespace {  // internal: no symbol of a path is exported, interposed or shared with another

using Vec = __m512;
using Mask = __mmask16;  // the panel's columns inside [0, n)

// Blocks of up to kBlockRows rows x panels_for panels: the accumulators, the panel loads and
// one broadcast fit the 32 registers. Two panels from 5 rows up (a unit of 16 rows as 8 + 8):
// one load and one broadcast fewer per FMA than 16 rows x 1 panel, and two lines of Mt in flight
// per row. float32: 16 decode rows x 16 Ms of 256 x 256 ran 0.37 -> 0.31 ms, 12 x 16 Ms of
// 348 x 348 0.66 -> 0.47 ms. bfloat16 too, its panels a 64-byte line of Mt at a time
// (load_line): 8 rows x 2 panels take 11 loads per 16 FMAs where 16 x 1 took 19 (the
// broadcasts), and as a line their widening costs the FMAs' ports 2 slots per 16 FMAs, as
// 16 x 1 did, where one panel at a time it cost 4 (8 x 2 then ran 3-6% slower). A C model of the
// block on this CPU's core (16 rows, n=256, M in L2): 16 x 1 5.6-5.8 G FMA/s, 8 x 2 a line at a
// time 6.1-6.4.
template <typename T>
constexpr int kBlockRows = 14;

template <int RB, typename T>
constexpr int panels_for() {
  if constexpr (std::is_same_v<T, float>) return RB >= 9 ? 2 : RB >= 5 ? 3 : RB >= 3 ? 4 : 8;
  else return RB >= 5 ? 2 : RB >= 3 ? 4 : 8;
}

inline Mask mask_of(int lanes) { return static_cast<Mask>((1u << lanes) - 1); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec bcast(float a) { return _mm512_set1_ps(a); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void to_floats(float* dst, Vec v) { _mm512_storeu_ps(dst, v); }

// A float32's bits plus 0x7FFF plus bit 16 (the lowest bit a bf16 keeps): the high half is then
// the value rounded to nearest even (the carry rounds up). The bit added by a masked add (vptestmd):
// two operations fewer than shifting it down and back per rounding, which the bf16 rotation does
// twice per panel; the same bits for every float32 (all 2^32 compared with the shifts).
inline __m512i rounding_sum(Vec v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i r = _mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF));
  return _mm512_mask_add_epi32(r, _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x10000)), r, _mm512_set1_epi32(1));
}

// bf16 bits of float32 lanes: round to nearest even, NaN to 0x7FC0 (c10::BFloat16's conversion).
inline __m512i bf16_bits(Vec v) {
  const __m512i r = _mm512_srli_epi32(rounding_sum(v), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
inline Vec widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }

// The value each lane holds once stored as T.
template <typename T>
Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else {
    const __m512i r = _mm512_and_si512(rounding_sum(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000)));
  }
}

template <typename T>
Vec load(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm512_loadu_ps(p);
  else return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lanes outside `m` are 0 and never read.
template <typename T>
Vec load(Mask m, const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm512_maskz_loadu_ps(m, p);
  else return widen(_mm256_maskz_loadu_epi16(m, p));
}

template <typename T>
void store(Mask m, T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(p, m, v);
  else _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_bits(v)));
}

template <typename T>
void store(T* p, Vec v) {
  store<T>(mask_of(16), p, v);
}

// y[j + l] = round_T(y[j + l] + v[l]) for the lanes l in [lo, hi) (the others are not touched).
template <typename T>
void add_lanes(T* y, int64_t j, int lo, int hi, const float* v) {
  const Mask m = static_cast<Mask>(mask_of(hi) & ~mask_of(lo));
  T* dst = y + j;
  store<T>(m, dst, add(load<T>(m, dst), load<float>(v)));
}

// bf16 panels a line of Mt at a time (block): two panels, 32 columns. A bf16 value's bits are
// the high half of its float32, so the line widens with one operation per 16 columns: b[0] the
// even columns shifted up, b[1] the odd ones masked. column_order puts such a pair of
// accumulators back in column order (0-15, 16-31) once a block is done; the sums are the same.
template <typename T>
constexpr int kLinePanels = std::is_same_v<T, float> ? 0 : 2;

template <typename T>
void load_line(const T* p, Vec* b) {
  const __m512i line = _mm512_loadu_si512(p);
  b[0] = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));
  b[1] = _mm512_castsi512_ps(_mm512_and_si512(line, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <typename T>
void column_order(Vec* a) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const Vec first = _mm512_permutex2var_ps(a[0], lo, a[1]);
  a[1] = _mm512_permutex2var_ps(a[0], hi, a[1]);
  a[0] = first;
}

#include "kernel.h"

// The avx512_bf16 path's bf16 units: the same, plus AVX512_BF16 and AVX512DQ (vfpclassps; run only
// where the CPU has both).
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include "kernel_dp.h"
#pragma GCC pop_options

}  // namespace

const Unit<float>* units_float() { return kUnits<float>; }
const Unit<bf16>* units_bf16() { return kUnits<bf16>; }
const RowOps<float>* rows_float() { return &kRowOps<float>; }
const RowOps<bf16>* rows_bf16() { return &kRowOps<bf16>; }
const Unit<bf16>* units_bf16_dot() { return kDotUnits; }

}  // namespace mora_native::isa_avx512
#pragma GCC pop_options
