// moe_down_combine — kernel B of the MoE at decode: each chosen expert's MXFP4 down projection
// plus bias, weighted by its routing weight, summed over the token's experts, plus the residual.
//
//   y[t, d] = residual[t, d] + sum_j  weights[t, j] * (act[t, j] . W_e[d] + b_e[d]),   e = indices[t, j]
//
// Grid (32 * SG, ceil(D / OUTS), T) threads, threadgroup (32 * SG, 1, 1) with
// SG = TOP_K * SPLIT * GROUPS simdgroups and OUTS = GROUPS * ROWS * SEQ outputs per threadgroup:
// simdgroup s takes part p = s % SPLIT of the I inputs (split-K: SPLIT simdgroups share a row),
// expert slot j = (s / SPLIT) % TOP_K and the ROWS * SEQ consecutive outputs of group
// s / (SPLIT * TOP_K), ROWS at a time in SEQ turns, so a token's experts are read by
// TOP_K * SPLIT simdgroups side by side; one threadgroup row per token.
// Data: act [T, TOP_K, I] of T_; w [E, D, I/8] uint32; scales [E, D, I/32] uint8;
// bias [E, D] of T_; indices [T, TOP_K] uint32; weights [T, TOP_K] of T_; residual [T, D] of T_.
// y [T, D] of T_.
// Template: T_ (activation dtype), D, I, TOP_K, OUTS, ROWS (outputs per turn), SEQ (turns per
// simdgroup: each turn's sums run while the next turn's weights load), SPLIT,
// ACT_AHEAD (1: the lane's activations loaded into registers with the weights, before the loop;
// 0: loaded in the loop, 16 bytes per step).
// Lanes stride over their part's packed words of the row (mxfp4.h), all loaded first with their
// scale bytes (a turn's ROWS rows, 12 words each at I = 2880 without split; the next turn's load
// during this turn's sums), then decoded against 8 activations at a time, which
// the ROWS rows share; fp32 accumulation, simd_sum. The partial sums meet in threadgroup memory,
// where one thread per output adds, in slot order, weights[j] * (its parts + bias) to the residual.
// Every weight row is read once. A ragged last group reads row D - 1 for outputs past the end
// and writes none of them.
// Fuses: the gather_qmm, the bias gather and add, the routing weights, the sum over experts and
// the block's residual add.
#include "mxfp4.h"

// This lane's weight words and scale bytes of part `part` of rows d0 .. d0 + ROWS - 1 (row D - 1
// for those past the end), from first_row: q[r * STEPS + step], step s's scale in byte s % 4 of
// sc[r * PACKED + s / 4].
template <int D, int I, int ROWS, int SPLIT>
METAL_FUNC void load_rows(const device uint32_t* w, const device uint8_t* scales, size_t first_row, uint d0,
                          uint part, uint lane, thread uint* q, thread uint* sc) {
  constexpr uint WORDS = I / 8;
  constexpr uint PART = (WORDS + SPLIT - 1) / SPLIT;
  constexpr uint STEPS = (PART + 31) / 32;
  constexpr uint PACKED = (STEPS + 3) / 4;
  for (uint k = 0; k < ROWS * PACKED; ++k) {
    sc[k] = 0u;
  }
  for (uint r = 0; r < ROWS; ++r) {
    const size_t row = first_row + metal::min(d0 + r, uint(D - 1));
    const device uint32_t* w_row = w + row * WORDS;
    const device uint8_t* s_row = scales + row * (I / 32);
    for (uint step = 0; step < STEPS; ++step) {
      const uint at = lane + 32 * step;
      const uint word = part * PART + at;
      const bool mine = at < PART && word < WORDS;
      q[r * STEPS + step] = mine ? w_row[word] : 0u;
      if (mine) {
        sc[r * PACKED + step / 4] |= uint(s_row[word / 4]) << (8 * (step % 4));
      }
    }
  }
}
// ---- body ----
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint part = sg % SPLIT;
const uint j = (sg / SPLIT) % TOP_K;
const uint group = sg / (SPLIT * TOP_K);
const uint d0 = threadgroup_position_in_grid.y * OUTS + group * ROWS * SEQ;
const uint t = threadgroup_position_in_grid.z;
const uint slot = t * TOP_K + j;
constexpr uint WORDS = I / 8;
constexpr uint PART = (WORDS + SPLIT - 1) / SPLIT;  // words per part
constexpr uint STEPS = (PART + 31) / 32;
constexpr uint PACKED = (STEPS + 3) / 4;

