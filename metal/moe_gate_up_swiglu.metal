// moe_gate_up_swiglu — kernel A of the MoE at decode: each chosen expert's gate/up projection
// straight from the checkpoint's interleaved MXFP4 rows, plus biases, then the clamped SwiGLU.
//
//   act[t, j, i] = swiglu(x[t] . W_e[2i] + b_e[2i],  x[t] . W_e[2i+1] + b_e[2i+1]),  e = indices[t, j]
//   swiglu(g, l) = min(g, limit) * sigmoid(1.702 * min(g, limit)) * (clamp(l, -limit, limit) + 1)
//
// Grid (32 * SG, ceil(I / (SG * ROWS * SEQ)), T * TOP_K) threads, threadgroup (32 * SG, 1, 1):
// one simdgroup per ROWS * SEQ consecutive output columns i, taken ROWS at a time in SEQ turns,
// SG simdgroups per threadgroup, one threadgroup row per (token, slot).
// Data: x [T, D] of T_; w [E, 2I, D/8] uint32 (rows interleaved: gate 2i, linear 2i+1);
// scales [E, 2I, D/32] uint8; bias [E, 2I] of T_; indices [T, TOP_K] uint32; limit float.
// act [T, TOP_K, I] of T_. Template: T_ (activation dtype), D, I, TOP_K, ROWS (columns per
// turn), SEQ (turns per simdgroup: each turn's sums run while the next turn's weights load),
// X_FROM (how a lane gets its x words: 0 loaded in the loop, 16 bytes per step; 1 the
// threadgroup first stages x in threadgroup memory as float, word-major so lanes reading
// consecutive words hit distinct banks; 2 loaded into registers with the weights, before the loop).
// Lanes stride over the D/8 packed words (mxfp4.h); each lane first loads all its words and
// scale bytes of the gate and linear rows of a turn's ROWS columns (2 * ROWS * 12 words at
// D = 2880, all in flight together, with the next turn's), then per word 8 activations decoded
// against every row; fp32 accumulation, then simd_sum. A ragged last simdgroup reads column I - 1 for the columns past the end and writes
// none of them. The expert id is read on the GPU: no host sync.
// Fuses: 2 gather_qmm-equivalents over the same x (gate and up as one pass), 2 bias gathers and
// adds, the de-interleaving slices and the SwiGLU.
#include "mxfp4.h"

// This lane's weight words and scale bytes of the gate and linear rows of columns first ..
// first + ROWS - 1 of expert e (column I - 1 for those past the end): q[(2r + g) * STEPS + step]
// (g = 0 the gate row, 1 the linear row), step s's scale in byte s % 4 of sc[(2r + g) * PACKED + s / 4].
template <int D, int I, int ROWS>
METAL_FUNC void load_columns(const device uint32_t* w, const device uint8_t* scales, uint e, uint first, uint lane,
                             thread uint* q, thread uint* sc) {
  constexpr uint WORDS = D / 8;
  constexpr uint STEPS = (WORDS + 31) / 32;
  constexpr uint PACKED = (STEPS + 3) / 4;
  for (uint k = 0; k < 2 * ROWS * PACKED; ++k) {
    sc[k] = 0u;
  }
  for (uint r = 0; r < ROWS; ++r) {
    const size_t gate_row = size_t(e) * (2 * I) + 2 * metal::min(first + r, uint(I - 1));
    const device uint32_t* w_gate = w + gate_row * WORDS;
    const device uint8_t* s_gate = scales + gate_row * (D / 32);
    for (uint step = 0; step < STEPS; ++step) {
      const uint word = lane + 32 * step;
      q[(2 * r) * STEPS + step] = word < WORDS ? w_gate[word] : 0u;
      q[(2 * r + 1) * STEPS + step] = word < WORDS ? w_gate[WORDS + word] : 0u;
      if (word < WORDS) {
        sc[(2 * r) * PACKED + step / 4] |= uint(s_gate[word / 4]) << (8 * (step % 4));
        sc[(2 * r + 1) * PACKED + step / 4] |= uint(s_gate[D / 32 + word / 4]) << (8 * (step % 4));
      }
    }
  }
}
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint first = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * ROWS * SEQ;
const uint slot = threadgroup_position_in_grid.z;  // t * TOP_K + j
const uint t = slot / TOP_K;
const uint e = indices[slot];
constexpr uint WORDS = D / 8;
constexpr uint STEPS = (WORDS + 31) / 32;
constexpr uint PACKED = (STEPS + 3) / 4;
const device T_* x_t = x + size_t(t) * D;

