// moe_gate_up_swiglu — kernel A of the MoE at decode: each chosen expert's gate/up projection
// straight from the checkpoint's interleaved MXFP4 rows, plus biases, then the clamped SwiGLU.
//
//   act[t, j, i] = swiglu(x[t] . W_e[2i] + b_e[2i],  x[t] . W_e[2i+1] + b_e[2i+1]),  e = indices[t, j]
//   swiglu(g, l) = min(g, limit) * sigmoid(1.702 * min(g, limit)) * (clamp(l, -limit, limit) + 1)
//
// Grid (32 * SG, ceil(I / (SG * ROWS)), T * TOP_K) threads, threadgroup (32 * SG, 1, 1): one
// simdgroup per ROWS consecutive output columns i (their gate and linear rows), SG simdgroups
// per threadgroup, one threadgroup row per (token, slot).
// Data: x [T, D] of T_; w [E, 2I, D/8] uint32 (rows interleaved: gate 2i, linear 2i+1);
// scales [E, 2I, D/32] uint8; bias [E, 2I] of T_; indices [T, TOP_K] uint32; limit float.
// act [T, TOP_K, I] of T_. Template: T_ (activation dtype), D (a multiple of 32), I, TOP_K, ROWS.
// Lanes stride over the D/32 MX blocks of a row (mxfp4.h): lane l takes blocks l, l + 32, ...,
// each one 16-byte load of four packed words and its scale byte. Every lane loads all its
// blocks of the 2 * ROWS rows first (6 loads of 16 bytes per row at D = 2880, in flight
// together), then per block the 32 activations it multiplies (x is read from cache) and per
// row a chain of fused multiply-adds per word (dot8), 8 activations at a time; fp32
// accumulation, simd_sum. The biases are loaded with the weights. A ragged last simdgroup
// reads column I - 1 for the columns past the end and writes none of them. The expert id is
// read on the GPU: no host sync.
// Fuses: 2 gather_qmm-equivalents over the same x (gate and up as one pass), 2 bias gathers and
// adds, the de-interleaving slices and the SwiGLU.
#include "mxfp4.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint first = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * ROWS;
const uint slot = threadgroup_position_in_grid.z;  // t * TOP_K + j
const uint t = slot / TOP_K;
const uint e = indices[slot];
constexpr uint BLOCKS = D / 32;
constexpr uint STEPS = (BLOCKS + 31) / 32;  // a lane's blocks of a row
const device T_* x_t = x + size_t(t) * D;
if (first < I) {  // uniform per simdgroup; no barrier follows
  // q[(2r + g) * STEPS + step]: block lane + 32 step of column first + r's gate (g = 0) or
  // linear (g = 1) row; sc[...] its scale byte. All loaded before the first is used.
  uint4 q[2 * ROWS * STEPS];
  uint sc[2 * ROWS * STEPS];
  // The epilogue's biases, loaded with the weights (after the sums they would cost the warp one
  // more trip to memory while it holds its registers).
  float b_gate[ROWS];
  float b_lin[ROWS];
  for (uint r = 0; r < ROWS; ++r) {
    const size_t gate_row = size_t(e) * (2 * I) + 2 * metal::min(first + r, uint(I - 1));
    b_gate[r] = static_cast<float>(bias[gate_row]);
    b_lin[r] = static_cast<float>(bias[gate_row + 1]);
    const device uint4* w_gate = (const device uint4*)(w + gate_row * (D / 8));
    const device uint8_t* s_gate = scales + gate_row * BLOCKS;
    for (uint step = 0; step < STEPS; ++step) {
      const uint b = lane + 32 * step;
      for (uint g = 0; g < 2; ++g) {
        const uint k = (2 * r + g) * STEPS + step;
        if (b < BLOCKS) {
          q[k] = w_gate[g * BLOCKS + b];
          sc[k] = s_gate[g * BLOCKS + b];
        } else {
          q[k].x = 0u;
          q[k].y = 0u;
          q[k].z = 0u;
          q[k].w = 0u;
          sc[k] = 0u;
        }
      }
    }
  }
  // Keeps the loads above issued together: without it the CUDA compiler (ptxas) moves each load
  // next to its first use, leaving a simdgroup a few loads in flight (kernel SASS).
  simdgroup_barrier(mem_flags::mem_none);
  float acc[2 * ROWS];  // [column r][gate, linear]
  for (uint k = 0; k < 2 * ROWS; ++k) {
    acc[k] = 0.0f;
  }
  for (uint step = 0; step < STEPS; ++step) {
    const uint b = lane + 32 * step;
    if (b < BLOCKS) {
      float part[2 * ROWS];  // the block's sums, scaled once
      for (uint i = 0; i < 4; ++i) {  // a word of the block: 8 activations at a time
        float xv[8];
        load8(x_t + 32 * b + 8 * i, xv);
        for (uint k = 0; k < 2 * ROWS; ++k) {
          const float d = dot8(word_of(q[k * STEPS + step], i), xv);
          part[k] = i == 0 ? d : part[k] + d;
        }
      }
      for (uint k = 0; k < 2 * ROWS; ++k) {
        acc[k] = metal::fma(part[k], mxfp4_scale(sc[k * STEPS + step]), acc[k]);
      }
    }
  }
  for (uint k = 0; k < 2 * ROWS; ++k) {
    acc[k] = e2m1_unit(simd_sum(acc[k]));
  }
  if (lane == 0) {
    for (uint r = 0; r < ROWS && first + r < I; ++r) {
      // Clamped by comparisons, so that NaN stays NaN as in mx.minimum and mx.clip (metal::min
      // and clamp, fminf on CUDA, return the other operand: a NaN input gave finite outputs).
      const float g = acc[2 * r] + b_gate[r];
      const float l = acc[2 * r + 1] + b_lin[r];
      const float gate = g > limit ? limit : g;
      const float lin = l > limit ? limit : (l < -limit ? -limit : l);
      const float glu = gate / (1.0f + metal::exp(-1.702f * gate));
      act[size_t(slot) * I + first + r] = static_cast<T_>(glu * (lin + 1.0f));
    }
  }
}
