// The avx512_bf16 path's bfloat16 units: kernel.h's blocks with vdpbf16ps (AVX512_BF16), two
// terms of k per instruction. isa_avx512.cpp includes it after kernel.h, under a target that
// adds AVX512_BF16 and AVX512DQ; its float32 units and everything else are the avx512 path's.
//
// Why: on AMD Zen 4 vdpbf16ps issues once per cycle, as an FMA does, so it sums twice the terms;
// oneDNN's bf16 GEMM runs on it there, and the widened kernel ran at 2.2-4x that GEMM's time
// (bench.kernel --dtype bfloat16). On Intel's Sapphire/Emerald Rapids it issues every second
// cycle (half the widened kernel's rate) and oneDNN has AMX: `auto` keeps the avx512 path there.
// AMX's tdpbf16ps cannot stand in for either: it does not sum in order with one rounding per
// term (bench.dot_sums on a Xeon with AMX: 51% of outputs match that sum, either half of a pair
// first; vdpbf16ps high half first: 100%, there as on Zen 4).
//
// The same bits as the widened kernel. vdpbf16ps adds a pair's two products into a float32 lane
// one after the other, the pair's high half first, each an FMA of an exact product (measured on
// Zen 4: 320,000 sums of 256 terms, bit for bit). So k's earlier term goes in the high half: a
// lane's sum is over k in order, one rounding per term, from +0. Unlike an FMA it reads subnormal
// operands as 0 and flushes subnormal results (DAZ, FTZ). Those never arise where every nonzero
// value of V and M is at least 2^-56 in magnitude: each is then a multiple of 2^-63, each product
// a multiple of 2^-126, and so is every partial sum (a multiple of 2^-126 below 2^-102 is a float
// exactly; above, the ulp is a multiple of it): zero or normal. A unit whose rows hold a smaller
// nonzero value runs the widened kernel (found while packing); a block whose panels of M do,
// checked as it reads them, throws its sums away before storing anything and runs widened.
// rope_apply's rows are rotated straight into pairs (rotated_pairs), rounded by vcvtneps2bf16,
// which rounds as c10::BFloat16 does but for subnormals and NaNs: a row that rounds one is
// rotated again the widened way (tests/test_native_kernel.py, special values).

// bf16 bits without the sign below this are a nonzero value under 2^-56 (biased exponent 71), or 0.
constexpr uint32_t kTinyBelow = 71 << 7;

// The check for such values over vectors of bf16 bits (dot_pack's pairs of V, dot_block's panels
// of M): the unsigned min of |bits| - 1 over every 16-bit half seen, 0 wrapping to the top.
struct TinyCheck {
  __m512i least;
  TinyCheck() : least(_mm512_set1_epi16(-1)) {}  // user-provided: an implicit one misses the target pragma
  void add(__m512i bits) {
    least = _mm512_min_epu16(least, _mm512_sub_epi16(_mm512_and_si512(bits, _mm512_set1_epi16(0x7FFF)),
                                                     _mm512_set1_epi16(1)));
  }
  // A nonzero value under 2^-56 was seen.
  bool found() const { return _mm512_cmplt_epu16_mask(least, _mm512_set1_epi16(kTinyBelow - 1)) != 0; }
};

// Pairs of k per piece of the packed rows (dot_pack): 16 values of k, a bf16 panel's worth.
constexpr int kPairs = kPanel / 2;

// The packed rows' piece (dot_pack) holding pairs [q0, q0 + kPairs) of a unit of `ldq` rows, q0 a
// multiple of kPairs: row i's at + i * kPairs (pk: the unit's row 0's, or a block's first row's).
template <typename W>
W* pair_piece(W* pk, int64_t ldq, int64_t q0) {
  return pk + q0 * ldq;
}

// Pair q of row i in those packed rows.
inline uint32_t pair_at(const uint32_t* pk, int64_t ldq, int i, int64_t q) {
  return pair_piece(pk, ldq, q - q % kPairs)[i * kPairs + q % kPairs];
}

