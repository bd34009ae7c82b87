// mora_native::grouped_mm - one call multiplies every adapter's rows by that adapter's M;
// mora_native::rope_apply - the same product for type-6 adapters, from x straight into y (the
// rotation done while packing the rows, the periodic expansion as a unit's products are added);
// mora_native::share_apply - the same for type-1 adapters (the chunks summed while packing, the
// output tiled as they are added);
// mora_native::rope_rows, share_rows, rope_add, share_add - those two ops' rows and additions
// alone, around products that torch's GEMM computes (bfloat16 prefill on AMX CPUs).
// Their semantics are stated in mora/kernels/native/__init__.py.
//
// Why not BLAS: an adapter's rows are few (a decode token's 12-16 rotated chunks, 1-4 compressed
// rows), so each sgemm call packs a whole M for a handful of rows and runs at a third to a half
// of the rate it reaches on one large product. This kernel reads Mt straight from the slot table
// (16-column panels of consecutive addresses, the layout the GPU tile reads too) without packing
// it, keeps up to 16 rows x 1-8 panels of accumulators in registers, and packs only the handful
// of V rows (contiguous broadcasts). Each output is summed over k in order, one FMA per term:
// the result of a row never depends on the other rows of the batch.
//
// float32 and bfloat16 (bf16 operands are widened to float32, products and sums are float32 and
// rounded to bf16 where torch's own ops would round them).
//
// One library for every x86-64 CPU: the kernel (kernel.h) is compiled once per ISA path, each
// file under its own target pragma (no -m flags: all else is baseline x86-64), and the path is
// chosen at run time from the CPU (set_isa; by default the best it has):
//   avx512_bf16 - avx512, with bfloat16 products on vdpbf16ps and rotations rounded by
//              vcvtneps2bf16 (AVX512_BF16, AVX512DQ; kernel_dp.h); `auto`
//              takes it on AMD CPUs only (see there);
//   avx512   - AVX-512F/BW/VL, a panel per zmm register (isa_avx512.cpp);
//   avx2     - AVX2 + FMA, a panel per two ymm, blocks of up to 6 rows (isa_avx2.cpp);
//   portable - plain C++ with std::fma (isa_portable.cpp).
// Every path sums the same terms in the same order with one rounding each (FMA contraction is
// off, -ffp-contract=off, so no path fuses what another rounds twice): results are bit-identical
// across paths, avx512_bf16's dot products included (kernel_dp.h says why).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common.h"

