// mora_native::grouped_mm - one call multiplies every adapter's rows by that adapter's M.
//
// Semantics (see mora/kernels/native/__init__.py for the Python face):
//   for g in range(len(slots)):
//       a, b = offsets[g], offsets[g + 1]
//       out[a:b, :n] = alpha * (V[a:b, :n] @ Mt[slots[g], :n, :n])      # Mt[s] = M[s].T
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

struct Problem {
  const float* V;
  int64_t ldv;
  const float* Mt;  // this group's Mt[slot]
  int64_t ldm;      // its row stride
  int64_t n;
  float* out;
  int64_t ldo;
  float alpha;
};

// Accumulator blocks: RB rows x NP panels, as many of the 32 zmm registers as fit beside the
// NP panel loads and one broadcast.
template <int RB>
constexpr int panels_for() {
  return RB >= 9 ? 1 : RB >= 5 ? 2 : RB >= 3 ? 4 : 8;
}

template <int RB, int NP>
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
  for (int j = 0; j < NP; ++j) {
    if (!mask[j]) break;
    float* dst = p.out + row0 * p.ldo + (p0 + j) * kPanel;
    for (int i = 0; i < RB; ++i) {
      const __m512 v = p.alpha == 1.0f ? acc[i][j] : _mm512_mul_ps(acc[i][j], alpha);
      _mm512_mask_storeu_ps(dst + i * p.ldo, mask[j], v);
    }
  }
}

// Rows [row0, row0 + RB) of one group: pack them k-major, then every column panel.
template <int RB>
__attribute__((target("avx512f"))) void rows(const Problem& p, int64_t row0, std::vector<float>& pack, const float* next) {
  constexpr int NP = panels_for<RB>();
  if (static_cast<int64_t>(pack.size()) < p.n * RB) pack.resize(p.n * RB);
  float* Vp = pack.data();
  for (int i = 0; i < RB; ++i) {
    const float* src = p.V + (row0 + i) * p.ldv;
    for (int64_t k = 0; k < p.n; ++k) Vp[k * RB + i] = src[k];
  }
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  int64_t q = 0;
  for (; q + NP <= panels; q += NP) block<RB, NP>(p, Vp, row0, q, next);
  for (; q < panels; ++q) block<RB, 1>(p, Vp, row0, q, next);
}

using RowsFn = void (*)(const Problem&, int64_t, std::vector<float>&, const float*);
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr,  rows<1>,  rows<2>,  rows<3>,  rows<4>,  rows<5>,
                                        rows<6>,  rows<7>,  rows<8>,  rows<9>,  rows<10>, rows<11>,
                                        rows<12>, rows<13>, rows<14>, rows<15>, rows<16>};

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
      kRows[std::min<int64_t>(kMaxRows, off[g + 1] - r)](p, r, pack, next);
    }
  });
}

}  // namespace

TORCH_LIBRARY(mora_native, lib) {
  lib.def("grouped_mm(Tensor V, Tensor offsets, Tensor slots, Tensor Mt, int n, float alpha, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(mora_native, CPU, lib) { lib.impl("grouped_mm", &grouped_mm); }
