// The kernel of one ISA path. Each isa_*.cpp includes it inside its namespace and target pragma,
// after defining one panel of 16 float32 lanes, `Vec` (a zmm, two ymm, or 16 floats), with
// `Mask`, the blocking (`kBlockRows`, `panels_for`), its loads, stores and FMAs.
//
// Mt is read in place, 16-column panels of consecutive addresses, never packed; the handful of V
// rows of a unit are packed as float32 (put_row) and broadcast. Each output is a sum over k in
// order, one FMA per term, from +0: the same bits on every path and whatever the other rows.

// A block's packed rows: k in pieces of kPanel, each piece row after row. Row i's value k is at
// ((k / kPanel) * rows + i) * kPanel + k % kPanel: for each k a block reads its rows' values at
// constant offsets (i * kPanel) from one pointer, and a row is stored a piece at a time. (Packed
// k-major, one value per row apart, the scalar stores took half of a float32 rope_apply row.)
// `v` is the row's first piece (the block's start + i * kPanel); `rows` 1: a plain row.
template <typename T>
void put_row(float* v, int rows, const T* o, int64_t n) {
  for (int64_t k0 = 0; k0 < n; k0 += kPanel, v += rows * kPanel) {
    const int64_t len = std::min<int64_t>(kPanel, n - k0);
    for (int64_t l = 0; l < len; ++l) v[l] = Scalar<T>::get(o[k0 + l]);
  }
}

// rotate()'s panels: u is the chunk (n values, in x's row as T or widened into floats), cr and
// sr its rows of the tables, v the packed row.
template <typename T, typename U>
void rotate_panels(const U* u, const T* cr, const T* sr, int64_t n, float* v, int rows) {
  const int64_t half = n / 2;
  for (int64_t k0 = 0; k0 < n; k0 += kPanel, v += rows * kPanel) {
    const int lanes = static_cast<int>(std::min<int64_t>(kPanel, n - k0));
    const Mask m = mask_of(lanes);
    const bool whole = lanes == kPanel;
    const auto at = [&](const auto* q) { return whole ? load(q) : load(m, q); };
    Vec turned;  // u[(k + half) % n] for the panel's k
    if (k0 + lanes <= half || k0 >= half) {
      turned = at(u + (k0 < half ? k0 + half : k0 - half));
    } else {  // the panel holding column half: each side from its own half of u
      float t[kPanel];
      for (int l = 0; l < lanes; ++l) t[l] = Scalar<U>::get(u[k0 + l < half ? k0 + l + half : k0 + l - half]);
      turned = at(static_cast<const float*>(t));
    }
    const Vec o = round_to<T>(add(round_to<T>(mul(turned, at(sr + k0))), mul(at(u + k0), at(cr + k0))));
    if (whole) to_floats(v, o);
    else store<float>(m, v, o);  // not past n: a plain row (rows 1) may end there
  }
}

// The rotated chunk of row r into v, a packed row of `rows` (rope_apply's V rows): v[k] = u[(k + n/2) % n] *
// ssin[k] + u[k] * cos[k] (u = the chunk), each product rounded, then their sum, as the
// reference's `u * cos + rotate_half(u) * sin` rounds (torch's vectorized addcmul_, on the
// general path, fuses the second product into the sum); `buf`: n floats. Elementwise, no FMA
// contraction: the same bits at every vector width. A panel at a time, from x's row into v
// (widened, rotated and stored in one pass: three passes over row buffers took 1.05x as long
// for bf16 gate_proj decode calls, 1.03x float32 q_proj); only the last chunk, which may read
// the padding (the first features again), is widened into `buf` first.
template <typename T>
void rotate(const Rope<T>& rope, int64_t r, float* v, int rows, float* buf) {
  const int64_t n = rope.n, c = r % rope.chunks;
  const T* xr = rope.x + rope.tokens[r / rope.chunks] * rope.ldx;
  const T* cr = rope.cos + c * n;
  const T* sr = rope.ssin + c * n;
  const int64_t base = (rope.k_lo + c) * n;
  if (base + n <= rope.in_f) return rotate_panels(xr + base, cr, sr, n, v, rows);
  // widened with the wrap (two plain loops, vectorized: one with a select per element ran as
  // scalar loads)
  const int64_t inside = std::clamp<int64_t>(rope.in_f - base, 0, n);
  for (int64_t k = 0; k < inside; ++k) buf[k] = Scalar<T>::get(xr[base + k]);
  for (int64_t k = inside; k < n; ++k) buf[k] = Scalar<T>::get(xr[base + k - rope.in_f]);
  rotate_panels(static_cast<const float*>(buf), cr, sr, n, v, rows);
}

