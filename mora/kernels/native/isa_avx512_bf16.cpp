// The avx512_bf16 path: the avx512 kernel with bfloat16 products by vdpbf16ps (AVX512_BF16);
// float32 runs isa_avx512's kernels.
//
// vdpbf16ps adds to each float32 lane the products of one pair of bf16 elements, the odd (high)
// element's first, each with one rounding: acc = fma(a[2c], b[2c], fma(a[2c+1], b[2c+1], acc)),
// except that subnormal operands and results are flushed to zero (Intel's pseudocode; this CPU
// matched it bit for bit on 3.2M random lanes). With row k of M and V in the high halves and
// row k + 1 in the low ones, that is the widened path's sum over k in order, one FMA per term,
// in half the instructions: the same bits unless a subnormal occurs (then the flushed value).
// Mt stays as the slot table holds it: each pair of its rows is interleaved while it is read
// (two 32-byte loads and one permute per 16 columns and two rows).
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")
namespace mora_native::isa_avx512_bf16 {

constexpr bool kDotBf16 = true;
#include "isa_avx512.h"
#include "kernel.h"

// Words 2c and 2c + 1 of the result: column c of row k + 1 (the first operand), of row k (the second).
inline __m512i pair_index() {
  alignas(64) int16_t idx[32];
  for (int c = 0; c < 16; ++c) idx[2 * c] = static_cast<int16_t>(c), idx[2 * c + 1] = static_cast<int16_t>(32 + c);
  return _mm512_load_si512(idx);
}

// 16 columns of one row of Mt (the first `tail` of them if `part`: never past n), in a zmm's low half.
inline __m512i columns(bool part, Mask tail, const bf16* src) {
  return _mm512_castsi256_si512(part ? _mm256_maskz_loadu_epi16(tail, src)
                                     : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

template <int RB, int NP, bool TAIL>
void dot_block(const Problem<bf16>& p, const float* Vp, int64_t row0, int64_t p0, const bf16* next) {
  Vec acc[RB][NP];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = zero();
  const int lanes = TAIL ? static_cast<int>(p.n - (p0 + NP - 1) * kPanel) : kPanel;
  const Mask tail = mask_of(lanes);
  const __m512i idx = pair_index();
  const bf16* ahead[NP];
  lookahead<NP>(p, p0, next, ahead);
  const bf16* base = p.Mt + p0 * kPanel;
  const int64_t pairs = p.n / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512i b[NP];
    const bf16* hi = base + 2 * kp * p.ldm;  // row k
    const bf16* lo = hi + p.ldm;             // row k + 1
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      __builtin_prefetch(hi + PF * p.ldm + j * kPanel, 0, 3);
      __builtin_prefetch(lo + PF * p.ldm + j * kPanel, 0, 3);
      if (ahead[j]) {
        __builtin_prefetch(ahead[j] + 2 * kp * p.ldm, 0, 2);
        __builtin_prefetch(ahead[j] + (2 * kp + 1) * p.ldm, 0, 2);
      }
      b[j] = _mm512_permutex2var_epi16(columns(TAIL && j == NP - 1, tail, lo + j * kPanel), idx,
                                        columns(TAIL && j == NP - 1, tail, hi + j * kPanel));
    }
    const float* a = Vp + kp * RB;
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const __m512bh ai = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(a[i]));
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, (__m512bh)b[j]);
    }
  }
  if (p.n % 2) {  // the last row alone: zeros in the low halves of both operands
    const bf16* hi = base + (p.n - 1) * p.ldm;
    const float* a = Vp + pairs * RB;
    for (int j = 0; j < NP; ++j) {
      const __m512bh bj = (__m512bh)_mm512_permutex2var_epi16(_mm512_setzero_si512(), idx, columns(TAIL && j == NP - 1, tail, hi + j * kPanel));
      for (int i = 0; i < RB; ++i)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)_mm512_castps_si512(_mm512_set1_ps(a[i])), bj);
    }
  }
  finish<RB, NP, TAIL>(p, acc, lanes, row0, p0);
}

// As kernel.h's rows(), with V packed as (k, k + 1) pairs: row k's bf16 bits high, k + 1's low,
// one float32-sized word per pair and row, pair-major.
template <int RB>
void dot_rows(const Problem<bf16>& p, int64_t row0, float* pack, const bf16* next) {
  constexpr int NP = panels_for<RB>();
  const int64_t pairs = (p.n + 1) / 2;
  float* rotated = pack + pairs * RB;  // rope_apply: one rotated row (bf16 values as float32)
  for (int i = 0; i < RB; ++i) {
    auto bits = [&](int64_t k) -> uint32_t {
      if (k >= p.n) return 0;  // the partner of an odd n's last row
      if (!p.rope.y) return p.V[(row0 + i) * p.ldv + k];
      uint32_t u;
      std::memcpy(&u, rotated + k, 4);
      return u >> 16;  // exact: the rotation is rounded to bf16
    };
    if (p.rope.y) rope_row(p.rope, row0 + i, rotated, 1);
    for (int64_t kp = 0; kp < pairs; ++kp) {
      const uint32_t word = bits(2 * kp) << 16 | bits(2 * kp + 1);
      std::memcpy(pack + kp * RB + i, &word, 4);
    }
  }
  const int64_t full = p.n / kPanel;
  int64_t q = 0;
  for (; q + NP <= full; q += NP) dot_block<RB, NP, false>(p, pack, row0, q, next);
  for (; q < full; ++q) dot_block<RB, 1, false>(p, pack, row0, q, next);
  if (p.n % kPanel) dot_block<RB, 1, true>(p, pack, row0, full, next);
}

const RowsFn<bf16>* rows_bf16() { return kRows<bf16>; }

}  // namespace mora_native::isa_avx512_bf16
#pragma GCC pop_options
