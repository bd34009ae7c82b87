// mora_native::grouped_mm - one call multiplies every adapter's rows by that adapter's M;
// mora_native::rope_apply - the same product for type-6 adapters, from x straight into y (the
// rotation done while packing the rows, the periodic expansion while storing them). Their
// semantics are stated in mora/kernels/native/__init__.py.
//
// Why not BLAS: an adapter's rows are few (a decode token's 12-16 rotated chunks, 1-4 compressed
// rows), so each sgemm call packs a whole M for a handful of rows and runs at a third to a half
// of the rate it reaches on one large product. This kernel reads Mt straight from the slot table
// (16-column panels of consecutive addresses, the layout the GPU tile reads too) without packing
// it, keeps up to 16 rows x 1-8 panels of accumulators in AVX-512 registers, and packs only the
// handful of V rows (contiguous broadcasts). Each output is summed over k in order, one FMA per
// term: the result of a row never depends on the other rows of the batch.
//
// float32 and bfloat16 (bf16 operands are widened to float32, products and sums are float32 and
// rounded to bf16 where torch's own ops would round them). AVX-512F/BW/VL: the Python side checks
// the CPU (torch's AVX512 capability) before loading this library.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int kPanel = 16;  // output columns per zmm register
constexpr int kMaxRows = 16;
constexpr int PF = 16;  // rows of Mt prefetched ahead: a row stride of 1-2 KB defeats the hardware prefetcher
// Panels of Mt prefetched from memory into L2 ahead of the one being multiplied (about 90 KB
// at n = 348: microseconds ahead, while a line from memory takes a tenth of one). Prefetching
// the whole next M a whole M ahead instead needs two Ms (~1 MB) of L2 at once, and lines were
// evicted before use: with every M coming from memory, that cost twice the time over the
// L2-resident case that this distance costs (0.23 vs 0.12 ms for 16 Ms of 348 x 348, 12 rows each).
constexpr int kAhead = 4;

using bf16 = uint16_t;  // at::BFloat16's bits

// How a storage type becomes float32 lanes and back. `round` is the value the type holds.
template <typename T>
struct Io;

template <>
struct Io<float> {
  KERNEL static __m512 load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  KERNEL static void store(__mmask16 m, float* p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
  KERNEL static __m512 round(__m512 v) { return v; }
  static float get(float v) { return v; }
  static float round(float v) { return v; }
};

template <>
struct Io<bf16> {
  KERNEL static __m512 load(__mmask16 m, const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  // Round to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion.
  KERNEL static __m512i bits(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  }
  KERNEL static void store(__mmask16 m, bf16* p, __m512 v) { _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bits(v))); }
  KERNEL static __m512 round(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits(v), 16)); }
  static float get(bf16 v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static float round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = f != f ? 0x7FC00000u : ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
    std::memcpy(&f, &u, 4);
    return f;
  }
};


// Type 6 straight from x to y (rope_apply): row r of a group is chunk k_lo + r % chunks of the
// group's token r / chunks. Its V row is that chunk of the padded input, rotated; its product's
// column q is output column (c * n + q) of every period `period`, added into y's columns
// [out_start, out_start + width). Roundings follow the general path's torch ops.
template <typename T>
struct Rope {
  const T* x;
  int64_t ldx, in_f;
  const int64_t* tokens;  // y/x row of each of the group's tokens (already offset to the group)
  const T* cos;           // [chunks, n]: the rows of chunks k_lo..
  const T* ssin;          // [chunks, n]: cat(-sin[:, :n/2], sin[:, n/2:])
  int64_t n, chunks, k_lo, period, out_start, width;
  T* y;
  int64_t ldy;

  // The rotated chunk of row r: v[k] = u[(k + n/2) % n] * ssin[k] + u[k] * cos[k] (u = the chunk),
  // rounded as torch's mul then addcmul_ round it.
  KERNEL void load(int64_t r, float* v, int64_t stride) const {
    const int64_t c = r % chunks, half = n / 2;
    const T* xr = x + tokens[r / chunks] * ldx;
    const T* cr = cos + c * n;
    const T* sr = ssin + c * n;
    const int64_t base = (k_lo + c) * n;
    thread_local std::vector<float> buf;
    buf.resize(2 * n);
    const float* u;
    if (std::is_same_v<T, float> && base + n <= in_f) {
      u = reinterpret_cast<const float*>(xr + base);
    } else {  // widened, and the last chunk may read the padding: the first features again
      for (int64_t k = 0; k < n; ++k) buf[k] = Io<T>::get(xr[base + k < in_f ? base + k : base + k - in_f]);
      u = buf.data();
    }
    float* o = buf.data() + n;
    for (int64_t k = 0; k < half; ++k)  // two contiguous halves: vectorized
      o[k] = Io<T>::round(Io<T>::round(u[k + half] * Io<T>::get(sr[k])) + u[k] * Io<T>::get(cr[k]));
    for (int64_t k = half; k < n; ++k)
      o[k] = Io<T>::round(Io<T>::round(u[k - half] * Io<T>::get(sr[k])) + u[k] * Io<T>::get(cr[k]));
    for (int64_t k = 0; k < n; ++k) v[k * stride] = o[k];
  }