threadgroup float partial[OUTS * TOP_K * SPLIT];  // [output][slot][part]

// No early return: every thread must reach the barrier. Past the last output (d0 >= D) a
// simdgroup computes nothing and its results are never read.
if (d0 < D) {
  const size_t first_row = size_t(indices[slot]) * D;
  // All of this lane's weight words and scale bytes of its first turn first, so they are in flight together.
  uint q[ROWS * STEPS];  // [row][step]
  uint sc[ROWS * PACKED];  // the rows' scale bytes, step s in byte s % 4 of word s / 4
  load_rows<D, I, ROWS, SPLIT>(w, scales, first_row, d0, part, lane, q, sc);
  const device T_* a = act + size_t(slot) * I;
  // With ACT_AHEAD the lane's activations are loaded here too, all at once, as floats.
  float ahead[ACT_AHEAD ? 8 * STEPS : 8];
  for (uint step = 0; ACT_AHEAD && step < STEPS; ++step) {
    const uint at = lane + 32 * step;
    const uint word = part * PART + at;
    if (at < PART && word < WORDS) {
      float av[8];
      load8(a + 8 * word, av);
      for (uint n = 0; n < 8; ++n) {
        ahead[8 * step + n] = av[n];
      }
    }
  }
  // Keeps the loads above issued together: without it the CUDA compiler (ptxas) moves each load
  // next to its first use, leaving a simdgroup a few loads in flight (kernel SASS).
  simdgroup_barrier(mem_flags::mem_none);
  for (uint turn = 0; turn < SEQ && d0 + turn * ROWS < D; ++turn) {  // uniform per simdgroup
    const uint row0 = d0 + turn * ROWS;
    uint q_next[ROWS * STEPS];  // the next turn's words, loading while this turn sums
    uint sc_next[ROWS * PACKED];
    const bool more = turn + 1 < SEQ && row0 + ROWS < D;
    if (more) {
      load_rows<D, I, ROWS, SPLIT>(w, scales, first_row, row0 + ROWS, part, lane, q_next, sc_next);
    }
    simdgroup_barrier(mem_flags::mem_none);  // the next turn's loads, issued before these sums
    float acc[ROWS];
    for (uint r = 0; r < ROWS; ++r) {
      acc[r] = 0.0f;
    }
    for (uint step = 0; step < STEPS; ++step) {
      const uint at = lane + 32 * step;
      const uint word = part * PART + at;
      if (at < PART && word < WORDS) {
        float av[8];
        if (ACT_AHEAD) {
          for (uint n = 0; n < 8; ++n) {
            av[n] = ahead[8 * step + n];
          }
        } else {
          load8(a + 8 * word, av);
        }
        for (uint r = 0; r < ROWS; ++r) {
          const uint s = (sc[r * PACKED + step / 4] >> (8 * (step % 4))) & 0xFFu;
          acc[r] += dot8(q[r * STEPS + step], av) * mxfp4_scale(s);
        }
      }
    }
    for (uint r = 0; r < ROWS; ++r) {
      acc[r] = simd_sum(acc[r]);
    }
    if (lane == 0) {
      for (uint r = 0; r < ROWS; ++r) {
        partial[((group * ROWS * SEQ + turn * ROWS + r) * TOP_K + j) * SPLIT + part] = acc[r];
      }
    }
    for (uint k = 0; more && k < ROWS * STEPS; ++k) {
      q[k] = q_next[k];
    }
    for (uint k = 0; more && k < ROWS * PACKED; ++k) {
      sc[k] = sc_next[k];
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint o = thread_index_in_threadgroup; o < OUTS; o += threads_per_threadgroup.x) {  // an output per thread
  const uint d_out = threadgroup_position_in_grid.y * OUTS + o;
  if (d_out >= D) {
    break;
  }
  float sum = static_cast<float>(residual[size_t(t) * D + d_out]);
  for (uint k = 0; k < TOP_K; ++k) {
    float expert = static_cast<float>(bias[size_t(indices[t * TOP_K + k]) * D + d_out]);
    for (uint p = 0; p < SPLIT; ++p) {
      expert += partial[(o * TOP_K + k) * SPLIT + p];
    }
    sum += static_cast<float>(weights[t * TOP_K + k]) * expert;
  }
  y[size_t(t) * D + d_out] = static_cast<T_>(sum);
}
