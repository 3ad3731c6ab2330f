// moe_gate_up_swiglu — kernel A of the MoE at decode: each chosen expert's gate/up projection
// straight from the checkpoint's interleaved MXFP4 rows, plus biases, then the clamped SwiGLU.
//
//   act[t, j, i] = swiglu(x[t] . W_e[2i] + b_e[2i],  x[t] . W_e[2i+1] + b_e[2i+1]),  e = indices[t, j]
//   swiglu(g, l) = min(g, limit) * sigmoid(1.702 * min(g, limit)) * (clamp(l, -limit, limit) + 1)
//
// Grid (32 * SG, ceil(I / SG), T * TOP_K) threads, threadgroup (32 * SG, 1, 1): one simdgroup
// per output column i, SG simdgroups per threadgroup, one threadgroup row per (token, slot).
// Data: x [T, D] of T_; w [E, 2I, D/8] uint32 (rows interleaved: gate 2i, linear 2i+1);
// scales [E, 2I, D/32] uint8; bias [E, 2I] of T_; indices [T, TOP_K] uint32; limit float.
// act [T, TOP_K, I] of T_. Template: T_ (activation dtype), D, I, TOP_K.
// Lanes stride over the D/8 packed words (mxfp4.h); each lane first loads all its words of the
// gate and linear rows, then per word 8 activations (16 bytes) decoded against both rows;
// fp32 accumulation, then simd_sum. The expert id is read on the GPU: no host sync.
// Fuses: 2 gather_qmm-equivalents over the same x (gate and up as one pass), 2 bias gathers and
// adds, the de-interleaving slices and the SwiGLU.
#include "mxfp4.h"
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint i = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
const uint slot = threadgroup_position_in_grid.z;  // t * TOP_K + j
if (i >= I) {
  return;  // the whole simdgroup leaves together
}
const uint t = slot / TOP_K;
const uint e = indices[slot];
constexpr uint WORDS = D / 8;
const size_t gate_row = size_t(e) * (2 * I) + 2 * i;
const device uint32_t* w_gate = w + gate_row * WORDS;
const device uint32_t* w_lin = w_gate + WORDS;
const device uint8_t* s_gate = scales + gate_row * (D / 32);
const device uint8_t* s_lin = s_gate + D / 32;
const device T_* x_t = x + size_t(t) * D;

// All of this lane's weight words first (at most 12 per row at D = 2880), so they are in flight
// together instead of two at a time.
constexpr uint STEPS = (WORDS + 31) / 32;
uint q_gate[STEPS];
uint q_lin[STEPS];
for (uint step = 0; step < STEPS; ++step) {
  const uint word = lane + 32 * step;
  q_gate[step] = word < WORDS ? w_gate[word] : 0u;
  q_lin[step] = word < WORDS ? w_lin[word] : 0u;
}
float acc_gate = 0.0f;
float acc_lin = 0.0f;
for (uint step = 0; step < STEPS; ++step) {
  const uint word = lane + 32 * step;
  if (word < WORDS) {
    float xv[8];
    load8(x_t + 8 * word, xv);
    acc_gate += dot8(q_gate[step], xv) * mxfp4_scale(s_gate[word / 4]);
    acc_lin += dot8(q_lin[step], xv) * mxfp4_scale(s_lin[word / 4]);
  }
}
acc_gate = simd_sum(acc_gate);
acc_lin = simd_sum(acc_lin);
if (lane == 0) {
  const float gate = metal::min(acc_gate + static_cast<float>(bias[gate_row]), limit);
  const float lin = metal::clamp(acc_lin + static_cast<float>(bias[gate_row + 1]), -limit, limit);
  const float glu = gate / (1.0f + metal::exp(-1.702f * gate));
  act[size_t(slot) * I + i] = static_cast<T_>(glu * (lin + 1.0f));
}
