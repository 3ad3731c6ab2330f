// rms_norm_linear_decode — RMSNorm, then a dense linear layer (nn.Linear with a bias), on a few
// rows of x at decode: the attention's input norm and its qkv projection in one launch.
//
//   y[t, n] = T_(rsqrt(mean(x[t]^2) + eps) * ((gain * x[t]) . W[n]) + b[n])
//   float32 throughout, one rounding (MLX's path rounds the norm's output to T_ first)
//
// Grid (32 * SG, ceil(N / SG), 1) threads, threadgroup (32 * SG, 1, 1): simdgroup s of
// threadgroup g computes output n = g * SG + s of every row of x (linear.h). Its lanes read the
// whole row of x between them, so each simdgroup forms the row's sum of squares itself, in the
// pass that forms the dot product, and no launch or barrier is spent on the norm.
// Data: x [TOKENS, K], weight [N, K], bias [N], gain [K], all of T_; eps float. y [TOKENS, N] of T_.
// Template: T_, K (a multiple of 8), N, TOKENS.
// Fuses: the RMSNorm (a launch), the bias add (and on CUDA cuBLAS's split-K reduction).
#include "linear.h"
// ---- body ----
const uint n = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
if (n < N) {  // uniform per simdgroup; no barrier follows
  linear_output<T_, K, N, TOKENS, true>(x, weight, bias, gain, eps, n, thread_index_in_simdgroup, y);
}