namespace mora_native {

namespace {

// The CPU features the paths need, and (cpu_has) those torch's bf16 GEMM runs on. Whether this
// CPU has them: __builtin_cpu_supports also checks that the OS saves the registers (XCR0).
const std::vector<std::pair<std::string, bool>>& features() {
  static const std::vector<std::pair<std::string, bool>> all = [] {
    __builtin_cpu_init();
    return std::vector<std::pair<std::string, bool>>{
        {"AVX2", __builtin_cpu_supports("avx2")},         {"FMA", __builtin_cpu_supports("fma")},
        {"AVX512F", __builtin_cpu_supports("avx512f")},   {"AVX512BW", __builtin_cpu_supports("avx512bw")},
        {"AVX512VL", __builtin_cpu_supports("avx512vl")}, {"AVX512DQ", __builtin_cpu_supports("avx512dq")},
        {"AVX512_BF16", __builtin_cpu_supports("avx512bf16")},
        {"AMX_BF16", __builtin_cpu_supports("amx-bf16")}};
  }();
  return all;
}

bool cpu_has(const std::string& feature) {
  for (const auto& [name, has] : features())
    if (name == feature) return has;
  TORCH_CHECK(false, "unknown CPU feature '", feature, "'");
}

// An ISA path: its kernels, the CPU features it needs, and whether `auto` takes it where they are.
struct Path {
  const char* name;
  const Unit<float>* (*units_float)();
  const Unit<bf16>* (*units_bf16)();
  const RowOps<float>* (*rows_float)();
  const RowOps<bf16>* (*rows_bf16)();
  std::vector<const char*> needs;
  bool (*pays)();
};

bool always() { return true; }

// The CPU's vendor, where the kernels' tuning differs by it (measured on Zen 4 and on Intel's Xeons).
bool cpu_is_amd() {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
}

// vdpbf16ps sums two terms per instruction: on AMD (Zen 4) it issues once per cycle as an FMA
// does, twice the widened kernel's terms; on Intel's Sapphire/Emerald Rapids every second cycle,
// the widened kernel's rate at best (kernel_dp.h).
bool dot_products_pay() { return cpu_is_amd(); }

// Whether a thread streams its next group's M into L2 (common.h's Stream): on Intel (the Xeon with
// AMX) it took float32 vs_roofline 1.59-1.61 -> 1.49-1.51; on AMD Zen 4 (1 MB of L2, where the
// current M's panels come by their own prefetches) it made decode with several adapters slower in
// both dtypes (gate_proj T=16 A=16: bf16 360 -> 430 us, float32 477 -> 532 us; rope_apply of
// both builds alternately in one process; docs/benchmarks.md).
const bool kStreamNextM = !cpu_is_amd();

// Best first.
const std::vector<Path> kPaths = {
    {"avx512_bf16", isa_avx512::units_float, isa_avx512::units_bf16_dot, isa_avx512::rows_float,
     isa_avx512::rows_bf16,
     {"AVX2", "FMA", "AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "AVX512_BF16"}, dot_products_pay},
    {"avx512", isa_avx512::units_float, isa_avx512::units_bf16, isa_avx512::rows_float, isa_avx512::rows_bf16,
     {"AVX2", "FMA", "AVX512F", "AVX512BW", "AVX512VL"},
     always},
    {"avx2", isa_avx2::units_float, isa_avx2::units_bf16, isa_avx2::rows_float, isa_avx2::rows_bf16, {"AVX2", "FMA"}, always},
    {"portable", isa_portable::units_float, isa_portable::units_bf16, isa_portable::rows_float,
     isa_portable::rows_bf16, {}, always}};

// The features path `name` needs that this CPU lacks, space-separated ("" where it runs).
std::string missing_for(const Path& path) {
  std::string missing;
  for (const char* feature : path.needs)
    if (!cpu_has(feature)) missing += (missing.empty() ? "" : " ") + std::string(feature);
  return missing;
}

const Path& path_named(const std::string& name) {
  for (const Path& path : kPaths)
    if (name == path.name || (name == "auto" && missing_for(path).empty() && path.pays())) return path;
  TORCH_CHECK(false, "unknown ISA path '", name, "': expected auto, avx512_bf16, avx512, avx2 or portable");
}

std::string isa_missing(const std::string& name) { return missing_for(path_named(name)); }

std::atomic<const Path*> active{&path_named("auto")};

// Runs every later call on path `name` (auto: the best this CPU runs); the path's name.
std::string set_isa(const std::string& name) {
  const Path& path = path_named(name);
  const std::string missing = missing_for(path);
  TORCH_CHECK(missing.empty(), "ISA path ", name, " needs ", missing);
  active = &path;
  return path.name;
}

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

// The byte ranges rows [r0, r1) of `p` read, and for a direct op the rows of y they add into:
// each token's chunks of x (or the padded input's, wrapping) and its row of y; V's rows.
template <typename T>
void source_spans(const Problem<T>& p, int64_t r0, int64_t r1, std::vector<Span>& out) {
  auto add = [&out](const T* at, int64_t lo, int64_t hi) {
    if (lo < hi) out.emplace_back(reinterpret_cast<const char*>(at + lo), reinterpret_cast<const char*>(at + hi));
  };
  const Rope<T>& rope = p.rope;
  if (!rope.y) {
    for (int64_t r = r0; r < r1; ++r) add(p.V + r * p.ldv, 0, p.n);
    return;
  }
  const int64_t lo = rope.sum_chunks ? 0 : rope.k_lo * p.n;
  const int64_t hi = rope.sum_chunks ? rope.sum_chunks * p.n : (rope.k_lo + rope.chunks) * p.n;
  for (int64_t t = r0 / rope.chunks; t * rope.chunks < r1; ++t) {
    const T* x = rope.x + rope.tokens[t] * rope.ldx;
    add(x, std::min(lo, rope.in_f), std::min(hi, rope.in_f));
    add(x, 0, std::min(hi - rope.in_f, lo));  // the padding: the first features again
    add(rope.y + rope.tokens[t] * rope.ldy, 0, rope.width);
  }
}

// Every unit, on torch's thread pool, on the path active when the call starts: `problem(g)` is
// group g's problem. A thread's consecutive units of one group run as runs of up to kRun units,
// panel-interleaved (common.h), while its next group's M, and its next run's sources and y
// lines, stream into L2 (Stream, common.h). A call of a few microseconds of work (a small
// model's decode step) runs without a fork/join.
template <typename T, typename MakeProblem>
void run(const Groups& groups, const at::Tensor& Mt, int64_t n, MakeProblem problem) {
  const Path* path = active.load();
  const Unit<T>* kernel;
  if constexpr (std::is_same_v<T, float>) kernel = path->units_float();
  else kernel = path->units_bf16();
  const T* m = data<T>(Mt);
  const int64_t lds = Mt.stride(0), ldm = Mt.stride(1), panels = (n + kPanel - 1) / kPanel;
  const auto& units = groups.units;
  const int64_t count = static_cast<int64_t>(units.size());
  const int64_t grain = groups.rows * n * n < (int64_t{1} << 20) ? std::max<int64_t>(1, count) : 1;
  at::parallel_for(0, count, grain, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> pack;
    if (static_cast<int64_t>(pack.size()) < pack_floats(n) + tile_floats(n)) pack.resize(pack_floats(n) + tile_floats(n));
    float* scratch = pack.data() + kRun * unit_floats(n);
    thread_local std::vector<Span> spans;
    Stream next_m, next_rows;
    // the end of a run starting at v (its group's units, at most kRun)
    auto run_end = [&](int64_t v) {
      int64_t e = v + 1;
      while (e < hi && e - v < kRun && units[e].first == units[v].first) ++e;
      return e;
    };
    for (int64_t u = lo; u < hi;) {
      const int64_t g = units[u].first, end = run_end(u);
      auto rows = [&](int64_t v) { return std::min<int64_t>(groups.step[units[v].first], groups.size(units[v].first) - units[v].second); };
      if (u == lo || units[u - 1].first != g) {  // a group starts: stream the M of this thread's next one
        int64_t after = u, work = 0;
        for (; after < hi && units[after].first == g; ++after) work += rows(after) * panels * n;
        next_m = kStreamNextM && after < hi
                     ? Stream(m + groups.slot[units[after].first] * lds, n, n * static_cast<int64_t>(sizeof(T)),
                              ldm * static_cast<int64_t>(sizeof(T)), work)
                     : Stream();
      }
      Problem<T> p = problem(g, m + groups.slot[g] * lds);
      p.tile = pack.data() + pack_floats(n), p.tile_row0 = units[u].second, p.ldt = tile_stride(n);
      p.next_m = &next_m;
      p.y_requested = u != lo;  // by the run before's next_rows
      spans.clear();
      if (end < hi) {  // the next run's sources and y lines, over this run's products
        const int64_t gn = units[end].first, last = run_end(end) - 1;
        source_spans(problem(gn, m + groups.slot[gn] * lds), units[end].second, units[last].second + rows(last), spans);
        int64_t work = 0;
        for (int64_t v = u; v < end; ++v) work += rows(v) * panels * n;
        next_rows = Stream(spans.data(), static_cast<int64_t>(spans.size()), work);
        p.next_rows = &next_rows;
      }
      for (int64_t v = u; v < end; ++v)
        kernel[rows(v)].pack(p, units[v].second, pack.data() + (v - u) * unit_floats(n), scratch);
      // One unit: all panels at once. Several: a chunk of its blocks' panels at a time.
      const int64_t chunk = end - u == 1 ? panels : kernel[rows(u)].np;
      for (int64_t q = 0; q < panels; q += chunk)
        for (int64_t v = u; v < end; ++v)
          kernel[rows(v)].panels(p, pack.data() + (v - u) * unit_floats(n), units[v].second, q,
                                 std::min(q + chunk, panels));
      u = end;
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
    run<T>(groups, Mt, n, [&](int64_t g, const T* M) {
      return Problem<T>{v + groups.off[g] * ldv, ldv, M, ldm, n, o + groups.off[g] * ldo, ldo, a};
    });
  };
  V.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

// A direct op's call: the groups of `tokens`, each token `per` rows, from x into y on `base`.
template <typename T>
void run_direct(const char* op, const Rope<T>& base, const at::Tensor& x, const at::Tensor& tokens,
                const at::Tensor& offsets, const at::Tensor& slots, const at::Tensor& Mt, double alpha,
                const at::Tensor& y) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(), op, ": tokens must be int64");
  const Groups groups(op, offsets, slots, tokens.numel(), Mt.size(0), base.chunks);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t rows_x = std::min(x.size(0), y.size(0));
  for (int64_t t = groups.off[0]; t < groups.off[slots.numel()]; ++t)
    TORCH_CHECK(0 <= tok[t] && tok[t] < rows_x, op, ": token row out of range");
  const float a = static_cast<float>(alpha);
  const int64_t ldm = Mt.stride(1);
  run<T>(groups, Mt, base.n, [&](int64_t g, const T* M) {
    Problem<T> p{nullptr, 0, M, ldm, base.n, nullptr, 0, a, base};
    p.rope.tokens = tok + groups.off[g];
    return p;
  });
}

void check_direct(const char* op, const at::Tensor& x, const at::Tensor& Mt, const at::Tensor& y, int64_t n,
                  int64_t out_start) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && Mt.dim() == 3, op, ": x [T, in_f], y [T, width], Mt [S, >=n, >=n]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && Mt.stride(2) == 1, op, ": rows must be contiguous");
  TORCH_CHECK(n > 0 && Mt.size(1) >= n && Mt.size(2) >= n, op, ": n must fit Mt");
  TORCH_CHECK(out_start >= 0, op, ": out_start must be >= 0");
}

void rope_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& slots,
                const at::Tensor& Mt, const at::Tensor& cos, const at::Tensor& ssin, int64_t k_lo, int64_t period,
                int64_t out_start, double alpha, at::Tensor& y) {
  check_dtypes("rope_apply", {&x, &Mt, &cos, &ssin, &y});
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == ssin.sizes() && cos.is_contiguous() && ssin.is_contiguous(),
              "rope_apply: cos and ssin [chunks, n], contiguous");
  const int64_t chunks = cos.size(0), n = cos.size(1), in_f = x.size(1);
  check_direct("rope_apply", x, Mt, y, n, out_start);
  TORCH_CHECK(n % 2 == 0, "rope_apply: n must be even");
  TORCH_CHECK(k_lo >= 0 && chunks > 0 && (k_lo + chunks) * n <= 2 * in_f && period >= (k_lo + chunks) * n,
              "rope_apply: chunks out of range");
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const Rope<T> base{data<T>(x), x.stride(0), in_f, nullptr, data<T>(cos), data<T>(ssin),
                       n, chunks, k_lo, period, out_start, y.size(1), mutable_data<T>(y), y.stride(0)};
    run_direct<T>("rope_apply", base, x, tokens, offsets, slots, Mt, alpha, y);
  };
  x.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

void share_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& slots,
                 const at::Tensor& Mt, int64_t n, int64_t chunks, int64_t out_start, double alpha, at::Tensor& y) {
  check_dtypes("share_apply", {&x, &Mt, &y});
  check_direct("share_apply", x, Mt, y, n, out_start);
  const int64_t in_f = x.size(1);
  TORCH_CHECK(chunks > 0 && in_f <= chunks * n && chunks * n < in_f + n && chunks * n <= 2 * in_f,
              "share_apply: chunks must be ceil(in_f / n), the chunks of the padded input");
  auto go = [&](auto zero) {
    using T = decltype(zero);
    Rope<T> base{data<T>(x), x.stride(0), in_f, nullptr, nullptr, nullptr,
                 n, 1, 0, n, out_start, y.size(1), mutable_data<T>(y), y.stride(0)};
    base.sum_chunks = chunks;
    run_direct<T>("share_apply", base, x, tokens, offsets, slots, Mt, alpha, y);
  };
  x.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

// --- A direct op's rows and additions alone (rope_rows, share_rows, rope_add, share_add) ---
// The V rows rope_apply and share_apply pack, stored as T, and the additions of products into y
// they make: the torch backend runs them around torch's own batched GEMM where that GEMM beats
// the kernel's products (bfloat16 prefill on AMX). Row r is token tokens[r / chunks]'s chunk
// k_lo + r % chunks (share: one row per token).

template <typename T>
const RowOps<T>* row_ops() {
  const Path* path = active.load();
  if constexpr (std::is_same_v<T, float>) return path->rows_float();
  else return path->rows_bf16();
}

// body(r, buf) for rows [0, rows) on torch's thread pool; `buf` is 3n floats and a panel.
template <typename Body>
void each_row(int64_t rows, int64_t n, Body body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < 3 * n + kPanel) buf.resize(3 * n + kPanel);
    for (int64_t r = lo; r < hi; ++r) body(r, buf.data());
  });
}