  // y[token, j] += v[lane] for every output column j of chunk column q0 + lane (v already
  // rounded to T, as the general path's product buffer holds it).
  KERNEL void add(int64_t r, int64_t q0, __mmask16 valid, __m512 v) const {
    T* yr = y + tokens[r / chunks] * ldy;
    const int64_t d = (k_lo + r % chunks) * n + q0 - out_start;  // column of lane 0 in period 0
    const int64_t first = -floor_div(d + kPanel - 1, period);   // the first period reaching column 0
    for (int64_t m = first;; ++m) {
      const int64_t j = d + m * period;
      if (j >= width) break;
      __mmask16 in = valid;
      if (j < 0) in &= static_cast<__mmask16>(0xFFFF << (-j));
      if (j + kPanel > width) in &= static_cast<__mmask16>((1u << (width - j)) - 1);
      T* dst = yr + j;
      Io<T>::store(in, dst, _mm512_add_ps(Io<T>::load(in, dst), v));
    }
  }

  static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
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
  Rope<T> rope{};  // rope_apply: rows are (token, chunk) pairs read from x and added into y
};

// Accumulator blocks: RB rows x NP panels, as many of the 32 zmm registers as fit beside the
// NP panel loads and one broadcast.
template <int RB>
constexpr int panels_for() {
  return RB >= 9 ? 1 : RB >= 5 ? 2 : RB >= 3 ? 4 : 8;
}

template <int RB, int NP, bool ROPE, typename T>
KERNEL void block(const Problem<T>& p, const float* Vp, int64_t row0, int64_t p0, const T* next) {
  __m512 acc[RB][NP];
  __mmask16 mask[NP];
  for (int j = 0; j < NP; ++j) {
    const int64_t left = p.n - (p0 + j) * kPanel;  // columns of this panel inside [0, n)
    mask[j] = left >= kPanel ? static_cast<__mmask16>(0xFFFF)
                             : static_cast<__mmask16>(left > 0 ? (1u << left) - 1 : 0);
    for (int i = 0; i < RB; ++i) acc[i][j] = _mm512_setzero_ps();
  }
  // The panels kAhead (at least one block) later: this M's, then the next unit's.
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  const T* ahead[NP];
  for (int j = 0; j < NP; ++j) {
    const int64_t q = p0 + j + NP * ((kAhead + NP - 1) / NP);
    ahead[j] = q < panels ? p.Mt + q * kPanel : next && q - panels < panels ? next + (q - panels) * kPanel : nullptr;
  }
  const T* base = p.Mt + p0 * kPanel;
  for (int64_t k = 0; k < p.n; ++k) {
    __m512 b[NP];
    const T* row = base + k * p.ldm;
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(row + PF * p.ldm + j * kPanel), _MM_HINT_T0);
      if (ahead[j]) _mm_prefetch(reinterpret_cast<const char*>(ahead[j] + k * p.ldm), _MM_HINT_T1);
      b[j] = Io<T>::load(mask[j], row + j * kPanel);  // masked: never reads past n
    }
    const float* a = Vp + k * RB;
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(ai, b[j], acc[i][j]);
    }
  }
  const __m512 alpha = _mm512_set1_ps(p.alpha);
  if constexpr (ROPE) {  // through a tile: the accumulators stay registers in the loop above
    alignas(64) float tile[RB][NP][kPanel];
    for (int j = 0; j < NP; ++j)
      for (int i = 0; i < RB; ++i)
        _mm512_store_ps(tile[i][j], Io<T>::round(p.alpha == 1.0f ? acc[i][j] : _mm512_mul_ps(acc[i][j], alpha)));
    for (int j = 0; j < NP && mask[j]; ++j)
      for (int i = 0; i < RB; ++i) p.rope.add(row0 + i, (p0 + j) * kPanel, mask[j], _mm512_load_ps(tile[i][j]));
    return;
  }
  for (int j = 0; j < NP; ++j) {
    if (!mask[j]) break;
    for (int i = 0; i < RB; ++i) {
      const __m512 v = p.alpha == 1.0f ? acc[i][j] : _mm512_mul_ps(acc[i][j], alpha);
      Io<T>::store(mask[j], p.out + (row0 + i) * p.ldo + (p0 + j) * kPanel, v);
    }
  }
}

