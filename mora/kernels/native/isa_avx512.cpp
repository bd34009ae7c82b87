// The avx512 path: kernel.h with one panel as one zmm register (AVX-512F/BW/VL).
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
namespace mora_native::isa_avx512 {

constexpr bool kDotBf16 = false;
#include "isa_avx512.h"
#include "kernel.h"

const RowsFn<float>* rows_float() { return kRows<float>; }
const RowsFn<bf16>* rows_bf16() { return kRows<bf16>; }

}  // namespace mora_native::isa_avx512
#pragma GCC pop_options
