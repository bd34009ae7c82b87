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
// AVX-512F only; the Python side checks the CPU before loading this library.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kPanel = 16;  // output columns per zmm register
constexpr int kMaxRows = 16;
constexpr int PF = 16;  // rows of Mt prefetched ahead: a row stride of 1-2 KB defeats the hardware prefetcher

struct Rope;

struct Problem {
  const float* V;
  int64_t ldv;
  const float* Mt;  // this group's Mt[slot]
  int64_t ldm;      // its row stride
  int64_t n;
  float* out;
  int64_t ldo;
  float alpha;
  const Rope* rope = nullptr;  // set: rows are (token, chunk) pairs read from x and added into y
};

// Type 6 straight from x to y (rope_apply): row r of a group is chunk k_lo + r % chunks of the
// group's token r / chunks. Its V row is that chunk of the padded input, rotated; its product's
// column q is output column (c * n + q) of every period `period`, added into y's columns
// [out_start, out_start + width).
struct Rope {
  const float* x;
  int64_t ldx, in_f;
  const int64_t* tokens;  // y/x row of each of the group's tokens (already offset to the group)
  const float* cos;       // [chunks, n]: the rows of chunks k_lo..
  const float* ssin;      // [chunks, n]: cat(-sin[:, :n/2], sin[:, n/2:])
  int64_t n, chunks, k_lo, period, out_start, width;
  float* y;
  int64_t ldy;

  // The rotated chunk of row r: v[k] = u[k] * cos[k] + u[(k + n/2) % n] * ssin[k] (u = the chunk).
  __attribute__((target("avx512f"))) void load(int64_t r, float* v, int64_t stride) const {
    const int64_t c = r % chunks, half = n / 2;
    const float* xr = x + tokens[r / chunks] * ldx;
    const float* cr = cos + c * n;
    const float* sr = ssin + c * n;
    const int64_t base = (k_lo + c) * n;
    const float* u = xr + base;
    thread_local std::vector<float> wrapped;
    if (base + n > in_f) {  // the last chunk reads the padding: the input's first features again
      wrapped.resize(n);
      for (int64_t k = 0; k < n; ++k) wrapped[k] = xr[base + k < in_f ? base + k : base + k - in_f];
      u = wrapped.data();
    }
    thread_local std::vector<float> row;
    row.resize(n);
    float* o = row.data();
    for (int64_t k = 0; k < half; ++k) o[k] = u[k] * cr[k] + u[k + half] * sr[k];  // contiguous: vectorized
    for (int64_t k = half; k < n; ++k) o[k] = u[k] * cr[k] + u[k - half] * sr[k];
    for (int64_t k = 0; k < n; ++k) v[k * stride] = o[k];
  }

  // y[token, j] += v[lane] for every output column j of chunk column q0 + lane.
  __attribute__((target("avx512f"))) void add(int64_t r, int64_t q0, __mmask16 valid, __m512 v) const {
    float* yr = y + tokens[r / chunks] * ldy;
    const int64_t d = (k_lo + r % chunks) * n + q0 - out_start;  // column of lane 0 in period 0
    const int64_t first = -floor_div(d + kPanel - 1, period);   // the first period reaching column 0
    for (int64_t m = first;; ++m) {
      const int64_t j = d + m * period;
      if (j >= width) break;
      __mmask16 in = valid;
      if (j < 0) in &= static_cast<__mmask16>(0xFFFF << (-j));
      if (j + kPanel > width) in &= static_cast<__mmask16>((1u << (width - j)) - 1);
      float* dst = yr + j;
      _mm512_mask_storeu_ps(dst, in, _mm512_add_ps(_mm512_maskz_loadu_ps(in, dst), v));
    }
  }

  static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
};

// Accumulator blocks: RB rows x NP panels, as many of the 32 zmm registers as fit beside the
// NP panel loads and one broadcast.
template <int RB>
constexpr int panels_for() {
  return RB >= 9 ? 1 : RB >= 5 ? 2 : RB >= 3 ? 4 : 8;
}