// bf16 bits of float32 lanes by vcvtneps2bf16: bf16_bits' rounding (to nearest even) except on
// subnormal lanes (read as 0) and NaNs (kept, quieted, not made 0x7FC0); lanes of those kinds
// are added to `special`, and the caller then rounds by bf16_bits instead.
inline __m256i rounded_bits(Vec v, __mmask16& special) {
  special = _kor_mask16(special, _mm512_fpclass_ps_mask(v, 0xA1));  // QNaN 0x01, denormal 0x20, SNaN 0x80
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// Row r of a rope_apply unit, rotated, as pairs of bf16 bits into row[0, n / 2): rotate()'s
// values, the same products, sums and roundings, without its passes over floats. 32 values of k
// per step: the even k and the odd k of 16 pairs are two vectors (the low and the high halves of
// the pairs' words), so a pair's two values are one lane of each. (rotate() widens the chunk,
// rotates it into floats and copies them, and the pairs were cut from those: a fifth of a call.)
// False, with row[] undefined, for the padded last chunk, a half that splits pairs (n / 2 odd)
// and rows rounding a subnormal or a NaN: rotate() then.
inline bool rotated_pairs(const Rope<bf16>& rope, int64_t r, uint32_t* row) {
  const int64_t n = rope.n, c = r % rope.chunks, half = n / 2;
  const int64_t base = (rope.k_lo + c) * n;
  if (half % 2 || base + n > rope.in_f) return false;
  const bf16* u = rope.x + rope.tokens[r / rope.chunks] * rope.ldx + base;
  const bf16* cr = rope.cos + c * n;
  const bf16* sr = rope.ssin + c * n;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto even = [](__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); };
  auto odd = [&high](__m512i w) { return _mm512_castsi512_ps(_mm512_and_si512(w, high)); };
  __mmask16 special = 0;
  // v[k] = round(round(u[k'] * ssin[k]) + u[k] * cos[k]): k' = k + half in the chunk's first
  // half, k - half in its second; half is even, so every pair lies in one half.
  for (int64_t at = 0; at < n; at += half) {
    const bf16* partner = u + (at ? -half : half);
    for (int64_t k = at; k < at + half; k += 2 * kPanel) {
      const Mask in = mask_of(static_cast<int>(std::min<int64_t>(kPanel, (at + half - k) / 2)));
      const __m512i uw = _mm512_maskz_loadu_epi32(in, u + k), pw = _mm512_maskz_loadu_epi32(in, partner + k);
      const __m512i sw = _mm512_maskz_loadu_epi32(in, sr + k), cw = _mm512_maskz_loadu_epi32(in, cr + k);
      __mmask16 s = 0;
      const Vec rot_even = widen(rounded_bits(mul(even(pw), even(sw)), s));
      const Vec rot_odd = widen(rounded_bits(mul(odd(pw), odd(sw)), s));
      const __m256i lo = rounded_bits(_mm512_add_ps(rot_even, mul(even(uw), even(cw))), s);
      const __m256i hi = rounded_bits(_mm512_add_ps(rot_odd, mul(odd(uw), odd(cw))), s);
      special |= s;
      // a pair's k first: the high half of its word
      const __m512i pair = _mm512_or_si512(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16), _mm512_cvtepu16_epi32(hi));
      _mm512_mask_storeu_epi32(row + k / 2, in, pair);
    }
  }
  return special == 0;
}

