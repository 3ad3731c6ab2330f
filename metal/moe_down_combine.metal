// moe_down_combine — kernel B of the MoE at decode: each chosen expert's MXFP4 down projection
// plus bias, weighted by its routing weight, summed over the token's experts, plus the residual.
//
//   y[t, d] = residual[t, d] + sum_j  weights[t, j] * (act[t, j] . W_e[d] + b_e[d]),   e = indices[t, j]
//
// Grid (32 * TOP_K * OUTS, ceil(D / OUTS), T) threads, threadgroup (32 * TOP_K * OUTS, 1, 1):
// one simdgroup per (output element d, expert slot j) — simdgroup s of a threadgroup takes
// d = OUTS * group + s / TOP_K and j = s % TOP_K — so a token's experts are read by TOP_K
// simdgroups side by side (as many simdgroups as kernel A has, not TOP_K times fewer); one
// threadgroup row per token.
// Data: act [T, TOP_K, I] of T_; w [E, D, I/8] uint32; scales [E, D, I/32] uint8;
// bias [E, D] of T_; indices [T, TOP_K] uint32; weights [T, TOP_K] of T_; residual [T, D] of T_.
// y [T, D] of T_.
// Template: T_ (activation dtype), D, I, TOP_K, OUTS (outputs per threadgroup).
// Lanes stride over the I/8 packed words of the row (mxfp4.h), all loaded first, then decoded
// against 8 activations at a time; fp32 accumulation, simd_sum, the routing weight and bias;
// the TOP_K weighted results of each output meet in threadgroup memory, where one thread adds
// them (in slot order) to the residual. Every weight row is read once, by one simdgroup.
// Fuses: the gather_qmm, the bias gather and add, the routing weights, the sum over experts and
// the block's residual add.
#include "mxfp4.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint j = sg % TOP_K;
const uint d = threadgroup_position_in_grid.y * OUTS + sg / TOP_K;
const uint t = threadgroup_position_in_grid.z;
const uint slot = t * TOP_K + j;

threadgroup float expert_out[OUTS * TOP_K];  // [output][slot]

// No early return: every thread must reach the barrier. Past the last output (d >= D) a
// simdgroup computes nothing and its result is never read.
if (d < D) {
  constexpr uint WORDS = I / 8;
  constexpr uint STEPS = (WORDS + 31) / 32;
  const size_t row = size_t(indices[slot]) * D + d;
  const device uint32_t* w_row = w + row * WORDS;
  // All of this lane's weight words first (12 at I = 2880), so they are in flight together.
  uint q[STEPS];
  for (uint step = 0; step < STEPS; ++step) {
    const uint word = lane + 32 * step;
    q[step] = word < WORDS ? w_row[word] : 0u;
  }
  const device uint8_t* s_row = scales + row * (I / 32);
  const device T_* a = act + size_t(slot) * I;
  float acc = 0.0f;
  for (uint step = 0; step < STEPS; ++step) {
    const uint word = lane + 32 * step;
    if (word < WORDS) {
      float av[8];
      load8(a + 8 * word, av);
      acc += dot8(q[step], av) * mxfp4_scale(s_row[word / 4]);
    }
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    expert_out[sg] = static_cast<float>(weights[slot]) * (acc + static_cast<float>(bias[row]));
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const uint o = thread_index_in_threadgroup;  // threads 0 .. OUTS-1 write one output each
const uint d_out = threadgroup_position_in_grid.y * OUTS + o;
if (o < OUTS && d_out < D) {
  float sum = static_cast<float>(residual[size_t(t) * D + d_out]);
  for (uint k = 0; k < TOP_K; ++k) {
    sum += expert_out[o * TOP_K + k];
  }
  y[size_t(t) * D + d_out] = static_cast<T_>(sum);
}