// `rows` ([N * per, >= n], rows contiguous) of `tokens` (int64 [N], each below `limit`).
const int64_t* checked_rows(const char* op, const at::Tensor& rows, const at::Tensor& tokens, int64_t per, int64_t n,
                            int64_t limit) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous(), op,
              ": tokens must be int64 [N]");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == tokens.numel() * per && rows.size(1) >= n && rows.stride(1) == 1, op,
              ": rows must be [N * chunks, >= n] with contiguous rows");
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens.numel(); ++t) TORCH_CHECK(0 <= tok[t] && tok[t] < limit, op, ": token row out of range");
  return tok;
}

void rope_rows(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& cos, const at::Tensor& ssin,
               int64_t k_lo, at::Tensor& V) {
  check_dtypes("rope_rows", {&x, &cos, &ssin, &V});
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rope_rows: x [T, in_f], rows contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == ssin.sizes() && cos.is_contiguous() && ssin.is_contiguous(),
              "rope_rows: cos and ssin [chunks, n], contiguous");
  const int64_t chunks = cos.size(0), n = cos.size(1), in_f = x.size(1);
  TORCH_CHECK(n > 0 && n % 2 == 0, "rope_rows: n must be even");
  TORCH_CHECK(k_lo >= 0 && chunks > 0 && (k_lo + chunks) * n <= 2 * in_f, "rope_rows: chunks out of range");
  const int64_t* tok = checked_rows("rope_rows", V, tokens, chunks, n, x.size(0));
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const Rope<T> base{data<T>(x), x.stride(0), in_f, tok, data<T>(cos), data<T>(ssin), n, chunks, k_lo};
    T* v = mutable_data<T>(V);
    const RowOps<T>* ops = row_ops<T>();
    each_row(V.size(0), n, [&](int64_t r, float* buf) { ops->v_row(base, r, v + r * V.stride(0), buf); });
  };
  x.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

