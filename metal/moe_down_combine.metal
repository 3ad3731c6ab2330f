// moe_down_combine — kernel B of the MoE at decode: each chosen expert's MXFP4 down projection
// plus bias, weighted by its routing weight, summed over the token's experts, plus the residual.
//
//   y[t, d] = residual[t, d] + sum_j  weights[t, j] * (act[t, j] . W_e[d] + b_e[d]),   e = indices[t, j]
//
// Grid (32 * SG, ceil(D / OUTS), T) threads, threadgroup (32 * SG, 1, 1) with
// SG = TOP_K * GROUPS simdgroups and OUTS = GROUPS * ROWS outputs per threadgroup: simdgroup s
// takes expert slot j = s % TOP_K and the ROWS consecutive outputs of group s / TOP_K, so a
// token's experts are read by TOP_K simdgroups side by side; one threadgroup row per token.
// Data: act [T, TOP_K, I] of T_; w [E, D, I/8] uint32; scales [E, D, I/32] uint8;
// bias [E, D] of T_; indices [T, TOP_K] uint32; weights [T, TOP_K] (float32 from the router
// kernels, or T_); residual [T, D] of T_.
// y [T, D] of T_. Template: T_ (activation dtype), D, I (a multiple of 32), TOP_K, OUTS, ROWS.
// Lanes stride over the I/32 MX blocks of a row (mxfp4.h): each lane loads all its blocks of
// the ROWS rows first (16 bytes and a scale byte each), then per block the 32 activations the
// ROWS rows share (8 at a time), and per row a chain of fused multiply-adds per word (dot8);
// fp32 accumulation, simd_sum. Lane 0 leaves weights[j] * (sum + bias) in threadgroup memory,
// where thread o (< OUTS <= threads) adds output o's in slot order to the residual; the routing
// weight, biases and residual are loaded with the weights. Every weight row is read once. A
// ragged last group reads row D - 1 for outputs past the end and writes none of them.
// Fuses: the gather_qmm, the bias gather and add, the routing weights, the sum over experts and
// the block's residual add.
#include "mxfp4.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint j = sg % TOP_K;
const uint group = sg / TOP_K;
const uint d0 = threadgroup_position_in_grid.y * OUTS + group * ROWS;
const uint t = threadgroup_position_in_grid.z;
const uint slot = t * TOP_K + j;
constexpr uint BLOCKS = I / 32;
constexpr uint STEPS = (BLOCKS + 31) / 32;  // a lane's blocks of a row

threadgroup float partial[OUTS * TOP_K];  // [output][slot]: weights[slot] * (the row's sum + bias)
const uint tid = thread_index_in_threadgroup;
const uint d_out = threadgroup_position_in_grid.y * OUTS + tid;  // thread tid < OUTS writes output tid
float res = 0.0f;  // residual[t, d_out]

// No early return: every thread must reach the barrier. Past the last output (d0 >= D) a
// simdgroup computes nothing and its results are never read.
if (d0 < D) {
  const size_t first_row = size_t(indices[slot]) * D;
  // q[r * STEPS + step]: block lane + 32 step of row d0 + r; sc[...] its scale byte. All
  // loaded before the first is used.
  uint4 q[ROWS * STEPS];
  uint sc[ROWS * STEPS];
  for (uint r = 0; r < ROWS; ++r) {
    const size_t row = first_row + metal::min(d0 + r, uint(D - 1));
    const device uint4* w_row = (const device uint4*)(w + row * (I / 8));
    const device uint8_t* s_row = scales + row * BLOCKS;
    for (uint step = 0; step < STEPS; ++step) {
      const uint b = lane + 32 * step;
      const uint k = r * STEPS + step;
      if (b < BLOCKS) {
        q[k] = w_row[b];
        sc[k] = s_row[b];
      } else {
        q[k].x = 0u;
        q[k].y = 0u;
        q[k].z = 0u;
        q[k].w = 0u;
        sc[k] = 0u;
      }
    }
  }
  // The epilogue's operands, loaded with the weights: this slot's routing weight and its rows'
  // biases, and thread o's residual for output o. After the barrier they would hold the whole
  // threadgroup (its registers, its place on the core) for two more trips to memory.
  const float w_slot = static_cast<float>(weights[slot]);
  float b_row[ROWS];
  for (uint r = 0; r < ROWS; ++r) {
    b_row[r] = static_cast<float>(bias[first_row + metal::min(d0 + r, uint(D - 1))]);
  }
  if (tid < OUTS && d_out < D) {
    res = static_cast<float>(residual[size_t(t) * D + d_out]);
  }
  // Keeps the loads above issued together: without it the CUDA compiler (ptxas) moves each load
  // next to its first use, leaving a simdgroup a few loads in flight (kernel SASS).
  simdgroup_barrier(mem_flags::mem_none);
  const device T_* a = act + size_t(slot) * I;
  float acc[ROWS];
  for (uint r = 0; r < ROWS; ++r) {
    acc[r] = 0.0f;
  }
  for (uint step = 0; step < STEPS; ++step) {
    const uint b = lane + 32 * step;
    if (b < BLOCKS) {
      float part[ROWS];  // the block's sums, scaled once
      for (uint i = 0; i < 4; ++i) {  // a word of the block: 8 activations at a time
        float av[8];
        load8(a + 32 * b + 8 * i, av);
        for (uint r = 0; r < ROWS; ++r) {
          const float d = dot8(word_of(q[r * STEPS + step], i), av);
          part[r] = i == 0 ? d : part[r] + d;
        }
      }
      for (uint r = 0; r < ROWS; ++r) {
        acc[r] = metal::fma(part[r], mxfp4_scale(sc[r * STEPS + step]), acc[r]);
      }
    }
  }
  for (uint r = 0; r < ROWS; ++r) {
    acc[r] = e2m1_unit(simd_sum(acc[r]));
  }
  if (lane == 0) {
    for (uint r = 0; r < ROWS; ++r) {
      partial[(group * ROWS + r) * TOP_K + j] = w_slot * (acc[r] + b_row[r]);
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid < OUTS && d_out < D) {  // thread o adds output o's experts, in slot order
  float sum = res;
  for (uint k = 0; k < TOP_K; ++k) {
    sum += partial[tid * TOP_K + k];
  }
  y[size_t(t) * D + d_out] = static_cast<T_>(sum);
}