// Type 1's row r (share_apply: one per token) into v, a packed row of `rows`: the sum of the token's
// sum_chunks chunks of the padded input, in chunk order from +0, each addition rounded (float32),
// then rounded to T once, as torch.sum rounds its float32 accumulator. `buf`: n floats.
template <typename T>
void chunk_sum(const Rope<T>& rope, int64_t r, float* v, int rows, float* buf) {
  using S = Scalar<T>;
  const int64_t n = rope.n;
  const T* xr = rope.x + rope.tokens[r / rope.chunks] * rope.ldx;
  for (int64_t k = 0; k < n; ++k) buf[k] = 0.0f;
  for (int64_t c = 0; c < rope.sum_chunks; ++c) {  // the last chunk may wrap: the first features again
    const int64_t base = c * n, inside = std::clamp<int64_t>(rope.in_f - base, 0, n);
    for (int64_t k = 0; k < inside; ++k) buf[k] += S::get(xr[base + k]);
    for (int64_t k = inside; k < n; ++k) buf[k] += S::get(xr[base + k - rope.in_f]);
  }
  for (int64_t k = 0; k < n; ++k) buf[k] = S::round(buf[k]);
  put_row(v, rows, buf, n);
}

// Row r's spans of y (rope_apply, share_apply): its chunk c = k_lo + r % chunks lands on y's
// columns c * n - out_start.. of every period, consecutive columns. at(y, j, lo, hi): columns
// j + lo.. j + hi - 1 of its token's row of y take the product's columns lo..hi - 1.
template <typename T, typename At>
void each_span(const Rope<T>& rope, int64_t r, At at) {
  const int64_t n = rope.n;
  T* y = rope.y + rope.tokens[r / rope.chunks] * rope.ldy;
  const int64_t d = (rope.k_lo + r % rope.chunks) * n - rope.out_start;  // column 0's in period 0
  const int64_t a = d + n - 1;  // floor(a / period) periods before the first whose span reaches column 0
  const int64_t before = a >= 0 ? a / rope.period : -((-a + rope.period - 1) / rope.period);
  for (int64_t j = d - before * rope.period; j < rope.width; j += rope.period)
    at(y, j, j < 0 ? -j : 0, std::min(n, rope.width - j));
}

// Row r's lines of y requested into L2 while it is packed, a unit's products ahead of add_rows:
// spread over tokens and periods, no hardware prefetcher follows them.
template <typename T>
void request_y(const Rope<T>& rope, int64_t r) {
  each_span(rope, r, [](T* y, int64_t j, int64_t lo, int64_t hi) {
    for (int64_t l = lo; l < hi; l += 64 / static_cast<int64_t>(sizeof(T))) prefetch_l2(y + j + l);
    prefetch_l2(y + j + hi - 1);
  });
}

// Row r's products (n floats at o, each a T value) added into y, span after span.
template <typename T>
void add_row_floats(const Rope<T>& rope, int64_t r, const float* o) {
  each_span(rope, r, [o](T* y, int64_t j, int64_t lo, int64_t hi) {
    for (int64_t l = lo; l < hi; l += kPanel)
      add_lanes<T>(y, j + l, 0, static_cast<int>(std::min<int64_t>(kPanel, hi - l)), o + l);
  });
}

// Adds a unit's rounded products (its rows of the tile, n columns each) into y, after its last
// panel, span after span. (Adding each block's panels at its end, 16-column pieces of y
// scattered over chunks and periods, took 15-20% of a bfloat16 call: y lines fetched twice,
// and the pieces' targets computed and prefetched per block.)
template <typename T>
__attribute__((noinline)) void add_rows(const Problem<T>& p, int64_t row0, int rows) {
  for (int i = 0; i < rows; ++i) add_row_floats(p.rope, row0 + i, p.tile + (row0 + i - p.tile_row0) * p.ldt);
}

// After a unit's panels [.., q1): once its last panel is done, a direct op adds its products into y.
template <typename T>
void after_panels(const Problem<T>& p, int64_t row0, int rows, int64_t q1) {
  if (p.rope.y && q1 == (p.n + kPanel - 1) / kPanel) add_rows(p, row0, rows);
}

// A direct op's V row r (rope_apply: rotated; share_apply: chunk-summed); `buf`: n floats.
template <typename T>
void make_row(const Rope<T>& rope, int64_t r, float* v, int rows, float* buf) {
  if (rope.sum_chunks) chunk_sum(rope, r, v, rows, buf);
  else rotate(rope, r, v, rows, buf);
}

// make_row, with row r's lines of y requested while it is made unless the run before streamed
// them (rope_apply, share_apply: the first run of a thread's units).
template <typename T>
void direct_row(const Problem<T>& p, int64_t r, float* v, int rows, float* buf) {
  if (!p.y_requested) request_y(p.rope, r);
  make_row(p.rope, r, v, rows, buf);
}