void share_rows(const at::Tensor& x, const at::Tensor& tokens, int64_t n, int64_t chunks, at::Tensor& V) {
  check_dtypes("share_rows", {&x, &V});
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "share_rows: x [T, in_f], rows contiguous");
  const int64_t in_f = x.size(1);
  TORCH_CHECK(n > 0 && chunks > 0 && in_f <= chunks * n && chunks * n < in_f + n && chunks * n <= 2 * in_f,
              "share_rows: chunks must be ceil(in_f / n), the chunks of the padded input");
  const int64_t* tok = checked_rows("share_rows", V, tokens, 1, n, x.size(0));
  auto go = [&](auto zero) {
    using T = decltype(zero);
    Rope<T> base{data<T>(x), x.stride(0), in_f, tok, nullptr, nullptr, n, 1, 0};
    base.sum_chunks = chunks;
    T* v = mutable_data<T>(V);
    const RowOps<T>* ops = row_ops<T>();
    each_row(V.size(0), n, [&](int64_t r, float* buf) { ops->v_row(base, r, v + r * V.stride(0), buf); });
  };
  x.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

// Rows of products P added into y as rope_apply adds them (its `period`, `out_start`: the tiles).
void add_products(const char* op, const at::Tensor& P, const at::Tensor& tokens, int64_t n, int64_t chunks,
                  int64_t k_lo, int64_t period, int64_t out_start, at::Tensor& y) {
  check_dtypes(op, {&P, &y});
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1, op, ": y [T, width], rows contiguous");
  TORCH_CHECK(n > 0 && k_lo >= 0 && chunks > 0 && period >= (k_lo + chunks) * n && out_start >= 0, op,
              ": chunks, period or out_start out of range");
  const int64_t* tok = checked_rows(op, P, tokens, chunks, n, y.size(0));
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const Rope<T> base{nullptr, 0, 0, tok, nullptr, nullptr, n, chunks, k_lo, period, out_start, y.size(1),
                       mutable_data<T>(y), y.stride(0)};
    const T* o = data<T>(P);
    const RowOps<T>* ops = row_ops<T>();
    // a token's rows add into disjoint columns of its row of y: rows may run on any thread
    each_row(P.size(0), n, [&](int64_t r, float* buf) { ops->add_row(base, r, o + r * P.stride(0), buf); });
  };
  P.scalar_type() == at::kFloat ? go(float{}) : go(bf16{});
}