// Rows [row0, row0 + RB) of one group: pack them k-major (as float32), then every column panel.
template <int RB, bool ROPE, typename T>
KERNEL void rows(const Problem<T>& p, int64_t row0, std::vector<float>& pack, const T* next) {
  constexpr int NP = panels_for<RB>();
  if (static_cast<int64_t>(pack.size()) < p.n * RB) pack.resize(p.n * RB);
  float* Vp = pack.data();
  for (int i = 0; i < RB; ++i) {
    if constexpr (ROPE) {
      p.rope.load(row0 + i, Vp + i, RB);
      continue;
    }
    const T* src = p.V + (row0 + i) * p.ldv;
    for (int64_t k = 0; k < p.n; ++k) Vp[k * RB + i] = Io<T>::get(src[k]);
  }
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  int64_t q = 0;
  for (; q + NP <= panels; q += NP) block<RB, NP, ROPE, T>(p, Vp, row0, q, next);
  for (; q < panels; ++q) block<RB, 1, ROPE, T>(p, Vp, row0, q, next);
}

template <bool ROPE, typename T>
using RowsFn = void (*)(const Problem<T>&, int64_t, std::vector<float>&, const T*);

template <bool ROPE, typename T>
constexpr RowsFn<ROPE, T> kRows[kMaxRows + 1] = {
    nullptr,           rows<1, ROPE, T>,  rows<2, ROPE, T>,  rows<3, ROPE, T>,  rows<4, ROPE, T>,  rows<5, ROPE, T>,
    rows<6, ROPE, T>,  rows<7, ROPE, T>,  rows<8, ROPE, T>,  rows<9, ROPE, T>,  rows<10, ROPE, T>, rows<11, ROPE, T>,
    rows<12, ROPE, T>, rows<13, ROPE, T>, rows<14, ROPE, T>, rows<15, ROPE, T>, rows<16, ROPE, T>};

// Where torch's bf16 lives as bits.
template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mutable_data(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_dtypes(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const auto dtype = (*tensors.begin())->scalar_type();
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
                op, ": CPU tensors of one dtype, float32 or bfloat16");
}

// A call's groups (offsets [G+1] into its items, slots [G]), each item `per` rows, cut into units
// (group, first row within the group) of at most 16 rows and of equal size within a group: 24
// rows run as 12 + 12, not 16 + 8, whose 8-row blocks ran a 24-row group 30% slower.
struct Groups {
  const int64_t* off;
  const int64_t* slot;
  int64_t per;
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<int64_t> step;  // rows per unit of each group (its last unit may have fewer)
  int64_t rows = 0;

  Groups(const char* op, const at::Tensor& offsets, const at::Tensor& slots, int64_t items, int64_t num_slots,
         int64_t per_item)
      : per(per_item) {
    TORCH_CHECK(offsets.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && offsets.is_contiguous() &&
                    slots.is_contiguous() && offsets.numel() == slots.numel() + 1,
                op, ": offsets [G+1] and slots [G], int64");
    off = offsets.data_ptr<int64_t>();
    slot = slots.data_ptr<int64_t>();
    for (int64_t g = 0; g < slots.numel(); ++g) {
      TORCH_CHECK(0 <= off[g] && off[g] <= off[g + 1] && off[g + 1] <= items, op, ": offsets out of range");
      TORCH_CHECK(0 <= slot[g] && slot[g] < num_slots, op, ": slot out of range");
      const int64_t parts = std::max<int64_t>(1, (size(g) + kMaxRows - 1) / kMaxRows);
      step.push_back((size(g) + parts - 1) / parts);
      for (int64_t r = 0; r < size(g); r += step[g]) units.emplace_back(g, r);
      rows += size(g);
    }
  }

  int64_t size(int64_t g) const { return (off[g + 1] - off[g]) * per; }
};

// Every unit, on torch's thread pool: `problem(g)` is group g's problem. A call of a few
// microseconds of work (a small model's decode step) runs without a fork/join.
template <bool ROPE, typename T, typename MakeProblem>
void run(const Groups& groups, const at::Tensor& Mt, int64_t n, MakeProblem problem) {
  const T* m = data<T>(Mt);
  const int64_t lds = Mt.stride(0);
  const auto& units = groups.units;
  const int64_t count = static_cast<int64_t>(units.size());
  const int64_t grain = groups.rows * n * n < (int64_t{1} << 20) ? std::max<int64_t>(1, count) : 1;
  at::parallel_for(0, count, grain, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> pack;
    for (int64_t u = lo; u < hi; ++u) {
      const auto [g, r] = units[u];
      const Problem<T> p = problem(g, m + groups.slot[g] * lds);
      // The next unit of this thread reads another M only when it starts another group.
      const T* next = u + 1 < hi && units[u + 1].first != g ? m + groups.slot[units[u + 1].first] * lds : nullptr;
      kRows<ROPE, T>[std::min<int64_t>(groups.step[g], groups.size(g) - r)](p, r, pack, next);
    }
  });
}