template <int RB, int NP, bool ROPE>
__attribute__((target("avx512f"))) void block(const Problem& p, const float* Vp, int64_t row0, int64_t p0, const float* next) {
  __m512 acc[RB][NP];
  __mmask16 mask[NP];
  for (int j = 0; j < NP; ++j) {
    const int64_t left = p.n - (p0 + j) * kPanel;  // columns of this panel inside [0, n)
    mask[j] = left >= kPanel ? static_cast<__mmask16>(0xFFFF)
                             : static_cast<__mmask16>(left > 0 ? (1u << left) - 1 : 0);
    for (int i = 0; i < RB; ++i) acc[i][j] = _mm512_setzero_ps();
  }
  const float* base = p.Mt + p0 * kPanel;
  for (int64_t k = 0; k < p.n; ++k) {
    __m512 b[NP];
    const float* row = base + k * p.ldm;
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(row + PF * p.ldm + j * kPanel), _MM_HINT_T0);
      // The same line of the next unit's Mt, into L2: a unit makes one step per line of Mt,
      // so the next adapter's M arrives from memory while this one is multiplied.
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + (p0 + j) * kPanel + k * p.ldm), _MM_HINT_T1);
      b[j] = _mm512_maskz_loadu_ps(mask[j], row + j * kPanel);  // masked: never reads past n
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
        _mm512_store_ps(tile[i][j], p.alpha == 1.0f ? acc[i][j] : _mm512_mul_ps(acc[i][j], alpha));
    for (int j = 0; j < NP && mask[j]; ++j)
      for (int i = 0; i < RB; ++i) p.rope->add(row0 + i, (p0 + j) * kPanel, mask[j], _mm512_load_ps(tile[i][j]));
    return;
  }
  for (int j = 0; j < NP; ++j) {
    if (!mask[j]) break;
    for (int i = 0; i < RB; ++i) {
      const __m512 v = p.alpha == 1.0f ? acc[i][j] : _mm512_mul_ps(acc[i][j], alpha);
      _mm512_mask_storeu_ps(p.out + (row0 + i) * p.ldo + (p0 + j) * kPanel, mask[j], v);
    }
  }
}

// Rows [row0, row0 + RB) of one group: pack them k-major, then every column panel.
template <int RB, bool ROPE>
__attribute__((target("avx512f"))) void rows(const Problem& p, int64_t row0, std::vector<float>& pack, const float* next) {
  constexpr int NP = panels_for<RB>();
  if (static_cast<int64_t>(pack.size()) < p.n * RB) pack.resize(p.n * RB);
  float* Vp = pack.data();
  for (int i = 0; i < RB; ++i) {
    if constexpr (ROPE) {
      p.rope->load(row0 + i, Vp + i, RB);
      continue;
    }
    const float* src = p.V + (row0 + i) * p.ldv;
    for (int64_t k = 0; k < p.n; ++k) Vp[k * RB + i] = src[k];
  }
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  int64_t q = 0;
  for (; q + NP <= panels; q += NP) block<RB, NP, ROPE>(p, Vp, row0, q, next);
  for (; q < panels; ++q) block<RB, 1, ROPE>(p, Vp, row0, q, next);
}

using RowsFn = void (*)(const Problem&, int64_t, std::vector<float>&, const float*);
template <bool ROPE>
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr,
                                        rows<1, ROPE>,  rows<2, ROPE>,  rows<3, ROPE>,  rows<4, ROPE>,
                                        rows<5, ROPE>,  rows<6, ROPE>,  rows<7, ROPE>,  rows<8, ROPE>,
                                        rows<9, ROPE>,  rows<10, ROPE>, rows<11, ROPE>, rows<12, ROPE>,
                                        rows<13, ROPE>, rows<14, ROPE>, rows<15, ROPE>, rows<16, ROPE>};

