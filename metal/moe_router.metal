// moe_router — the MoE router of a few tokens in one launch: the router's logits, the top-k
// experts and the softmax over their logits (MLX's path: addmm, argsort, take, softmax).
//
//   logit_e = T_(x . W_e + b_e)          rounded to T_ as nn.Linear's output is (the reference
//                                         model computes its router in bf16 too)
//   indices = the TOP_K largest logits, highest first (the lower expert on a tie)
//   weights = T_(softmax(logit_indices))  computed in float
//
// Grid (32 * SG, tokens, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per token,
// SG = ceil(D / 256) simdgroups, so that thread c holds chunk c (8 values) of x. For each block
// of EB experts a thread first loads its chunk of all EB weight rows (8 loads in flight together:
// at decode the router's time is latency, not bytes), forms its EB partial dot products, and
// each simdgroup's simd_sum goes to threadgroup memory, where thread e adds the SG partials of
// expert e (in simdgroup order) and the bias. After the last block simdgroup 0 holds the logits
// as E/32 slots per lane and picks the top k with TOP_K rounds of simd_max / simd_min.
// Data: x [tokens, D] of T_; weight [E, D] of T_ (nn.Linear's layout); bias [E] of T_.
// indices [tokens, TOP_K] uint32; weights [tokens, TOP_K] of T_.
// Template: T_, D (a multiple of 8, at most 8192; the config makes hidden_size one of 32), E,
// TOP_K (<= E), SG.
// Fuses: four MLX dispatches into one (at decode each costs more than the work it does).
#include "mxfp4.h"
// ---- body ----
constexpr uint CHUNKS = D / 8;
constexpr uint EB = E < 8 ? E : 8;  // experts per block
constexpr uint SLOTS = (E + 31) / 32;  // logits per lane in the selection
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint c = thread_index_in_threadgroup;  // this thread's chunk of x
const uint token = threadgroup_position_in_grid.y;

threadgroup float partial[SG * EB];  // [simdgroup][expert of the block]
threadgroup float logits[E];

float xv[8];
for (uint n = 0; n < 8; ++n) {
  xv[n] = 0.0f;
}
if (c < CHUNKS) {
  load8(x + size_t(token) * D + 8 * c, xv);
}
for (uint e0 = 0; e0 < E; e0 += EB) {
  float wv[8 * EB];  // [expert][value]: every load of the block first
  for (uint k = 0; k < EB; ++k) {
    float v[8];
    for (uint n = 0; n < 8; ++n) {
      v[n] = 0.0f;
    }
    if (c < CHUNKS && e0 + k < E) {
      load8(weight + size_t(e0 + k) * D + 8 * c, v);
    }
    for (uint n = 0; n < 8; ++n) {
      wv[8 * k + n] = v[n];
    }
  }
  for (uint k = 0; k < EB; ++k) {
    float acc = 0.0f;
    for (uint n = 0; n < 8; ++n) {
      acc += xv[n] * wv[8 * k + n];
    }
    acc = simd_sum(acc);
    if (lane == 0) {
      partial[sg * EB + k] = acc;
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
