// linear.h — one output of a dense linear layer for a few rows of x, by one simdgroup: shared by
// linear_decode.metal (x as given) and rms_norm_linear_decode.metal (x normalized first).
#include "mxfp4.h"

// y[t, n] = T(x[t] . W[n] + b[n]) for t < TOKENS or, with NORM,
// y[t, n] = T(rsqrt(mean(x[t]^2) + eps) * ((gain * x[t]) . W[n]) + b[n]): rms_norm(x) * gain in
// float32, not rounded to T before the product (float32 sums, one rounding, as the expert kernels
// do). The lanes stride over K in chunks of 8 values (16-byte loads for 16-bit types), lane l
// taking chunks l, l + 32, ...: a simdgroup's loads of a weight row are 512 contiguous bytes, and
// its chunks of a row of x are the whole row, so the row's sum of squares comes with the dot
// product, in the same pass, and is one more simd_sum. Every weight chunk of the lane is loaded
// before the first is used (16 in flight at K = 4096); x's rows (a few KB) come from cache.
template <typename T, int K, int N, int TOKENS, bool NORM>
METAL_FUNC void linear_output(const device T* x, const device T* weight, const device T* bias,
                              const device T* gain, float eps, uint n, uint lane, device T* y) {
  constexpr uint CH = K / 8;  // chunks of 8 values in a row
  constexpr uint STEPS = (CH + 31) / 32;  // a lane's chunks of a row
  const device T* w_row = weight + size_t(n) * K;
  float wv[8 * STEPS];  // [step][value]
  for (uint step = 0; step < STEPS; ++step) {
    const uint chunk = lane + 32 * step;
    float v[8];
    for (uint i = 0; i < 8; ++i) {
      v[i] = 0.0f;
    }
    if (chunk < CH) {
      load8(w_row + 8 * chunk, v);
    }
    for (uint i = 0; i < 8; ++i) {
      wv[8 * step + i] = v[i];
    }
  }
  // Keeps the loads above issued together: without it the CUDA compiler (ptxas) moves each load
  // next to its first use, leaving a simdgroup about 5 of its 16 loads in flight (kernel SASS).
  simdgroup_barrier(mem_flags::mem_none);
  float acc[TOKENS];
  float sumsq[TOKENS];
  for (uint t = 0; t < TOKENS; ++t) {
    acc[t] = 0.0f;
    sumsq[t] = 0.0f;
  }
  for (uint step = 0; step < STEPS; ++step) {
    const uint chunk = lane + 32 * step;
    float gv[8];
    for (uint i = 0; i < 8; ++i) {
      gv[i] = 1.0f;
    }
    if (NORM && chunk < CH) {
      load8(gain + 8 * chunk, gv);
    }
    for (uint t = 0; chunk < CH && t < TOKENS; ++t) {
      float xv[8];
      load8(x + size_t(t) * K + 8 * chunk, xv);
      for (uint i = 0; i < 8; ++i) {
        sumsq[t] += xv[i] * xv[i];
        acc[t] += wv[8 * step + i] * (gv[i] * xv[i]);
      }
    }
  }
  for (uint t = 0; t < TOKENS; ++t) {
    acc[t] = simd_sum(acc[t]);
    if (NORM) {  // rms_norm(x) = x / rms(x): the same factor for the whole row, applied once
      acc[t] *= metal::precise::rsqrt(simd_sum(sumsq[t]) / float(K) + eps);
    }
  }
  if (lane == 0) {
    const float b = static_cast<float>(bias[n]);
    for (uint t = 0; t < TOKENS; ++t) {
      y[size_t(t) * N + n] = static_cast<T>(acc[t] + b);
    }
  }
}
