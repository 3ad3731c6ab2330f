// linear_decode — a dense linear layer (nn.Linear with a bias) on a few rows of x, at decode:
// one launch where MLX's CUDA path runs a GEMV, often split-K plus a reduction, then the bias.
//
//   y[t, n] = T_(x[t] . W[n] + b[n])       float32 sums, one rounding
//
// Grid (32 * SG, ceil(N / SG), 1) threads, threadgroup (32 * SG, 1, 1): simdgroup s of
// threadgroup g computes output n = g * SG + s of every row of x; its lanes stride over the K
// inputs in chunks of 8 values (16-byte loads for 16-bit types), lane l taking chunks l, l + 32,
// ...: a simdgroup's loads of a weight row are 512 contiguous bytes. Every weight chunk of the
// lane is loaded before the first is used (STEPS of them in flight together: 16 at K = 4096),
// then used for each of the TOKENS rows of x (a few KB, read from cache); simd_sum per row.
// Data: x [TOKENS, K], weight [N, K] (nn.Linear's layout), bias [N], all of T_. y [TOKENS, N] of T_.
// Template: T_, K (a multiple of 8), N, TOKENS.
// Fuses: the bias add (and on CUDA replaces cuBLAS's split-K GEMV and its reduction: two launches).
#include "mxfp4.h"
// ---- body ----
constexpr uint CH = K / 8;  // chunks of 8 values in a row
constexpr uint STEPS = (CH + 31) / 32;  // a lane's chunks of a row
const uint lane = thread_index_in_simdgroup;
const uint n = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
if (n < N) {  // uniform per simdgroup; no barrier follows
  const device T_* w_row = weight + size_t(n) * K;
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
  for (uint t = 0; t < TOKENS; ++t) {
    acc[t] = 0.0f;
  }
  for (uint step = 0; step < STEPS; ++step) {
    const uint chunk = lane + 32 * step;
    for (uint t = 0; chunk < CH && t < TOKENS; ++t) {
      float xv[8];
      load8(x + size_t(t) * K + 8 * chunk, xv);
      for (uint i = 0; i < 8; ++i) {
        acc[t] += wv[8 * step + i] * xv[i];
      }
    }
  }
  for (uint t = 0; t < TOKENS; ++t) {
    acc[t] = simd_sum(acc[t]);
  }
  if (lane == 0) {
    const float b = static_cast<float>(bias[n]);
    for (uint t = 0; t < TOKENS; ++t) {
      y[size_t(t) * N + n] = static_cast<T_>(acc[t] + b);
    }
  }
}
