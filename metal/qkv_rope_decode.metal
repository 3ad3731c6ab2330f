// qkv_rope_decode — the attention's first steps for a few tokens at decode: the qkv projection
// with its bias, and RoPE (half-split) on the query and key heads.
//
//   y[t, n] = T_(x[t] . W[n] + b[n])                                 float32 sums, one rounding
//   head h < ROPE_HEADS, rows i and i + HALF of the head (i < HALF), theta = positions[t] / periods[i]:
//     out[t, i] = T_(y_i cos(theta) - y_(i+HALF) sin(theta)),  out[t, i + HALF] = T_(y_i sin + y_(i+HALF) cos)
//   head h >= ROPE_HEADS (the values): out[t] = y[t]
//
// Grid (32 * SG, ceil(N / SG), 1) threads, threadgroup (32 * SG, 1, 1): threadgroup g takes the
// SG / 2 row pairs p = g * SG / 2 + j (pair p: head p / HALF, rows i and i + HALF, i = p % HALF);
// simdgroup j computes the pair's first row, simdgroup j + SG / 2 its second, as linear_decode
// does (lanes stride over the K inputs in chunks of 8 values, every weight chunk of the lane
// loaded before the first is used), and lane 0 leaves y in threadgroup memory. After one barrier
// thread j + SG / 2 * t rotates pair j of token t (its position and period were loaded with the
// weights; cos and sin after the barrier, where they hold no registers the sums need).
// Data: x [TOKENS, K], weight [N, K], bias [N] of T_ (nn.Linear's layout; rows: the query heads,
// the key heads, the value heads, 2 * HALF rows each); positions [TOKENS] int32 (token t's
// position); periods [HALF] float32 (theta = position / period, as mx.fast.rope's freqs).
// y [TOKENS, N] of T_.
// Template: T_, K (a multiple of 8), N (a multiple of 2 * HALF), HALF, ROPE_HEADS, TOKENS, SG (even).
// Fuses: the GEMV, its bias and RoPE (two launches -> one). The positions are read from device
// memory (a view of an arange made on the device): on MLX-CUDA a scalar the host makes lives in a
// pool of managed memory, and a kernel reading it waits for the page (docs/measurements.md).
#include "mxfp4.h"
// ---- body ----
constexpr uint CH = K / 8;  // chunks of 8 values in a row
constexpr uint STEPS = (CH + 31) / 32;  // a lane's chunks of a row
constexpr uint PAIRS = SG / 2;  // row pairs a threadgroup takes
constexpr uint P = N / 2;  // row pairs in all
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint first = threadgroup_position_in_grid.y * PAIRS;  // this threadgroup's first pair
const uint pair = first + sg % PAIRS;  // this simdgroup's pair (uniform per simdgroup)
const uint n = (pair / HALF) * 2 * HALF + pair % HALF + (sg < PAIRS ? 0 : HALF);  // and its row
const bool active = pair < P;

threadgroup float ys[TOKENS * SG];  // ys[t * SG + s]: simdgroup s's row for token t, rounded to T_

// The epilogue's thread: pair first + tid % PAIRS, token tid / PAIRS.
const uint e_pair = first + tid % PAIRS;
const uint e_token = tid / PAIRS;
const bool rotates = tid < PAIRS * TOKENS && e_pair < P && e_pair / HALF < ROPE_HEADS;
int position = 0;
float period = 1.0f;
if (rotates) {
  position = positions[e_token];
  period = periods[e_pair % HALF];
}
float b = 0.0f;
if (active && lane == 0) {
  b = static_cast<float>(bias[n]);
}
float wv[8 * STEPS];  // [step][value]
for (uint step = 0; step < STEPS; ++step) {
  const uint chunk = lane + 32 * step;
  float v[8];
  for (uint i = 0; i < 8; ++i) {
    v[i] = 0.0f;
  }
  if (active && chunk < CH) {
    load8(weight + size_t(n) * K + 8 * chunk, v);
  }
  for (uint i = 0; i < 8; ++i) {
    wv[8 * step + i] = v[i];
  }
}
// Keeps the loads above issued together (linear_decode.metal says why).
simdgroup_barrier(mem_flags::mem_none);
float acc[TOKENS];
for (uint t = 0; t < TOKENS; ++t) {
  acc[t] = 0.0f;
}
for (uint step = 0; step < STEPS; ++step) {
  const uint chunk = lane + 32 * step;
  for (uint t = 0; chunk < CH && t < TOKENS; ++t) {
    float xv[8];
    load8(x + size_t(t) * K + 8 * chunk, xv);
    for (uint i = 0; i < 8; ++i) {
      acc[t] += wv[8 * step + i] * xv[i];
    }
  }
}
for (uint t = 0; t < TOKENS; ++t) {
  acc[t] = simd_sum(acc[t]);
}
if (active && lane == 0) {
  for (uint t = 0; t < TOKENS; ++t) {
    ys[t * SG + sg] = static_cast<float>(static_cast<T_>(acc[t] + b));
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid < PAIRS * TOKENS && e_pair < P) {
  const float y1 = ys[e_token * SG + tid % PAIRS];
  const float y2 = ys[e_token * SG + PAIRS + tid % PAIRS];
  const size_t row = size_t(e_token) * N + (e_pair / HALF) * 2 * HALF + e_pair % HALF;
  if (rotates) {
    const float theta = static_cast<float>(position) * (1.0f / period);  // as mx.fast.rope
    const float c = metal::precise::cos(theta);
    const float s = metal::precise::sin(theta);
    y[row] = static_cast<T_>(y1 * c - y2 * s);
    y[row + HALF] = static_cast<T_>(y1 * s + y2 * c);
  } else {
    y[row] = static_cast<T_>(y1);
    y[row + HALF] = static_cast<T_>(y2);
  }
}