void rope_add(const at::Tensor& P, const at::Tensor& tokens, int64_t n, int64_t k_lo, int64_t chunks, int64_t period,
              int64_t out_start, at::Tensor& y) {
  add_products("rope_add", P, tokens, n, chunks, k_lo, period, out_start, y);
}

void share_add(const at::Tensor& P, const at::Tensor& tokens, int64_t n, int64_t out_start, at::Tensor& y) {
  add_products("share_add", P, tokens, n, 1, 0, n, out_start, y);
}

// The schedule tests read (tests/test_native_stream.py): the lines `stream` requests, as byte
// offsets from `kOrigin` (an address never dereferenced), while `done` products are paced in
// steps of `step`.
const char* const kOrigin = reinterpret_cast<const char*>(uintptr_t{1} << 44);

at::Tensor requested(Stream stream, int64_t done, int64_t step) {
  std::vector<int64_t> lines;
  for (int64_t d = 0; d < done; d += step)
    stream.take(static_cast<uint64_t>(std::min(step, done - d)), [&](const char* at) { lines.push_back(at - kOrigin); });
  at::Tensor out = at::empty({static_cast<int64_t>(lines.size())}, at::kLong);
  std::copy(lines.begin(), lines.end(), out.data_ptr<int64_t>());
  return out;
}

