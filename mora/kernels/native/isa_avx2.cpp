// The avx2 path: kernel.h with one panel as two ymm registers (AVX2 + FMA; 16 registers, so
// blocks of up to 6 rows, and the rows of a larger unit run as blocks back to back).
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mora_native::isa_avx2 {
namespace {  // internal: no symbol of a path is exported, interposed or shared with another

struct Vec {
  __m256 lo, hi;  // columns 0-7 and 8-15
};

// The panel's columns inside [0, n): `lanes` of them, as the dword masks of vmaskmov (float32)
// and, for bfloat16, the whole column pairs as dwords plus a lone last column.
struct Mask {
  int lanes;
  __m256i lo, hi, pairs, last;
};

// 16 ymm registers: up to 6 rows x 2 halves of a panel of accumulators, 2 loads, 1 broadcast.
// (3 rows x 2 panels, two lines of Mt in flight per row, ran memory-bound products 10-20%
// faster but L2-resident ones 5-10% and bfloat16 ones 40% slower.)
template <typename T>
constexpr int kBlockRows = 6;

template <int RB, typename T>
constexpr int panels_for() {
  return RB >= 4 ? 1 : RB >= 2 ? 2 : 4;
}

inline __m256i first(int count) {  // dword lanes [0, count)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline Mask mask_of(int lanes) {
  const __m256i words = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {lanes, first(lanes), first(lanes - 8), first(lanes / 2),
          lanes % 2 ? _mm256_cmpeq_epi16(words, _mm256_set1_epi16(static_cast<int16_t>(lanes - 1))) : _mm256_setzero_si256()};
}

inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec bcast(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline void to_floats(float* dst, Vec v) {
  _mm256_storeu_ps(dst, v.lo);
  _mm256_storeu_ps(dst + 8, v.hi);
}

// bf16 bits of float32 lanes (round to nearest even, NaN to 0x7FC0), one per dword.
inline __m256i bf16_dwords(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
// The 16 words in column order: packus interleaves 128-bit lanes (lo0 hi0 lo1 hi1), put them back.
inline __m256i bf16_bits(Vec v) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_dwords(v.lo), bf16_dwords(v.hi)), 0xD8);
}
inline Vec widen(__m256i bits) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1)), 16))};
}

template <typename T>
Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return widen(bf16_bits(v));
}

template <typename T>
Vec load(const T* p) {
  if constexpr (std::is_same_v<T, float>) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  else return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lanes outside `m` are 0 and never read (masked loads do not fault on masked-out elements).
template <typename T>
Vec load(const Mask& m, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return {_mm256_maskload_ps(p, m.lo), _mm256_maskload_ps(p + 8, m.hi)};
  } else {
    const __m256i pairs = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m.pairs);
    const __m256i last = _mm256_and_si256(m.last, _mm256_set1_epi16(static_cast<int16_t>(p[m.lanes % 2 ? m.lanes - 1 : 0])));
    return widen(_mm256_or_si256(pairs, last));
  }
}

template <typename T>
void store(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
  }
}

template <typename T>
void store(const Mask& m, T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_maskstore_ps(p, m.lo, v.lo);
    _mm256_maskstore_ps(p + 8, m.hi, v.hi);
  } else {  // outside the inner loop: the few words one at a time
    alignas(32) uint16_t w[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w), bf16_bits(v));
    for (int l = 0; l < m.lanes; ++l) p[l] = w[l];
  }
}

// y[j + l] = round_T(y[j + l] + v[l]) for the lanes l in [lo, hi) (the others are not touched).
template <typename T>
void add_lanes(T* y, int64_t j, int lo, int hi, const float* v) {
  if (lo == 0 && hi == 16) {
    store<T>(y + j, add(load<T>(y + j), load<float>(v)));
    return;
  }
  for (int l = lo; l < hi; ++l) y[j + l] = Scalar<T>::from(Scalar<T>::get(y[j + l]) + v[l]);
}

// bf16 panels widened as loaded (block): a panel's 16 values are 32 bytes, one load; a bf16
// value's bits are the high half of its float32, so `lo` takes the even columns shifted up and
// `hi` the odd ones masked, one operation each (widen() takes five: two zero-extensions, an
// extract, two shifts). column_order puts an accumulator back in column order once a block is
// done; the sums are the same.
template <typename T>
constexpr int kLinePanels = std::is_same_v<T, float> ? 0 : 1;

template <typename T>
void load_line(const T* p, Vec* b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  b[0] = {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

template <typename T>
void column_order(Vec* a) {
  const __m256 u = _mm256_unpacklo_ps(a->lo, a->hi);  // columns 0-3 | 8-11
  const __m256 v = _mm256_unpackhi_ps(a->lo, a->hi);  // columns 4-7 | 12-15
  *a = {_mm256_permute2f128_ps(u, v, 0x20), _mm256_permute2f128_ps(u, v, 0x31)};
}

#include "kernel.h"

}  // namespace

const Unit<float>* units_float() { return kUnits<float>; }
const Unit<bf16>* units_bf16() { return kUnits<bf16>; }
const RowOps<float>* rows_float() { return &kRowOps<float>; }
const RowOps<bf16>* rows_bf16() { return &kRowOps<bf16>; }

}  // namespace mora_native::isa_avx2
#pragma GCC pop_options