void grouped_mm(const at::Tensor& V, const at::Tensor& offsets, const at::Tensor& slots, const at::Tensor& Mt,
                int64_t n, double alpha, at::Tensor& out) {
  TORCH_CHECK(V.device().is_cpu() && out.device().is_cpu() && Mt.device().is_cpu(), "grouped_mm: CPU tensors only");
  TORCH_CHECK(V.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && Mt.scalar_type() == at::kFloat,
              "grouped_mm: float32 only");
  TORCH_CHECK(V.dim() == 2 && out.dim() == 2 && Mt.dim() == 3, "grouped_mm: V [R, >=n], out [R, >=n], Mt [S, >=n, >=n]");
  TORCH_CHECK(V.stride(1) == 1 && out.stride(1) == 1 && Mt.stride(2) == 1, "grouped_mm: rows must be contiguous");
  TORCH_CHECK(n > 0 && V.size(1) >= n && out.size(1) >= n && Mt.size(1) >= n && Mt.size(2) >= n,
              "grouped_mm: n exceeds an operand");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  slots.is_contiguous() && offsets.numel() == slots.numel() + 1,
              "grouped_mm: offsets [G+1] and slots [G], int64");
  const int64_t groups = slots.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  // Units of work: (group, first row) of each block of at most 16 rows.
  std::vector<std::pair<int64_t, int64_t>> units;
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(0 <= off[g] && off[g] <= off[g + 1] && off[g + 1] <= std::min(V.size(0), out.size(0)),
                "grouped_mm: offsets out of range");
    TORCH_CHECK(0 <= slot[g] && slot[g] < Mt.size(0), "grouped_mm: slot out of range");
    for (int64_t r = off[g]; r < off[g + 1]; r += kMaxRows) units.emplace_back(g, r);
  }
  const float* v = V.data_ptr<float>();
  const float* m = Mt.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldv = V.stride(0), ldo = out.stride(0), lds = Mt.stride(0), ldm = Mt.stride(1);
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> pack;
    for (int64_t u = lo; u < hi; ++u) {
      const auto [g, r] = units[u];
      const Problem p{v, ldv, m + slot[g] * lds, ldm, n, o, ldo, a};
      // The next unit of this thread reads another M only when it starts another group.
      const float* next = u + 1 < hi && units[u + 1].first != g ? m + slot[units[u + 1].first] * lds : nullptr;
      kRows<false>[std::min<int64_t>(kMaxRows, off[g + 1] - r)](p, r, pack, next);
    }
  });
}

void rope_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& slots,
                const at::Tensor& Mt, const at::Tensor& cos, const at::Tensor& ssin, int64_t k_lo, int64_t period,
                int64_t out_start, double alpha, at::Tensor& y) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &Mt, &cos, &ssin, &y})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "rope_apply: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && Mt.dim() == 3 && cos.dim() == 2 && cos.sizes() == ssin.sizes(),
              "rope_apply: x [T, in_f], y [T, width], Mt [S, >=n, >=n], cos and ssin [chunks, n]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && Mt.stride(2) == 1 && cos.is_contiguous() && ssin.is_contiguous(),
              "rope_apply: rows must be contiguous");
  const int64_t chunks = cos.size(0), n = cos.size(1), in_f = x.size(1);
  TORCH_CHECK(n > 0 && n % 2 == 0 && Mt.size(1) >= n && Mt.size(2) >= n, "rope_apply: n must be even and fit Mt");
  TORCH_CHECK(k_lo >= 0 && chunks > 0 && (k_lo + chunks) * n <= 2 * in_f && period >= (k_lo + chunks) * n,
              "rope_apply: chunks out of range");
  TORCH_CHECK(out_start >= 0, "rope_apply: out_start must be >= 0");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  tokens.is_contiguous() && offsets.is_contiguous() && slots.is_contiguous() &&
                  offsets.numel() == slots.numel() + 1,
              "rope_apply: tokens, offsets [G+1] and slots [G], int64");
  const int64_t groups = slots.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t rows_x = std::min(x.size(0), y.size(0));
  std::vector<std::pair<int64_t, int64_t>> units;  // (group, first row of the group's chunk rows)
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(0 <= off[g] && off[g] <= off[g + 1] && off[g + 1] <= tokens.numel(), "rope_apply: offsets out of range");
    TORCH_CHECK(0 <= slot[g] && slot[g] < Mt.size(0), "rope_apply: slot out of range");
    for (int64_t t = off[g]; t < off[g + 1]; ++t)
      TORCH_CHECK(0 <= tok[t] && tok[t] < rows_x, "rope_apply: token row out of range");
    for (int64_t r = 0; r < (off[g + 1] - off[g]) * chunks; r += kMaxRows) units.emplace_back(g, r);
  }
  const Rope base{x.data_ptr<float>(), x.stride(0), in_f, tok, cos.data_ptr<float>(), ssin.data_ptr<float>(),
                  n, chunks, k_lo, period, out_start, y.size(1), y.data_ptr<float>(), y.stride(0)};
  const float* m = Mt.data_ptr<float>();
  const int64_t lds = Mt.stride(0), ldm = Mt.stride(1);
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> pack;
    for (int64_t u = lo; u < hi; ++u) {
      const auto [g, r] = units[u];
      Rope rope = base;
      rope.tokens = tok + off[g];
      Problem p{nullptr, 0, m + slot[g] * lds, ldm, n, nullptr, 0, a, &rope};
      const float* next = u + 1 < hi && units[u + 1].first != g ? m + slot[units[u + 1].first] * lds : nullptr;
      kRows<true>[std::min<int64_t>(kMaxRows, (off[g + 1] - off[g]) * chunks - r)](p, r, pack, next);
    }
  });
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