// A next M's stream: `rows` rows of `len` bytes, `ld` bytes apart, the first `offset` bytes
// into a line, paced for `work` products.
at::Tensor stream_lines(int64_t rows, int64_t len, int64_t ld, int64_t offset, int64_t work, int64_t done,
                        int64_t step) {
  TORCH_CHECK(rows > 0 && len > 0 && ld >= len && 0 <= offset && offset < 64 && work > 0 && step > 0 && done >= 0,
              "stream_lines: rows, len, work, step > 0, ld >= len, 0 <= offset < 64, done >= 0");
  TORCH_CHECK(rows * ld <= (int64_t{1} << 40) && done / step <= (int64_t{1} << 24), "stream_lines: too large");
  return requested(Stream(kOrigin + offset, rows, len, ld, work), done, step);
}

// A next run's stream: `spans` [S, 2] int64, byte offsets [first, last), none empty, paced for
// `work` products.
at::Tensor stream_span_lines(const at::Tensor& spans, int64_t work, int64_t done, int64_t step) {
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 2 && spans.is_contiguous(),
              "stream_span_lines: spans [S, 2], int64");
  TORCH_CHECK(work > 0 && step > 0 && done >= 0 && done / step <= (int64_t{1} << 24),
              "stream_span_lines: work, step > 0, done >= 0");
  const int64_t* at = spans.data_ptr<int64_t>();
  std::vector<Span> list;
  for (int64_t i = 0; i < spans.size(0); ++i) {
    TORCH_CHECK(0 <= at[2 * i] && at[2 * i] < at[2 * i + 1] && at[2 * i + 1] <= (int64_t{1} << 40),
                "stream_span_lines: spans must be nonempty ranges of offsets");
    list.emplace_back(kOrigin + at[2 * i], kOrigin + at[2 * i + 1]);
  }
  return requested(Stream(list.data(), static_cast<int64_t>(list.size()), work), done, step);
}

}  // namespace
}  // namespace mora_native

