// add_rms_norm_route — the residual add and RMSNorm before the MoE (add_rms_norm.metal) and the
// router that reads its output (moe_router.metal), in one launch per token.
//
//   h = T(x + residual);  y = T(gain * T(h * rsqrt(mean(h^2) + eps)))
//   indices, weights = the TOP_K largest T(y . W_e + b_e), highest first, and their softmax
//
// Grid (32 * SG, tokens, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per token,
// SG = ceil(D / 256) simdgroups, so that thread c holds chunk c (8 values) of the row in both
// halves: it loads its chunks of x, residual and gain (16-byte loads, all in flight together),
// sum(h^2) is reduced with simd_sum and across simdgroups through threadgroup memory, it writes
// its chunk of h and y and keeps y in registers as the router's input; then the router as in
// moe_router.metal (router.h).
// Data: x, residual [tokens, D] of T_; gain [D] of T_; eps float; weight [E, D] of T_, bias [E]
// of T_ (the router, nn.Linear's layout). h, y [tokens, D] of T_; indices [tokens, TOP_K] uint32;
// weights [tokens, TOP_K] of T_.
// Template: T_, D (a multiple of 8, at most 8192), E, TOP_K (<= E), SG.
// Fuses: the add, the norm and the router (two launches -> one, and one round trip to memory for
// the row instead of two).
#include "router.h"
// ---- body ----
constexpr uint EB = E < 8 ? E : 8;  // experts per block
constexpr uint SLOTS = (E + 31) / 32;  // logits per lane in the selection
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint c = thread_index_in_threadgroup;  // this thread's chunk of the row
const uint token = threadgroup_position_in_grid.y;
const bool mine = c < D / 8;
const size_t at = size_t(token) * D + 8 * c;

threadgroup float sums[SG];
threadgroup float total[1];
threadgroup float partial[SG * EB];  // [simdgroup][expert of the block]
threadgroup float logits[E];

float hv[8];
float rv[8];
float gv[8];
for (uint n = 0; n < 8; ++n) {
  hv[n] = 0.0f;
  rv[n] = 0.0f;
  gv[n] = 0.0f;
}
if (mine) {
  load8(x + at, hv);
  load8(residual + at, rv);
  load8(gain + 8 * c, gv);
}
float sumsq = 0.0f;
for (uint n = 0; n < 8; ++n) {
  hv[n] = static_cast<float>(static_cast<T_>(hv[n] + rv[n]));
  sumsq += hv[n] * hv[n];
}
sumsq = simd_sum(sumsq);
if (lane == 0) {
  sums[sg] = sumsq;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg == 0) {
  float v = lane < SG ? sums[lane] : 0.0f;
  v = simd_sum(v);
  if (lane == 0) {
    total[0] = v;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float inv = metal::precise::rsqrt(total[0] / float(D) + eps);
float xv[8];  // y: the router's input
for (uint n = 0; n < 8; ++n) {
  const T_ normed = static_cast<T_>(hv[n] * inv);
  xv[n] = static_cast<float>(static_cast<T_>(gv[n] * static_cast<float>(normed)));
}
if (mine) {
  for (uint n = 0; n < 8; ++n) {
    h[at + n] = static_cast<T_>(hv[n]);
    y[at + n] = static_cast<T_>(xv[n]);
  }
}
for (uint e0 = 0; e0 < E; e0 += EB) {
  float acc[EB];
  router_block<T_, D, E, EB>(weight, e0, c, xv, acc);
  for (uint k = 0; k < EB; ++k) {
    acc[k] = simd_sum(acc[k]);
    if (lane == 0) {
      partial[sg * EB + k] = acc[k];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (c < EB && e0 + c < E) {
    float sum = 0.0f;
    for (uint s = 0; s < SG; ++s) {
      sum += partial[s * EB + c];
    }
    logits[e0 + c] = static_cast<float>(static_cast<T_>(sum + static_cast<float>(bias[e0 + c])));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // partial is reused; logits are complete
}
if (sg != 0) {
  return;
}
float slot[SLOTS];
for (uint i = 0; i < SLOTS; ++i) {
  slot[i] = lane + 32 * i < E ? logits[lane + 32 * i] : -INFINITY;
}
select_top_k<T_, E, TOP_K>(slot, lane, indices + size_t(token) * TOP_K, weights + size_t(token) * TOP_K);
