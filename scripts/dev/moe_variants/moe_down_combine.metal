// Variant of metal/moe_down_combine.metal (same inputs and outputs): OUTS outputs per
// simdgroup, lanes over whole MX blocks read as uint4.
// Grid (32 * SG, ceil(D / (SG * OUTS)), T); template T_, D (a multiple of OUTS), I, TOP_K, OUTS.
#include "mxfp4.h"
#include "mx_blocks.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint d0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * OUTS;
const uint t = threadgroup_position_in_grid.z;
if (d0 >= D) {
  return;
}
constexpr uint BLOCKS = I / 32;
constexpr uint STEPS = (BLOCKS + 31) / 32;
uint4 q[TOP_K][STEPS][OUTS];
for (uint j = 0; j < TOP_K; ++j) {
  const device uint4* w_rows = (const device uint4*)w + (size_t(indices[t * TOP_K + j]) * D + d0) * BLOCKS;
  for (uint step = 0; step < STEPS; ++step) {
    const uint block = lane + 32 * step;
    if (block < BLOCKS) {
      for (uint o = 0; o < OUTS; ++o) {
        q[j][step][o] = w_rows[o * BLOCKS + block];
      }
    }
  }
}
float acc[OUTS];
float bias_sum[OUTS];
for (uint o = 0; o < OUTS; ++o) {
  acc[o] = 0.0f;
  bias_sum[o] = 0.0f;
}
for (uint j = 0; j < TOP_K; ++j) {
  const uint slot = t * TOP_K + j;
  const size_t row0 = size_t(indices[slot]) * D + d0;
  const device uint8_t* s_rows = scales + row0 * BLOCKS;
  const device T_* a = act + size_t(slot) * I;
  const float weight = static_cast<float>(weights[slot]);
  float partial[OUTS];
  for (uint o = 0; o < OUTS; ++o) {
    partial[o] = 0.0f;
  }
  for (uint step = 0; step < STEPS; ++step) {
    const uint block = lane + 32 * step;
    if (block < BLOCKS) {
      float dots[OUTS];
      dot32_rows<OUTS>(q[j][step], a + 32 * block, dots);
      for (uint o = 0; o < OUTS; ++o) {
        partial[o] += dots[o] * mxfp4_scale(s_rows[o * BLOCKS + block]);
      }
    }
  }
  for (uint o = 0; o < OUTS; ++o) {
    acc[o] += weight * partial[o];
    bias_sum[o] += weight * static_cast<float>(bias[row0 + o]);
  }
}
for (uint o = 0; o < OUTS; ++o) {
  const float sum = simd_sum(acc[o]);
  if (lane == o) {
    const size_t out = size_t(t) * D + d0 + o;
    y[out] = static_cast<T_>(static_cast<float>(residual[out]) + sum + bias_sum[o]);
  }
}
