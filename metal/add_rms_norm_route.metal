// add_rms_norm_route — the residual add and RMSNorm before the MoE (add_rms_norm.metal) and the
// router that reads its output (moe_router.metal), in one launch per token.
//
//   h = T(x + residual);  y = T(gain * T(h * rsqrt(mean(h^2) + eps)))
//   indices, weights = the TOP_K largest T(y . W_e + b_e), highest first, and their softmax
//
// Grid (32 * SG, tokens, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per token,
// at least D / 8 threads (SG >= ceil(D / 256)), so that thread c holds chunk c (8 values) of the
// row in the norm: it loads its chunks of x, residual and gain (16-byte loads, all in flight
// together), sum(h^2) is reduced with simd_sum and across simdgroups through threadgroup memory
// (every thread adds the SG partial sums in the same order), it writes its chunk of h and y, and
// stages y in threadgroup memory as float, value-major (ys[n * D/8 + c] = y[8c + n]) so that
// lanes reading consecutive chunks hit distinct banks. Then the router: simdgroup s takes
// experts s, s + SG, ... (EPS = ceil(E / SG) of them), its lanes stride over the row's chunks, all
// of the lane's weight loads of an expert in flight together (the first expert's issued before
// the norm, so they arrive while it runs), one simd_sum per logit; simdgroup 0 then picks the
// top k (router.h). At decode this kernel is latency-bound: spreading the router's E rows over
// all simdgroups (instead of every thread taking a slice of every row in blocks of 8 experts,
// with two barriers per block) leaves two barriers and about two memory round trips.
// Data: x, residual [tokens, D] of T_; gain [D] of T_; eps float; weight [E, D] of T_, bias [E]
// of T_ (the router, nn.Linear's layout). h, y [tokens, D] of T_; indices [tokens, TOP_K] uint32;
// weights [tokens, TOP_K] float32 (values of T_).
// Template: T_, D (a multiple of 8, at most 32 * 8 * SG), E, TOP_K (<= E), SG (<= 12: registers).
// Fuses: the add, the norm and the router (two launches -> one, and one round trip to memory for
// the row instead of two).
#include "router.h"
// ---- body ----
constexpr uint CH = D / 8;  // chunks of 8 values in a row
constexpr uint STEPS = (CH + 31) / 32;  // a lane's chunks of a router row
constexpr uint EPS = (E + SG - 1) / SG;  // experts per simdgroup
constexpr uint SLOTS = (E + 31) / 32;  // logits per lane in the selection
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint c = thread_index_in_threadgroup;  // this thread's chunk of the row in the norm
const uint token = threadgroup_position_in_grid.y;
const bool mine = c < CH;
const size_t at = size_t(token) * D + 8 * c;

threadgroup float sums[SG];
threadgroup float ys[D];  // y, value-major: ys[n * CH + chunk] = y[8 * chunk + n]
threadgroup float logits[E];

// The first expert's weights of this lane, requested before the norm (expert sg < E: SG <= E).
float wv[8 * STEPS];  // [step][value]
for (uint step = 0; step < STEPS; ++step) {
  const uint chunk = lane + 32 * step;
  float v[8];
  for (uint n = 0; n < 8; ++n) {
    v[n] = 0.0f;
  }
  if (chunk < CH && sg < E) {
    load8(weight + size_t(sg) * D + 8 * chunk, v);
  }
  for (uint n = 0; n < 8; ++n) {
    wv[8 * step + n] = v[n];
  }
}
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
float total = 0.0f;
for (uint s = 0; s < SG; ++s) {
  total += sums[s];
}
const float inv = metal::precise::rsqrt(total / float(D) + eps);
if (mine) {
  for (uint n = 0; n < 8; ++n) {
    const T_ normed = static_cast<T_>(hv[n] * inv);
    const float xv = static_cast<float>(static_cast<T_>(gv[n] * static_cast<float>(normed)));
    h[at + n] = static_cast<T_>(hv[n]);
    y[at + n] = static_cast<T_>(xv);
    ys[n * CH + c] = xv;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint k = 0; k < EPS; ++k) {
  const uint e = sg + SG * k;  // uniform per simdgroup
  if (e < E) {
    for (uint step = 0; k > 0 && step < STEPS; ++step) {
      const uint chunk = lane + 32 * step;
      float v[8];
      for (uint n = 0; n < 8; ++n) {
        v[n] = 0.0f;
      }
      if (chunk < CH) {
        load8(weight + size_t(e) * D + 8 * chunk, v);
      }
      for (uint n = 0; n < 8; ++n) {
        wv[8 * step + n] = v[n];
      }
    }
    simdgroup_barrier(mem_flags::mem_none);  // keeps the loads above together (ptxas would spread them)
    float acc = 0.0f;
    for (uint step = 0; step < STEPS; ++step) {
      const uint chunk = lane + 32 * step;
      for (uint n = 0; chunk < CH && n < 8; ++n) {
        acc += wv[8 * step + n] * ys[n * CH + chunk];
      }
    }
    acc = simd_sum(acc);
    if (lane == 0) {
      logits[e] = static_cast<float>(static_cast<T_>(acc + static_cast<float>(bias[e])));
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg != 0) {
  return;
}
float slot[SLOTS];
for (uint i = 0; i < SLOTS; ++i) {
  slot[i] = lane + 32 * i < E ? logits[lane + 32 * i] : -INFINITY;
}
select_top_k<T_, E, TOP_K>(slot, lane, indices + size_t(token) * TOP_K, weights + size_t(token) * TOP_K);
