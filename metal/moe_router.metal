// moe_router — the MoE router of a few tokens in one launch: the router's logits, the top-k
// experts and the softmax over their logits (MLX's path: addmm, argsort, take, softmax).
//
//   logit_e = T_(x . W_e + b_e)          rounded to T_ as nn.Linear's output is (the reference
//                                         model computes its router in bf16 too)
//   indices = the TOP_K largest logits, highest first (the lower expert on a tie)
//   weights = T_(softmax(logit_indices))  computed in float, stored as float
//
// Grid (32 * SG, tokens, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per token,
// SG = ceil(D / 256) simdgroups, so that thread c holds chunk c (8 values) of x. For each block
// of EB experts a thread forms its EB partial dot products (router.h: the block's weight loads
// in flight together), each simdgroup's simd_sum goes to threadgroup memory, where thread e adds
// the SG partials of expert e (in simdgroup order) and the bias. After the last block
// simdgroup 0 holds the logits as E/32 slots per lane and picks the top k (router.h).
// Data: x [tokens, D] of T_; weight [E, D] of T_ (nn.Linear's layout); bias [E] of T_.
// indices [tokens, TOP_K] uint32; weights [tokens, TOP_K] float32 (values of T_).
// Template: T_, D (a multiple of 8, at most 8192; the config makes hidden_size one of 32), E,
// TOP_K (<= E), SG.
// Fuses: four MLX dispatches into one (at decode each costs more than the work it does).
#include "router.h"
// ---- body ----
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
if (c < D / 8) {
  load8(x + size_t(token) * D + 8 * c, xv);
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
