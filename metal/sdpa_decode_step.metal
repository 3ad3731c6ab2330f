// sdpa_decode_step — decode attention for one token (batch 1) in one pass, over the layer's cache
// as it was before the token and the token's own key and value, taken from the qkv output; and
// the token's keys and values of every layer of this kind so far passed on, for one write a kind.
//
//   for q head h of KV head g, over the cached slots t visible at position p, then the token:
//     out_h = (sum_t e_t v_t + e_p v_p) / (sum_t e_t + e_p + exp(sink_h)),  e_t = exp(scale q_h . k_t)
//   (computed with the running maximum subtracted, as an online softmax)
//
// Grid (32 * GQA, KV_HEADS, 1) threads, threadgroup (32 * GQA, 1, 1): one threadgroup per KV
// head; simdgroup j is query head g * GQA + j. Each lane owns D/32 output dimensions.
// Data: q [HEADS, D] of T, the token's query heads; kv [2 KV_HEADS, D] of T, its key heads then
// value heads (qkv_rope_decode's output row, rotated). cache [1, 2 KV_HEADS, SLOTS, D] of T: the
// layer's keys (heads 0 .. KV_HEADS - 1) then values, before this token. position [1] int32: the
// token's position p; the cached slots visible are t < min(p, SLOTS), and on a ring (RING = 1:
// position q in slot q % SLOTS) not slot p % SLOTS, which holds position p - SLOTS, outside the
// window. sinks [HEADS] of S_T; scale float. pending [LAYERS, 2 KV_HEADS, D] of T: the keys and
// values of this token on the kind's earlier layers (rows < INDEX are read; at INDEX 0 any
// array: kv).
// out [HEADS, D] of T; passed [LAYERS, 2 KV_HEADS, D] of T: pending's rows < INDEX, then this
// layer's key and value heads as row INDEX, zeros after it.
// Template: T, S_T, D (a multiple of 32), GQA, RING (0 or 1), INDEX, LAYERS.
// Per tile of 32 slots the threadgroup stages K and V in threadgroup memory (K rows padded to D+1
// floats: no bank conflicts), lane i scores slot i for its query head; the token's own key is
// scored last, by a simd reduction over the lanes' dimensions.
// Fuses: the cache write of each layer (the caller writes every layer's key and value of a kind,
// `passed`, once, after the last), the sink, the normalisation, and GQA sharing of each K/V read.
// ---- body ----
constexpr uint TILE = 32;
constexpr uint DL = D / 32;  // output dimensions per lane
const uint lane = thread_index_in_simdgroup;
const uint j = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint threads = 32 * GQA;
const uint kv_head = threadgroup_position_in_grid.y;
const uint kv_heads = threadgroups_per_grid.y;
const uint head = kv_head * GQA + j;
const uint slots = cache_shape[2];
const uint p = uint(position[0]);
const uint n = metal::min(p, slots);
const uint skip = RING ? p % slots : slots;  // a ring's slot of position p - SLOTS; else none

threadgroup float q_tile[GQA * D];
threadgroup float k_tile[TILE * (D + 1)];
threadgroup float v_tile[TILE * D];

for (uint i = tid; i < GQA * D; i += threads) {
  q_tile[i] = static_cast<float>(q[size_t(kv_head) * GQA * D + i]) * scale;
}
const size_t key_offset = size_t(kv_head) * slots * D;
const size_t value_offset = size_t(kv_heads + kv_head) * slots * D;

float m = -INFINITY;
float l = 0.0f;
float acc[DL];
for (uint i = 0; i < DL; ++i) {
  acc[i] = 0.0f;
}
for (uint t0 = 0; t0 < n; t0 += TILE) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is no longer read (and q is staged)
  for (uint i = tid; i < TILE * D; i += threads) {
    const uint row = i / D;
    const uint col = i % D;
    const bool valid = t0 + row < n;
    const size_t at = size_t(t0 + row) * D + col;
    k_tile[row * (D + 1) + col] = valid ? static_cast<float>(cache[key_offset + at]) : 0.0f;
    v_tile[row * D + col] = valid ? static_cast<float>(cache[value_offset + at]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const bool mine = t0 + lane < n && t0 + lane != skip;
  float s = -INFINITY;
  if (mine) {
    s = 0.0f;
    for (uint d = 0; d < D; ++d) {
      s += q_tile[j * D + d] * k_tile[lane * (D + 1) + d];
    }
  }
  const float m_new = metal::max(m, simd_max(s));
  const float e = mine ? metal::exp(s - m_new) : 0.0f;
  const float correction = metal::exp(m - m_new);  // 0 while nothing was seen (m = -inf)
  l = l * correction + simd_sum(e);
  for (uint i = 0; i < DL; ++i) {
    acc[i] *= correction;
  }
  for (uint r = 0; r < TILE; ++r) {
    const float er = simd_shuffle(e, ushort(r));
    for (uint i = 0; i < DL; ++i) {
      acc[i] += er * v_tile[r * D + lane + 32 * i];
    }
  }
  m = m_new;
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // q staged (no tile when the cache is empty)

// The token's own key and value.
const device T* key = kv + size_t(kv_head) * D;
const device T* value = kv + size_t(kv_heads + kv_head) * D;
float dot = 0.0f;
for (uint i = 0; i < DL; ++i) {
  dot += q_tile[j * D + lane + 32 * i] * static_cast<float>(key[lane + 32 * i]);
}
const float s_own = simd_sum(dot);
const float m_own = metal::max(m, s_own);
const float e_own = metal::exp(s_own - m_own);
const float c_own = metal::exp(m - m_own);
l = l * c_own + e_own;
for (uint i = 0; i < DL; ++i) {
  acc[i] = acc[i] * c_own + e_own * static_cast<float>(value[lane + 32 * i]);
}

// The sink takes weight and adds no value.
const float sink = static_cast<float>(sinks[head]);
const float M = metal::max(m_own, sink);
const float w = metal::exp(m_own - M);
const float L = l * w + metal::exp(sink - M);
for (uint i = 0; i < DL; ++i) {
  out[size_t(head) * D + lane + 32 * i] = static_cast<T>(acc[i] * w / L);
}

// Passed on: the earlier layers' key and value heads of this KV head, then this layer's.
// (The later layers' rows are zeros.)
for (uint i = tid; i < LAYERS * 2 * D; i += threads) {
  const uint layer = i / (2 * D);
  const uint half = (i / D) % 2;  // 0: the key head, 1: the value head
  const uint d = i % D;
  const size_t row = (size_t(layer) * 2 * kv_heads + half * kv_heads + kv_head) * D + d;
  if (layer < INDEX) {
    passed[row] = pending[row];
  } else if (layer == INDEX) {
    passed[row] = half == 0 ? key[d] : value[d];
  } else {
    passed[row] = static_cast<T>(0.0f);
  }
}
