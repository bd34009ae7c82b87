// The portable path: kernel.h with one panel as 16 plain floats, for CPUs without AVX2 + FMA
// (baseline x86-64: no target pragma). Every multiply-add is std::fma, one rounding as the
// vector FMAs of the other paths, so the results are theirs bit for bit; without the FMA
// instruction that is a libm call per term: slow, and only for CPUs no other path runs on.
#include <cmath>

#include "common.h"

namespace mora_native::isa_portable {
namespace {  // internal: no symbol of a path is exported, interposed or shared with another

struct Vec {
  float v[16];
};
using Mask = int;  // the panel's columns inside [0, n): the first `lanes`

template <typename T>
constexpr int kBlockRows = 4;  // few distinct blocks to compile: speed is not what this path is for

template <int RB, typename T>
constexpr int panels_for() {
  return 1;
}

inline Mask mask_of(int lanes) { return lanes; }
inline Vec zero() { return {}; }
inline Vec bcast(float a) {
  Vec r;
  for (float& x : r.v) x = a;
  return r;
}
inline Vec fma(const Vec& a, const Vec& b, const Vec& c) {
  Vec r;
  for (int l = 0; l < 16; ++l) r.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
  return r;
}
inline Vec mul(const Vec& a, const Vec& b) {
  Vec r;
  for (int l = 0; l < 16; ++l) r.v[l] = a.v[l] * b.v[l];
  return r;
}
inline Vec add(const Vec& a, const Vec& b) {
  Vec r;
  for (int l = 0; l < 16; ++l) r.v[l] = a.v[l] + b.v[l];
  return r;
}
inline void to_floats(float* dst, const Vec& v) { std::memcpy(dst, v.v, sizeof v.v); }

template <typename T>
Vec round_to(Vec v) {
  for (float& x : v.v) x = Scalar<T>::round(x);
  return v;
}

template <typename T>
Vec load(Mask m, const T* p) {
  Vec r{};
  for (int l = 0; l < m; ++l) r.v[l] = Scalar<T>::get(p[l]);
  return r;
}

template <typename T>
Vec load(const T* p) {
  return load<T>(16, p);
}

template <typename T>
void store(Mask m, T* p, const Vec& v) {
  for (int l = 0; l < m; ++l) p[l] = Scalar<T>::from(v.v[l]);
}

template <typename T>
void store(T* p, const Vec& v) {
  store<T>(16, p, v);
}

template <typename T>
void add_lanes(T* y, int64_t j, int lo, int hi, const float* v) {
  for (int l = lo; l < hi; ++l) y[j + l] = Scalar<T>::from(Scalar<T>::get(y[j + l]) + v[l]);
}

// No lines of panels (kernel.h's block): each panel is loaded and widened on its own.
template <typename T>
constexpr int kLinePanels = 0;
template <typename T>
void load_line(const T* p, Vec* b) = delete;
template <typename T>
void column_order(Vec* a) = delete;

#include "kernel.h"

}  // namespace

const Unit<float>* units_float() { return kUnits<float>; }
const Unit<bf16>* units_bf16() { return kUnits<bf16>; }
const RowOps<float>* rows_float() { return &kRowOps<float>; }
const RowOps<bf16>* rows_bf16() { return &kRowOps<bf16>; }

}  // namespace mora_native::isa_portable
