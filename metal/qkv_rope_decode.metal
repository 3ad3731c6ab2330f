// qkv_rope_decode — the attention's first steps for a few tokens at decode: the input RMSNorm,
// the qkv projection with its bias, and RoPE (half-split) on the query and key heads.
//
//   y[t, n] = T_(rsqrt(mean(x[t]^2) + eps) * sum_k W[n, k] gain[k] x[t, k] + b[n])   float32, one rounding
//   (the RMSNorm's output is not rounded to T_ before the projection, as mx.fast.rms_norm's is:
//   the torch reference rounds it once, MLX twice; here it stays float32)
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
// The norm: a simdgroup's lanes read all of x's row for the dot product anyway, so each
// simdgroup sums its squares in the same pass (one more simd_sum per token; every simdgroup of
// the grid adds the same values in the same order, so all get the same factor), the dot product
// takes x times the gain, and the factor multiplies the finished sum. No barrier, no threadgroup
// memory, no pass before the sums, no launch of its own.
// Data: x [TOKENS, K], gain [K] of T_ (the RMSNorm's), eps float; weight [N, K], bias [N] of T_
// (nn.Linear's layout; rows: the query heads, the key heads, the value heads, 2 * HALF rows each);
// positions [TOKENS] int32 (token t's position); periods [HALF] float32 (theta = position /
// period, as mx.fast.rope's freqs). y [TOKENS, N] of T_.
// Template: T_, K (a multiple of 8), N (a multiple of 2 * HALF), HALF, ROPE_HEADS, TOKENS, SG (even).
// Fuses: the RMSNorm, the GEMV, its bias and RoPE (three launches -> one). The positions are read
// from device memory (a view of an arange made on the device): on MLX-CUDA a scalar the host
// makes lives in a pool of managed memory, and a kernel reading it waits for the page
// (docs/measurements.md).
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
// The norm's factor is the same for every term of a row's sum: the sums take x times the gain,
// and the factor (from the sums of squares, gathered in the same pass) multiplies the total.
float sumsq[TOKENS];
float acc[TOKENS];
for (uint t = 0; t < TOKENS; ++t) {
  sumsq[t] = 0.0f;
  acc[t] = 0.0f;
}
for (uint step = 0; step < STEPS; ++step) {
  const uint chunk = lane + 32 * step;
  float gv[8];
  if (chunk < CH) {
    load8(gain + 8 * chunk, gv);
  }
  for (uint t = 0; chunk < CH && t < TOKENS; ++t) {
    float xv[8];
    load8(x + size_t(t) * K + 8 * chunk, xv);
    for (uint i = 0; i < 8; ++i) {
      sumsq[t] = metal::fma(xv[i], xv[i], sumsq[t]);
      acc[t] = metal::fma(wv[8 * step + i], xv[i] * gv[i], acc[t]);
    }
  }
}
for (uint t = 0; t < TOKENS; ++t) {
  const float inv = metal::precise::rsqrt(simd_sum(sumsq[t]) / float(K) + eps);
  acc[t] = simd_sum(acc[t]) * inv;
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