void grouped_mm(const at::Tensor& V, const at::Tensor& offsets, const at::Tensor& slots, const at::Tensor& Mt,
                int64_t n, double alpha, at::Tensor& out) {
  check_dtypes("grouped_mm", {&V, &Mt, &out});
  TORCH_CHECK(V.dim() == 2 && out.dim() == 2 && Mt.dim() == 3, "grouped_mm: V [R, >=n], out [R, >=n], Mt [S, >=n, >=n]");
  TORCH_CHECK(V.stride(1) == 1 && out.stride(1) == 1 && Mt.stride(2) == 1, "grouped_mm: rows must be contiguous");
  TORCH_CHECK(n > 0 && V.size(1) >= n && out.size(1) >= n && Mt.size(1) >= n && Mt.size(2) >= n,
              "grouped_mm: n exceeds an operand");
  const Groups groups("grouped_mm", offsets, slots, std::min(V.size(0), out.size(0)), Mt.size(0), 1);
  const float a = static_cast<float>(alpha);
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const T* v = data<T>(V);
    T* o = mutable_data<T>(out);
    const int64_t ldv = V.stride(0), ldo = out.stride(0), ldm = Mt.stride(1);
    run<false, T>(groups, Mt, n, [&](int64_t g, const T* M) {
      return Problem<T>{v + groups.off[g] * ldv, ldv, M, ldm, n, o + groups.off[g] * ldo, ldo, a};
    });
  };
  V.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

void rope_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& slots,
                const at::Tensor& Mt, const at::Tensor& cos, const at::Tensor& ssin, int64_t k_lo, int64_t period,
                int64_t out_start, double alpha, at::Tensor& y) {
  check_dtypes("rope_apply", {&x, &Mt, &cos, &ssin, &y});
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && Mt.dim() == 3 && cos.dim() == 2 && cos.sizes() == ssin.sizes(),
              "rope_apply: x [T, in_f], y [T, width], Mt [S, >=n, >=n], cos and ssin [chunks, n]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && Mt.stride(2) == 1 && cos.is_contiguous() && ssin.is_contiguous(),
              "rope_apply: rows must be contiguous");
  const int64_t chunks = cos.size(0), n = cos.size(1), in_f = x.size(1);
  TORCH_CHECK(n > 0 && n % 2 == 0 && Mt.size(1) >= n && Mt.size(2) >= n, "rope_apply: n must be even and fit Mt");
  TORCH_CHECK(k_lo >= 0 && chunks > 0 && (k_lo + chunks) * n <= 2 * in_f && period >= (k_lo + chunks) * n,
              "rope_apply: chunks out of range");
  TORCH_CHECK(out_start >= 0, "rope_apply: out_start must be >= 0");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(), "rope_apply: tokens must be int64");
  const Groups groups("rope_apply", offsets, slots, tokens.numel(), Mt.size(0), chunks);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t rows_x = std::min(x.size(0), y.size(0));
  for (int64_t t = groups.off[0]; t < groups.off[slots.numel()]; ++t)
    TORCH_CHECK(0 <= tok[t] && tok[t] < rows_x, "rope_apply: token row out of range");
  const float a = static_cast<float>(alpha);
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const Rope<T> base{data<T>(x), x.stride(0), in_f, tok, data<T>(cos), data<T>(ssin),
                       n, chunks, k_lo, period, out_start, y.size(1), mutable_data<T>(y), y.stride(0)};
    const int64_t ldm = Mt.stride(1);
    run<true, T>(groups, Mt, n, [&](int64_t g, const T* M) {
      Problem<T> p{nullptr, 0, M, ldm, n, nullptr, 0, a, base};
      p.rope.tokens = tok + groups.off[g];
      return p;
    });
  };
  x.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

}  // namespace

TORCH_LIBRARY(mora_native, lib) {
  lib.def("grouped_mm(Tensor V, Tensor offsets, Tensor slots, Tensor Mt, int n, float alpha, Tensor(a!) out) -> ()");
  lib.def(
      "rope_apply(Tensor x, Tensor tokens, Tensor offsets, Tensor slots, Tensor Mt, Tensor cos, Tensor ssin, "
      "int k_lo, int period, int out_start, float alpha, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(mora_native, CPU, lib) {
  lib.impl("grouped_mm", &grouped_mm);
  lib.impl("rope_apply", &rope_apply);
}
