// router.h — the MoE router's pieces, shared by moe_router.metal and add_rms_norm_route.metal.
#include "mxfp4.h"

// The partial logits acc[k] = xv . weight[e0 + k, 8c .. 8c + 8) of the block of EB experts from
// e0, for this thread's chunk c of x (zero past E or past the row). Every weight load of the
// block is issued before any is used: at decode the router's time is latency, not bytes.
template <typename T, int D, int E, int EB>
METAL_FUNC void router_block(const device T* weight, uint e0, uint c, thread const float* xv, thread float* acc) {
  float wv[8 * EB];  // [expert][value]
  for (uint k = 0; k < EB; ++k) {
    float v[8];
    for (uint n = 0; n < 8; ++n) {
      v[n] = 0.0f;
    }
    if (c < D / 8 && e0 + k < E) {
      load8(weight + size_t(e0 + k) * D + 8 * c, v);
    }
    for (uint n = 0; n < 8; ++n) {
      wv[8 * k + n] = v[n];
    }
  }
  for (uint k = 0; k < EB; ++k) {
    acc[k] = 0.0f;
    for (uint n = 0; n < 8; ++n) {
      acc[k] += xv[n] * wv[8 * k + n];
    }
  }
}

// The TOP_K largest of E logits, highest first (the lower expert on a tie), and the softmax
// over them, by one simdgroup with all lanes active: slot[i] holds expert lane + 32 i's logit
// (SLOTS = ceil(E / 32) of them); lane 0 writes indices[0 .. TOP_K) and weights[0 .. TOP_K), each
// rounded to T and stored as float (MLX-CUDA keeps arrays of 8 bytes or less, as 4 weights of a
// 16-bit type, in managed memory the host writes: the expert kernel reading them waited on a page).
template <typename T, int E, int TOP_K>
METAL_FUNC void select_top_k(thread float* slot, uint lane, device uint32_t* indices, device float* weights) {
  constexpr uint SLOTS = (E + 31) / 32;
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
      // No logit above -inf left (a NaN row: NaN > x is false) leaves winner = E, one past the
      // last expert, which the expert kernels and the pool would index with: expert j instead
      // (the weights come out NaN, so the outputs do, as on MLX's path).
      indices[j] = winner < E ? winner : j;
    }
  }
  if (lane == 0) {
    float total = 0.0f;
    for (uint j = 0; j < TOP_K; ++j) {
      total += metal::exp(chosen[j] - chosen[0]);  // chosen[0] is the largest
    }
    for (uint j = 0; j < TOP_K; ++j) {
      weights[j] = static_cast<float>(static_cast<T>(metal::exp(chosen[j] - chosen[0]) / total));
    }
  }
}