using namespace mora_native;  // the registrations below name the ops

TORCH_LIBRARY(mora_native, lib) {
  lib.def("cpu_has(str feature) -> bool", &cpu_has);
  lib.def("isa_missing(str isa) -> str", &isa_missing);
  lib.def("set_isa(str isa) -> str", &set_isa);
  lib.def("grouped_mm(Tensor V, Tensor offsets, Tensor slots, Tensor Mt, int n, float alpha, Tensor(a!) out) -> ()");
  lib.def(
      "rope_apply(Tensor x, Tensor tokens, Tensor offsets, Tensor slots, Tensor Mt, Tensor cos, Tensor ssin, "
      "int k_lo, int period, int out_start, float alpha, Tensor(a!) y) -> ()");
  lib.def(
      "share_apply(Tensor x, Tensor tokens, Tensor offsets, Tensor slots, Tensor Mt, int n, int chunks, "
      "int out_start, float alpha, Tensor(a!) y) -> ()");
  lib.def("rope_rows(Tensor x, Tensor tokens, Tensor cos, Tensor ssin, int k_lo, Tensor(a!) V) -> ()");
  lib.def("share_rows(Tensor x, Tensor tokens, int n, int chunks, Tensor(a!) V) -> ()");
  lib.def("rope_add(Tensor P, Tensor tokens, int n, int k_lo, int chunks, int period, int out_start, Tensor(a!) y) -> ()");
  lib.def("share_add(Tensor P, Tensor tokens, int n, int out_start, Tensor(a!) y) -> ()");
  lib.def("stream_lines(int rows, int len, int ld, int offset, int work, int done, int step) -> Tensor", &stream_lines);
  lib.def("stream_span_lines(Tensor spans, int work, int done, int step) -> Tensor", &stream_span_lines);
}

TORCH_LIBRARY_IMPL(mora_native, CPU, lib) {
  lib.impl("grouped_mm", &grouped_mm);
  lib.impl("rope_apply", &rope_apply);
  lib.impl("share_apply", &share_apply);
  lib.impl("rope_rows", &rope_rows);
  lib.impl("share_rows", &share_rows);
  lib.impl("rope_add", &rope_add);
  lib.impl("share_add", &share_add);
}