threadgroup float xs[X_FROM == 1 ? D : 8];  // xs[n * WORDS + word] = x[8 * word + n]
if (X_FROM == 1) {
  for (uint word = thread_index_in_threadgroup; word < WORDS; word += threads_per_threadgroup.x) {
    float xv[8];
    load8(x_t + 8 * word, xv);
    for (uint n = 0; n < 8; ++n) {
      xs[n * WORDS + word] = xv[n];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (first < I) {  // uniform per simdgroup; no barrier follows
  // All of this lane's weight words and scale bytes of its first turn first, so they are in
  // flight together: the loop below then waits on nothing but x.
  uint q[2 * ROWS * STEPS];  // [row r][gate, linear][step]
  uint sc[2 * ROWS * PACKED];  // the same rows' scale bytes, step s in byte s % 4 of word s / 4
  load_columns<D, I, ROWS>(w, scales, e, first, lane, q, sc);
  float ahead[X_FROM == 2 ? 8 * STEPS : 8];
  for (uint step = 0; X_FROM == 2 && step < STEPS; ++step) {
    const uint word = lane + 32 * step;
    if (word < WORDS) {
      float xv[8];
      load8(x_t + 8 * word, xv);
      for (uint n = 0; n < 8; ++n) {
        ahead[8 * step + n] = xv[n];
      }
    }
  }
  // Keeps the loads above issued together: without it the CUDA compiler (ptxas) moves each load
  // next to its first use, leaving a simdgroup a few loads in flight, not 24 (kernel SASS).
  simdgroup_barrier(mem_flags::mem_none);
  for (uint turn = 0; turn < SEQ && first + turn * ROWS < I; ++turn) {  // uniform per simdgroup
    const uint col = first + turn * ROWS;
    uint q_next[2 * ROWS * STEPS];  // the next turn's words, loading while this turn sums
    uint sc_next[2 * ROWS * PACKED];
    const bool more = turn + 1 < SEQ && col + ROWS < I;
    if (more) {
      load_columns<D, I, ROWS>(w, scales, e, col + ROWS, lane, q_next, sc_next);
    }
    simdgroup_barrier(mem_flags::mem_none);  // the next turn's loads, issued before these sums
    float acc[2 * ROWS];  // [row r][gate, linear]
    for (uint k = 0; k < 2 * ROWS; ++k) {
      acc[k] = 0.0f;
    }
    for (uint step = 0; step < STEPS; ++step) {
      const uint word = lane + 32 * step;
      if (word < WORDS) {
        float xv[8];
        for (uint n = 0; X_FROM != 0 && n < 8; ++n) {
          xv[n] = X_FROM == 1 ? xs[n * WORDS + word] : ahead[8 * step + n];
        }
        if (X_FROM == 0) {
          load8(x_t + 8 * word, xv);
        }
        for (uint k = 0; k < 2 * ROWS; ++k) {
          const uint s = (sc[k * PACKED + step / 4] >> (8 * (step % 4))) & 0xFFu;
          acc[k] += dot8(q[k * STEPS + step], xv) * mxfp4_scale(s);
        }
      }
    }
    for (uint k = 0; k < 2 * ROWS; ++k) {
      acc[k] = simd_sum(acc[k]);
    }
    if (lane == 0) {
      for (uint r = 0; r < ROWS && col + r < I; ++r) {
        const size_t gate_row = size_t(e) * (2 * I) + 2 * (col + r);
        const float gate = metal::min(acc[2 * r] + static_cast<float>(bias[gate_row]), limit);
        const float lin = metal::clamp(acc[2 * r + 1] + static_cast<float>(bias[gate_row + 1]), -limit, limit);
        const float glu = gate / (1.0f + metal::exp(-1.702f * gate));
        act[size_t(slot) * I + col + r] = static_cast<T_>(glu * (lin + 1.0f));
      }
    }
    for (uint k = 0; more && k < 2 * ROWS * STEPS; ++k) {
      q[k] = q_next[k];
    }
    for (uint k = 0; more && k < 2 * ROWS * PACKED; ++k) {
      sc[k] = sc_next[k];
    }
  }
}
