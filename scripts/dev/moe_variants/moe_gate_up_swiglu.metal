// Variant of metal/moe_gate_up_swiglu.metal (same inputs and outputs): COLS output columns
// (2 * COLS consecutive rows) per simdgroup, lanes over whole MX blocks read as uint4.
// Grid (32 * SG, ceil(I / (SG * COLS)), T * TOP_K); template T_, D, I (a multiple of COLS), TOP_K, COLS.
#include "mxfp4.h"
#include "mx_blocks.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint i0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * COLS;
const uint slot = threadgroup_position_in_grid.z;
if (i0 >= I) {
  return;
}
const uint t = slot / TOP_K;
const uint e = indices[slot];
constexpr uint BLOCKS = D / 32;
constexpr uint ROWS = 2 * COLS;
const size_t row0 = size_t(e) * (2 * I) + 2 * i0;
const device uint4* w_rows = (const device uint4*)w + row0 * BLOCKS;
const device uint8_t* s_rows = scales + row0 * BLOCKS;
const device T_* x_t = x + size_t(t) * D;
constexpr uint STEPS = (BLOCKS + 31) / 32;
uint4 q[STEPS][ROWS];
for (uint step = 0; step < STEPS; ++step) {
  const uint block = lane + 32 * step;
  if (block < BLOCKS) {
    for (uint r = 0; r < ROWS; ++r) {
      q[step][r] = w_rows[r * BLOCKS + block];
    }
  }
}
float acc[ROWS];
for (uint r = 0; r < ROWS; ++r) {
  acc[r] = 0.0f;
}
for (uint step = 0; step < STEPS; ++step) {
  const uint block = lane + 32 * step;
  if (block < BLOCKS) {
    float dots[ROWS];
    dot32_rows<ROWS>(q[step], x_t + 32 * block, dots);
    for (uint r = 0; r < ROWS; ++r) {
      acc[r] += dots[r] * mxfp4_scale(s_rows[r * BLOCKS + block]);
    }
  }
}
for (uint c = 0; c < COLS; ++c) {
  const float acc_gate = simd_sum(acc[2 * c]);
  const float acc_lin = simd_sum(acc[2 * c + 1]);
  if (lane == c) {
    const float gate = metal::min(acc_gate + static_cast<float>(bias[row0 + 2 * c]), limit);
    const float lin = metal::clamp(acc_lin + static_cast<float>(bias[row0 + 2 * c + 1]), -limit, limit);
    const float glu = gate / (1.0f + metal::exp(-1.702f * gate));
    act[size_t(slot) * I + i0 + c] = static_cast<T_>(glu * (lin + 1.0f));
  }
}