// A unit's V rows (the header's first word 0): pairs of k in pieces of kPairs, each piece row
// after row, as kernel.h's float32 pieces: row i's pair q at pk[(q / kPairs * RB + i) * kPairs +
// q % kPairs], bits(v[2q]) << 16 | bits(v[2q + 1]) (0 past n). Or (first word 1: a value too
// small) kernel.h's float32 packing, after the header. Each row's pairs are made in a row of
// their own (loops the compiler vectorizes), then checked for tiny values and stored in vectors,
// two pieces (64 bytes) per step: pair by pair, RB apart, dot_pack took 5.3% of a bf16 q_proj
// decode call's samples, 4.2% a piece at a time (16 x 16, this path forced on a Xeon with AMX);
// a scalar check and 32-byte copies were then a quarter of dot_pack on Zen 4 (in vectors: bf16
// decode and prefill calls 2-4% faster). A block reads its rows' pairs at constant offsets.
template <int RB>
void dot_pack(const Problem<bf16>& p, int64_t row0, float* dst, float* scratch) {
  uint32_t* head = reinterpret_cast<uint32_t*>(dst);
  uint32_t* pk = head + kPanel;
  const int64_t n = p.n, half = n / 2, pairs = (n + 1) / 2;
  const float* rotated = scratch + 2 * n;
  uint32_t* row = reinterpret_cast<uint32_t*>(scratch);  // make_row()'s buffer, free once it returns
  TinyCheck tiny;
  for (int i = 0; i < RB; ++i) {
    if (!p.rope.y) {
      const bf16* src = p.V + (row0 + i) * p.ldv;
      for (int64_t q = 0; q < half; ++q) {
        uint32_t w;
        std::memcpy(&w, src + 2 * q, 4);
        row[q] = w << 16 | w >> 16;
      }
      if (n % 2) row[half] = static_cast<uint32_t>(src[n - 1]) << 16;
    } else {
      if (!p.y_requested) request_y(p.rope, row0 + i);  // as direct_row()
      if (p.rope.sum_chunks || !rotated_pairs(p.rope, row0 + i, row)) {
        // summed rows, and the rotated ones rotated_pairs leaves, hold bf16 values as floats:
        // their bits are the float's upper half
        make_row(p.rope, row0 + i, scratch + 2 * n, 1, scratch);
        const uint32_t* u = reinterpret_cast<const uint32_t*>(rotated);
        for (int64_t q = 0; q < half; ++q) row[q] = (u[2 * q] & 0xFFFF0000u) | (u[2 * q + 1] >> 16);
        if (n % 2) row[half] = u[n - 1] & 0xFFFF0000u;
      }
    }
    // Two pieces' worth of the row at a time: checked (as dot_block checks M) and stored, each
    // piece's pairs with one masked 32-byte store
    for (int64_t q0 = 0; q0 < pairs; q0 += 2 * kPairs) {
      const Mask in = mask_of(static_cast<int>(std::min<int64_t>(2 * kPairs, pairs - q0)));
      const __m512i w = _mm512_maskz_loadu_epi32(in, row + q0);  // lanes past the row: 0, never tiny
      tiny.add(w);
      _mm256_mask_storeu_epi32(pair_piece(pk, RB, q0) + i * kPairs, static_cast<__mmask8>(in), _mm512_castsi512_si256(w));
      if (q0 + kPairs < pairs)
        _mm256_mask_storeu_epi32(pair_piece(pk, RB, q0 + kPairs) + i * kPairs, static_cast<__mmask8>(in >> kPairs),
                                 _mm512_extracti64x4_epi64(w, 1));
    }
  }
  const uint32_t small = tiny.found();
  head[0] = small;
  if (small) pack<RB, bf16>(p, row0, dst + kPanel, scratch);
}

// The pairs of RB rows (a block's, in a unit of ldq rows: dot_pack's pieces) as kernel.h's
// float32 packing (put_row's pieces).
template <int RB>
void unpair(const uint32_t* pk, int64_t ldq, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k)
    for (int i = 0; i < RB; ++i)  // k even: the high half
      dst[(k / kPanel * RB + i) * kPanel + k % kPanel] =
          Scalar<bf16>::get(static_cast<bf16>(pair_at(pk, ldq, i, k / 2) >> (k % 2 ? 0 : 16)));
}

// RB rows (pairs at Vp: dot_pack's pieces of a unit of ldq rows) x NP panels from panel p0, as
// kernel.h's block.
template <int RB, int NP, bool TAIL>
void dot_block(const Problem<bf16>& p, const uint32_t* Vp, int64_t ldq, int64_t row0, int64_t p0) {
  Vec acc[RB][NP];
  clear(acc);
  const Edges<RB, NP, TAIL, bf16> e(p, p0);
  const Mask tail = e.tail;
  const bf16* const(&ahead)[NP] = e.ahead;
  // Word 2l of a pair's panel: row k + 1's column l (the low half), 2l + 1: row k's (the high).
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  TinyCheck tiny;
  const bf16* base = p.Mt + p0 * kPanel;
  const int64_t pairs = (p.n + 1) / 2;
  // One loop over the pairs, each piece's pace and address taken where it starts: as a loop over
  // pieces around a loop over their pairs it ran 5-10% slower on Zen 4 (q_proj T=16 A=16, rope_apply
  // of both builds alternately in one process: 223 -> 209 us).
  const uint32_t* piece = Vp;
  for (int64_t q = 0; q < pairs; ++q) {
    if (q % kPairs == 0) {  // a piece of 16 k: the Stream's pace
      pace_next(p, RB * NP * std::min<int64_t>(kPanel, p.n - 2 * q));
      piece = pair_piece(Vp, ldq, q);
    }
    const bf16* row = base + 2 * q * p.ldm;
    const bool two = 2 * q + 1 < p.n;
    __m512i b[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      if (j % 2 == 0) {  // two panels of bf16 (from an even one) are one 64-byte line: one prefetch
        __builtin_prefetch(row + PF * p.ldm + j * kPanel, 0, 3);              // prefetcht0, both rows
        __builtin_prefetch(row + (PF + 1) * p.ldm + j * kPanel, 0, 3);
        if (ahead[j]) {
          __builtin_prefetch(ahead[j] + 2 * q * p.ldm, 0, 2);                 // prefetcht1
          __builtin_prefetch(ahead[j] + (2 * q + 1) * p.ldm, 0, 2);
        }
      }
      const bf16* at = row + j * kPanel;
      const bool part = TAIL && j == NP - 1;  // never past n
      const __m256i hi = part ? _mm256_maskz_loadu_epi16(tail, at)
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
      const __m256i lo = !two ? _mm256_setzero_si256()
                         : part ? _mm256_maskz_loadu_epi16(tail, at + p.ldm)
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + p.ldm));
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      tiny.add(both);
      b[j] = _mm512_permutexvar_epi16(order, both);
    }
    const uint32_t* a = piece + q % kPairs;
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const __m512bh ai = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[i * kPairs])));
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, reinterpret_cast<__m512bh>(b[j]));
    }
  }
  if (tiny.found()) {  // a value of M too small
    thread_local std::vector<float> wide;
    if (static_cast<int64_t>(wide.size()) < RB * tile_stride(p.n)) wide.resize(RB * tile_stride(p.n));
    unpair<RB>(Vp, ldq, p.n, wide.data());
    Problem<bf16> again = p;
    again.next_m = again.next_rows = nullptr;  // paced once already
    block<RB, NP, TAIL>(again, wide.data(), row0, p0);
    return;
  }
  finish<RB, NP, TAIL>(p, acc, row0, p0, e.lanes);
}