// rope_rows' and share_rows' rows, rope_add's and share_add's additions (RowOps): make_row's V
// row stored as T (exact: rotate() and chunk_sum() round every value to T), and a row of T
// products added into y as add_rows adds a unit's.
template <typename T>
void v_row(const Rope<T>& rope, int64_t r, T* dst, float* buf) {
  float* v = buf + 2 * rope.n;
  make_row(rope, r, v, 1, buf);
  for (int64_t k = 0; k < rope.n; ++k) dst[k] = Scalar<T>::from(v[k]);
}

template <typename T>
void add_row(const Rope<T>& rope, int64_t r, const T* o, float* buf) {
  for (int64_t k = 0; k < rope.n; ++k) buf[k] = Scalar<T>::get(o[k]);  // add_lanes reads whole panels: buf has 3n
  add_row_floats(rope, r, buf);
}

template <typename T>
constexpr RowOps<T> kRowOps = {v_row<T>, add_row<T>};

// Where the block after this one starts streaming into L2: kAhead panels on (at least one
// block), this M's (null past its last panel: the next M comes by its Stream, common.h).
template <int NP, typename T>
void lookahead(const Problem<T>& p, int64_t p0, const T* (&ahead)[NP]) {
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  for (int j = 0; j < NP; ++j) {
    const int64_t q = p0 + j + NP * ((kAhead + NP - 1) / NP);
    ahead[j] = q < panels ? p.Mt + q * kPanel : nullptr;
  }
}

// A block's accumulators times alpha, stored: into out, or (rope_apply, share_apply) rounded to
// T into the tile, as float32 (add_rows adds them into y). Only the last panel of a TAIL block
// has fewer than kPanel columns inside [0, n) (the tile's rows have room for whole panels).
// Inlined into each block (and the dot-product blocks, kernel_dp.h), unrolled as their loops
// over acc: indexed by constants only, the accumulators stay registers.
template <int RB, int NP, bool TAIL, typename T>
__attribute__((always_inline)) inline void finish(const Problem<T>& p, const Vec (&acc)[RB][NP], int64_t row0,
                                                  int64_t p0, int lanes) {
  const Vec alpha = bcast(p.alpha);
#pragma GCC unroll 8
  for (int j = 0; j < NP; ++j) {
    const int cols = TAIL && j == NP - 1 ? lanes : kPanel;
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const Vec v = p.alpha == 1.0f ? acc[i][j] : mul(acc[i][j], alpha);
      if (p.rope.y) {
        to_floats(p.tile + (row0 + i - p.tile_row0) * p.ldt + (p0 + j) * kPanel, round_to<T>(v));
      } else {
        T* dst = p.out + (row0 + i) * p.ldo + (p0 + j) * kPanel;
        cols == kPanel ? store<T>(dst, v) : store<T>(mask_of(cols), dst, v);
      }
    }
  }
}

// A block's accumulators to +0 (inlined and unrolled: they stay registers).
template <int RB, int NP>
__attribute__((always_inline)) inline void clear(Vec (&acc)[RB][NP]) {
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[i][j] = zero();
}

// What a block needs besides its accumulators: its last panel's columns inside [0, n) (`lanes`,
// `tail`) and where its prefetches run ahead.
template <int RB, int NP, bool TAIL, typename T>
struct Edges {
  int lanes;
  Mask tail;
  const T* ahead[NP];

  Edges(const Problem<T>& p, int64_t p0)
      : lanes(TAIL ? static_cast<int>(p.n - (p0 + NP - 1) * kPanel) : kPanel), tail(mask_of(lanes)) {
    lookahead<NP>(p, p0, ahead);
  }
};

