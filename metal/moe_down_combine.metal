// moe_down_combine — kernel B of the MoE at decode: each chosen expert's MXFP4 down projection
// plus bias, weighted by its routing weight, summed over the token's experts, plus the residual.
//
//   y[t, d] = residual[t, d] + sum_j  weights[t, j] * (act[t, j] . W_e[d] + b_e[d]),   e = indices[t, j]
//
// Grid (32 * SG, ceil(D / SG), T) threads, threadgroup (32 * SG, 1, 1): one simdgroup per
// output element d, SG simdgroups per threadgroup, one threadgroup row per token.
// Data: act [T, TOP_K, I] of T_; w [E, D, I/8] uint32; scales [E, D, I/32] uint8;
// bias [E, D] of T_; indices [T, TOP_K] uint32; weights [T, TOP_K] of T_; residual [T, D] of T_.
// y [T, D] of T_.
// Template: T_ (activation dtype), D, I, TOP_K.
// Lanes stride over the I/8 packed words of each expert's row (mxfp4.h); each lane first loads
// its words of all TOP_K rows, then decodes them against 8 activations at a time; the routing
// weight is applied to each lane's partial sum, so one simd_sum serves all TOP_K experts. Every weight row is read once, by one simdgroup.
// Fuses: the gather_qmm, the bias gather and add, the routing weights, the sum over experts and
// the block's residual add.
#include "mxfp4.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint d = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
const uint t = threadgroup_position_in_grid.z;
if (d >= D) {
  return;  // the whole simdgroup leaves together
}
constexpr uint WORDS = I / 8;
constexpr uint STEPS = (WORDS + 31) / 32;
// All of this lane's weight words for all TOP_K experts first (48 at I = 2880, top-4), so they
// are in flight together.
uint q[TOP_K][STEPS];
for (uint j = 0; j < TOP_K; ++j) {
  const device uint32_t* w_row = w + (size_t(indices[t * TOP_K + j]) * D + d) * WORDS;
  for (uint step = 0; step < STEPS; ++step) {
    const uint word = lane + 32 * step;
    q[j][step] = word < WORDS ? w_row[word] : 0u;
  }
}
float acc = 0.0f;
float bias_sum = 0.0f;
for (uint j = 0; j < TOP_K; ++j) {
  const uint slot = t * TOP_K + j;
  const size_t row = size_t(indices[slot]) * D + d;
  const device uint8_t* s_row = scales + row * (I / 32);
  const device T_* a = act + size_t(slot) * I;
  const float weight = static_cast<float>(weights[slot]);
  float partial = 0.0f;
  for (uint step = 0; step < STEPS; ++step) {
    const uint word = lane + 32 * step;
    if (word < WORDS) {
      float av[8];
      load8(a + 8 * word, av);
      partial += dot8(q[j][step], av) * mxfp4_scale(s_row[word / 4]);
    }
  }
  acc += weight * partial;
  bias_sum += weight * static_cast<float>(bias[row]);
}
acc = simd_sum(acc);
if (lane == 0) {
  const size_t out = size_t(t) * D + d;
  y[out] = static_cast<T_>(static_cast<float>(residual[out]) + acc + bias_sum);
}