// A dot-product block holds up to kDotRows rows x dot_panels_for panels: from 5 rows, two panels
// (one 64-byte line of each row of Mt) per pair of k; up to 12 rows x 2 panels, 24 accumulators
// with the loads, the broadcast and the check's constants in the 32 registers. A unit of 13-16
// rows runs as two blocks back to back over the same panels, the second reading them from L1.
// (12-row units, a decode token of gate_proj's 12 chunks, ran as 6 + 6 rows 10-15% slower: the
// loads, permutes and checks of M per pair of k were shared by 12 products, now 24.)
constexpr int kDotRows = 12;

template <int SUB>
constexpr int dot_panels_for() {
  return SUB >= 5 ? 2 : SUB >= 3 ? 4 : 8;
}

template <int RB, int NP, bool TAIL>
void dot_sweep(const Problem<bf16>& p, const uint32_t* pk, int64_t row0, int64_t q) {
  constexpr int parts = (RB + kDotRows - 1) / kDotRows, SUB = (RB + parts - 1) / parts;
  static_assert(parts <= 2, "a unit is at most two blocks");
  dot_block<SUB, NP, TAIL>(p, pk, RB, row0, q);
  if constexpr (parts == 2) dot_block<RB - SUB, NP, TAIL>(p, pk + SUB * kPairs, RB, row0 + SUB, q);
}

template <int RB>
constexpr int dot_np() {
  constexpr int parts = (RB + kDotRows - 1) / kDotRows;
  return dot_panels_for<(RB + parts - 1) / parts>();
}

// The packed rows times panels [q0, q1) of M, as kernel.h's panels.
template <int RB>
void dot_panels(const Problem<bf16>& p, const float* packed, int64_t row0, int64_t q0, int64_t q1) {
  if (reinterpret_cast<const uint32_t*>(packed)[0]) return panels<RB, bf16>(p, packed + kPanel, row0, q0, q1);
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed) + kPanel;
  constexpr int NP = dot_np<RB>();
  const int64_t full = std::min(q1, p.n / kPanel);
  int64_t q = q0;
  for (; q + NP <= full; q += NP) dot_sweep<RB, NP, false>(p, pk, row0, q);
  for (; q < full; ++q) dot_sweep<RB, 1, false>(p, pk, row0, q);
  if (q1 > p.n / kPanel && p.n % kPanel) dot_sweep<RB, 1, true>(p, pk, row0, p.n / kPanel);
  after_panels(p, row0, RB, q1);
}

template <int RB>
constexpr Unit<bf16> dot_unit() {
  return {dot_pack<RB>, dot_panels<RB>, dot_np<RB>()};
}

constexpr Unit<bf16> kDotUnits[kMaxRows + 1] = {
    {},           dot_unit<1>(),  dot_unit<2>(),  dot_unit<3>(),  dot_unit<4>(),  dot_unit<5>(),
    dot_unit<6>(),  dot_unit<7>(),  dot_unit<8>(),  dot_unit<9>(),  dot_unit<10>(), dot_unit<11>(),
    dot_unit<12>(), dot_unit<13>(), dot_unit<14>(), dot_unit<15>(), dot_unit<16>()};