// RB rows (packed at Vp, put_row) x NP panels from panel p0: every accumulator a register.
// Where the path widens bf16 panels a line at a time (kLinePanels of them: even columns in one
// register or half, odd ones in the next), the accumulators go back to column order at the
// end; each still sums over k in order, one FMA per term.
template <int RB, int NP, bool TAIL, typename T>
void block(const Problem<T>& p, const float* Vp, int64_t row0, int64_t p0) {
  constexpr int line = kLinePanels<T>;
  constexpr bool lines = line > 0 && NP % line == 0 && !TAIL;
  constexpr int step = lines ? line : 1;
  Vec acc[RB][NP];
  clear(acc);
  const Edges<RB, NP, TAIL, T> e(p, p0);
  const int lanes = e.lanes;
  const Mask tail = e.tail;
  const T* const(&ahead)[NP] = e.ahead;
  const T* base = p.Mt + p0 * kPanel;
  for (int64_t k0 = 0; k0 < p.n; k0 += kPanel) {  // a piece of the packed rows (put_row) at a time
    const float* piece = Vp + k0 * RB;
    const int64_t len = std::min<int64_t>(kPanel, p.n - k0);
    pace_next(p, RB * NP * len);
    for (int64_t l = 0; l < len; ++l) {
      const int64_t k = k0 + l;
      Vec b[NP];
      const T* row = base + k * p.ldm;
#pragma GCC unroll 8
      for (int j = 0; j < NP; j += step) {
        __builtin_prefetch(row + PF * p.ldm + j * kPanel, 0, 3);              // prefetcht0
        if (ahead[j]) __builtin_prefetch(ahead[j] + k * p.ldm, 0, 2);         // prefetcht1
        if constexpr (lines) load_line<T>(row + j * kPanel, b + j);
        else b[j] = TAIL && j == NP - 1 ? load<T>(tail, row + j * kPanel) : load<T>(row + j * kPanel);  // never past n
      }
      const float* a = piece + l;
#pragma GCC unroll 16
      for (int i = 0; i < RB; ++i) {
        const Vec ai = bcast(a[i * kPanel]);
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j) acc[i][j] = fma(ai, b[j], acc[i][j]);
      }
    }
  }
  if constexpr (lines) {
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NP; j += step) column_order<T>(acc[i] + j);
  }
  finish<RB, NP, TAIL>(p, acc, row0, p0, lanes);
}

// Panels q.. (NP of them) for all RB rows, as blocks of at most kBlockRows rows back to back:
// the first reads the panels from memory, the others from L1.
template <int RB, int NP, bool TAIL, typename T>
void sweep(const Problem<T>& p, const float* pack, int64_t row0, int64_t q) {
  constexpr int parts = (RB + kBlockRows<T> - 1) / kBlockRows<T>, SUB = (RB + parts - 1) / parts;
  const int64_t ld = tile_stride(p.n);
  for (int s = 0; s + 1 < parts; ++s) block<SUB, NP, TAIL>(p, pack + s * SUB * ld, row0 + s * SUB, q);
  block<RB - SUB * (parts - 1), NP, TAIL>(p, pack + (parts - 1) * SUB * ld, row0 + (parts - 1) * SUB, q);
}

// Rows [row0, row0 + RB) of one group, packed as float32 (put_row), each block's rows apart.
template <int RB, typename T>
void pack(const Problem<T>& p, int64_t row0, float* dst, float* scratch) {
  constexpr int parts = (RB + kBlockRows<T> - 1) / kBlockRows<T>, SUB = (RB + parts - 1) / parts;
  for (int i = 0; i < RB; ++i) {
    const int s = i / SUB, in = s + 1 < parts ? SUB : RB - SUB * (parts - 1);
    float* d = dst + s * SUB * tile_stride(p.n) + (i - s * SUB) * kPanel;
    if (p.rope.y) direct_row(p, row0 + i, d, in, scratch);
    else put_row(d, in, p.V + (row0 + i) * p.ldv, p.n);
  }
}

// The packed rows times panels [q0, q1) of M: NP at a time, then one at a time, the partial
// last panel (where n is not a multiple of 16) as its own.
template <int RB, typename T>
void panels(const Problem<T>& p, const float* packed, int64_t row0, int64_t q0, int64_t q1) {
  constexpr int parts = (RB + kBlockRows<T> - 1) / kBlockRows<T>, SUB = (RB + parts - 1) / parts;
  constexpr int NP = panels_for<SUB, T>();
  const int64_t full = std::min(q1, p.n / kPanel);
  int64_t q = q0;
  for (; q + NP <= full; q += NP) sweep<RB, NP, false>(p, packed, row0, q);
  for (; q < full; ++q) sweep<RB, 1, false>(p, packed, row0, q);
  if (q1 > p.n / kPanel && p.n % kPanel) sweep<RB, 1, true>(p, packed, row0, p.n / kPanel);
  after_panels(p, row0, RB, q1);
}

template <int RB, typename T>
constexpr Unit<T> unit() {
  constexpr int parts = (RB + kBlockRows<T> - 1) / kBlockRows<T>, SUB = (RB + parts - 1) / parts;
  return {pack<RB, T>, panels<RB, T>, panels_for<SUB, T>()};
}

template <typename T>
constexpr Unit<T> kUnits[kMaxRows + 1] = {
    {},          unit<1, T>(),  unit<2, T>(),  unit<3, T>(),  unit<4, T>(),  unit<5, T>(),  unit<6, T>(),
    unit<7, T>(),  unit<8, T>(),  unit<9, T>(),  unit<10, T>(), unit<11, T>(), unit<12, T>(), unit<13, T>(),
    unit<14, T>(), unit<15, T>(), unit<16, T>()};
