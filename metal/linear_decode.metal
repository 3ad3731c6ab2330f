// linear_decode — a dense linear layer (nn.Linear with a bias) on a few rows of x, at decode:
// one launch where MLX's CUDA path runs a GEMV, often split-K plus a reduction, then the bias.
//
//   y[t, n] = T_(x[t] . W[n] + b[n])       float32 sums, one rounding
//
// Grid (32 * SG, ceil(N / SG), 1) threads, threadgroup (32 * SG, 1, 1): simdgroup s of
// threadgroup g computes output n = g * SG + s of every row of x (linear.h: lanes over chunks of
// 8 inputs, all of a lane's weight loads in flight together, simd_sum per row).
// Data: x [TOKENS, K], weight [N, K] (nn.Linear's layout), bias [N], all of T_. y [TOKENS, N] of T_.
// Template: T_, K (a multiple of 8), N, TOKENS.
// Fuses: the bias add (and on CUDA replaces cuBLAS's split-K GEMV and its reduction: two launches).
#include "linear.h"
// ---- body ----
const uint n = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
if (n < N) {  // uniform per simdgroup; no barrier follows
  linear_output<T_, K, N, TOKENS, false>(x, weight, bias, bias, 0.0f, n, thread_index_in_simdgroup, y);
}
