// bench/dot_sums.py's probe: vdpbf16ps and tdpbf16ps against models of their sums (see there).
// argv: tiles per spread (AMX), sums per spread (vdpbf16ps). Prints "key=share" lines.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const int kSpreads[] = {3, 8, 20};  // binary exponents of the operands within +-spread

static uint64_t state = 88172645463325252ull;
static uint64_t next(void) {
  state ^= state << 13, state ^= state >> 7, state ^= state << 17;
  return state;
}
static uint16_t random_bf16(int spread) {  // a normal bf16 of exponent in [-spread, spread]
  const uint16_t sign = next() & 1, exponent = 127 + (int)(next() % (2 * spread + 1)) - spread;
  return (uint16_t)(sign << 15 | exponent << 7 | (next() & 0x7F));
}
static float widen(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float ftz(float x) { return fpclassify(x) == FP_SUBNORMAL ? copysignf(0.0f, x) : x; }

static void vdpbf16ps(long sums) {
  enum { K = 256 };
  static uint16_t a[K], b[K * 16];
  long total = 0, high = 0, low = 0;
  for (size_t s = 0; s < sizeof kSpreads / sizeof *kSpreads; ++s)
    for (long it = 0; it < sums; ++it) {
      for (int k = 0; k < K; ++k) {
        a[k] = random_bf16(kSpreads[s]);
        for (int l = 0; l < 16; ++l) b[k * 16 + l] = random_bf16(kSpreads[s]);
      }
      __m512 acc = _mm512_setzero_ps();
      for (int q = 0; q < K / 2; ++q) {
        uint32_t pair;
        memcpy(&pair, a + 2 * q, 4);
        uint16_t panel[32];
        for (int l = 0; l < 16; ++l) panel[2 * l] = b[2 * q * 16 + l], panel[2 * l + 1] = b[(2 * q + 1) * 16 + l];
        __m512i bv;
        memcpy(&bv, panel, 64);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)pair), (__m512bh)bv);
      }
      float got[16];
      _mm512_storeu_ps(got, acc);
      for (int l = 0; l < 16; ++l) {
        float h = 0, w = 0;
        for (int q = 0; q < K / 2; ++q) {
          const float ae = widen(a[2 * q]), ao = widen(a[2 * q + 1]);
          const float be = widen(b[2 * q * 16 + l]), bo = widen(b[(2 * q + 1) * 16 + l]);
          h = ftz(fmaf(ao, bo, h)), h = ftz(fmaf(ae, be, h));
          w = ftz(fmaf(ae, be, w)), w = ftz(fmaf(ao, bo, w));
        }
        ++total, high += got[l] == h, low += got[l] == w;
      }
    }
  printf("vdpbf16ps_high_first=%.3f vdpbf16ps_low_first=%.3f\n", (double)high / total, (double)low / total);
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static void tdpbf16ps(long tiles) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) {
    printf("amx_refused_by_os=1\n");
    return;
  }
  struct TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 3; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  static uint16_t A[16][32], B[16][32];
  static float C[16][16];
  long total = 0, even = 0, odd = 0, fused = 0, exact = 0;
  for (size_t s = 0; s < sizeof kSpreads / sizeof *kSpreads; ++s)
    for (long it = 0; it < tiles; ++it) {
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 32; ++j) A[i][j] = random_bf16(kSpreads[s]), B[i][j] = random_bf16(kSpreads[s]);
      memset(C, 0, sizeof C);
      _tile_loadd(0, C, 64);
      _tile_loadd(1, A, 64);
      _tile_loadd(2, B, 64);
      _tile_dpbf16ps(0, 1, 2);
      _tile_stored(0, C, 64);
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
          float e = 0, o = 0, f = 0;
          double x = 0;
          for (int k = 0; k < 16; ++k) {
            const float ae = widen(A[m][2 * k]), ao = widen(A[m][2 * k + 1]);
            const float be = widen(B[k][2 * n]), bo = widen(B[k][2 * n + 1]);
            e = ftz(fmaf(ae, be, e)), e = ftz(fmaf(ao, bo, e));
            o = ftz(fmaf(ao, bo, o)), o = ftz(fmaf(ae, be, o));
            f = ftz((float)((double)f + ((double)ae * be + (double)ao * bo)));  // exact pair, one rounding
            x += (double)ae * be + (double)ao * bo;  // exact for these magnitudes
          }
          const float got = C[m][n];
          ++total, even += got == e, odd += got == o, fused += got == f, exact += got == (float)x;
        }
    }
  _tile_release();
  printf("amx_even_first=%.3f amx_odd_first=%.3f amx_pair_fused=%.3f amx_exact_once=%.3f\n", (double)even / total,
         (double)odd / total, (double)fused / total, (double)exact / total);
}

int main(int argc, char** argv) {
  const long tiles = argc > 1 ? atol(argv[1]) : 1000, sums = argc > 2 ? atol(argv[2]) : 10000;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16")) vdpbf16ps(sums);
  if (__builtin_cpu_supports("amx-bf16")) tdpbf16ps(tiles);
  return 0;
}
