// moe_router — the MoE router of a few tokens in one launch: the router's logits, the top-k
// experts and the softmax over their logits (MLX's path: addmm, argsort, take, softmax).
//
//   logit_e = T_(x . W_e + b_e)          rounded to T_ as nn.Linear's output is (the reference
//                                         model computes its router in bf16 too)
//   indices = the TOP_K largest logits, highest first (the lower expert on a tie)
//   weights = T_(softmax(logit_indices))  computed in float
//
// Grid (32 * SG, tokens, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per token.
// Simdgroup s computes the logits of experts s, s + SG, ... (lanes stride over D in chunks of
// 8 values, one 16-byte load each of x and the weight row — mxfp4.h's load8 — then simd_sum)
// into threadgroup memory; after a barrier simdgroup 0 holds them as E/32 slots per
// lane and picks the top k with TOP_K rounds of simd_max / simd_min.
// Data: x [tokens, D] of T_; weight [E, D] of T_ (nn.Linear's layout); bias [E] of T_.
// indices [tokens, TOP_K] uint32; weights [tokens, TOP_K] of T_.
// Template: T_, D (a multiple of 8; the config makes hidden_size one of 32), E, TOP_K (<= E),
// SG (simdgroups: min(E, 32)).
// Fuses: four MLX dispatches into one (at decode each costs more than the work it does).
#include "mxfp4.h"
// ---- body ----
constexpr uint SLOTS = (E + 31) / 32;  // logits per lane in the selection
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint token = threadgroup_position_in_grid.y;

threadgroup float logits[E];

const device T_* x_row = x + size_t(token) * D;
for (uint e = sg; e < E; e += SG) {
  const device T_* w_row = weight + size_t(e) * D;
  float acc = 0.0f;
  for (uint c = lane; c < D / 8; c += 32) {
    float xv[8];
    float wv[8];
    load8(x_row + 8 * c, xv);
    load8(w_row + 8 * c, wv);
    for (uint n = 0; n < 8; ++n) {
      acc += xv[n] * wv[n];
    }
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    logits[e] = static_cast<float>(static_cast<T_>(acc + static_cast<float>(bias[e])));
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
float chosen[TOP_K];
for (uint j = 0; j < TOP_K; ++j) {
  // This lane's best remaining logit (slots rise in expert index: '>' keeps the lower one).
  float best = -INFINITY;
  uint best_expert = E;
  for (uint i = 0; i < SLOTS; ++i) {
    if (lane + 32 * i < E && slot[i] > best) {
      best = slot[i];
      best_expert = lane + 32 * i;
    }
  }
  const float top = simd_max(best);
  const uint winner = simd_min(best == top ? best_expert : uint(E));
  chosen[j] = top;
  for (uint i = 0; i < SLOTS; ++i) {
    if (lane + 32 * i == winner) {
      slot[i] = -INFINITY;  // taken
    }
  }
  if (lane == 0) {
    indices[size_t(token) * TOP_K + j] = winner;
  }
}
if (lane == 0) {
  float total = 0.0f;
  for (uint j = 0; j < TOP_K; ++j) {
    total += metal::exp(chosen[j] - chosen[0]);  // chosen[0] is the largest
  }
  for (uint j = 0; j < TOP_K; ++j) {
    weights[size_t(token) * TOP_K + j] = static_cast<T_>(metal::exp(chosen[j] - chosen[0]) / total);
  }
}
