// sdpa_decode_step — decode attention for one token (batch 1) in one pass, over the layer's cache
// as it was before the token and the token's own key and value, taken from the qkv output; and
// the token's keys and values of every layer of this kind so far passed on, for one write a kind.
//
//   for query head h of KV head g = h / GQA, over the cached slots t visible at position p and
//   then the token's own key and value:
//     out_h = (sum_t e_t v_t + e_p v_p) / (sum_t e_t + e_p + exp(sink_h)),  e_t = exp(scale q_h . k_t)
//   (computed with the running maximum subtracted, as an online softmax)
//
// Grid (32 * SG, HEADS, 1) threads, threadgroup (32 * SG, 1, 1): one threadgroup per query head.
// Simdgroup s takes keys s, s + SG, ... of the n visible slots and then the token's own (key n),
// one key at a time: each lane holds D/32 of the head's dimensions and the score is a simd_sum.
// The SG simdgroups' running (max, sum, acc) meet in threadgroup memory, where simdgroup 0
// merges them with the sink. (MLX's one-pass vector attention does the same per query head.)
// Data: q [HEADS, D] of T, the token's query heads; kv [2 KV_HEADS, D] of T, its key heads then
// value heads (qkv_rope_decode's output row, rotated). cache [1, 2 KV_HEADS, SLOTS, D] of T: the
// layer's keys (heads 0 .. KV_HEADS - 1) then values, before this token. position [1] int32: the
// token's position p; the cached slots visible are t < min(p, SLOTS), and on a ring (RING = 1:
// position q in slot q % SLOTS) not slot p % SLOTS, which holds position p - SLOTS, outside the
// window. sinks [HEADS] of S_T; scale float. pending [LAYERS, 2 KV_HEADS, D] of T: the keys and
// values of this token on the kind's earlier layers (rows < INDEX are read; at INDEX 0 any
// array: kv).
// out [HEADS, D] of T; passed [LAYERS, 2 KV_HEADS, D] of T: pending's rows < INDEX, then this
// layer's key and value heads as row INDEX, zeros after it (spread over all threadgroups).
// Template: T, S_T, D (a multiple of 32), SG (simdgroups, at most 32), RING (0 or 1), INDEX, LAYERS.
// Fuses: the cache write of each layer (the caller writes every layer's key and value of a kind,
// `passed`, once, after the last), the sink and the normalisation.
// ---- body ----
constexpr uint DL = D / 32;  // dimensions per lane
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint head = threadgroup_position_in_grid.y;
const uint heads = threadgroups_per_grid.y;
const uint kv_heads = kv_shape[0] / 2;
const uint kv_head = head / (heads / kv_heads);
const uint slots = cache_shape[2];
const uint p = uint(position[0]);
const uint n = metal::min(p, slots);
const uint skip = RING ? p % slots : slots;  // a ring's slot of position p - SLOTS; else none

threadgroup float maxima[32];
threadgroup float sums[32];
threadgroup float accs[32 * D];

float qd[DL];
for (uint e = 0; e < DL; ++e) {
  qd[e] = static_cast<float>(q[size_t(head) * D + lane * DL + e]) * scale;
}
const device T* own_key = kv + size_t(kv_head) * D;
const device T* own_value = kv + size_t(kv_heads + kv_head) * D;
const size_t key_base = size_t(kv_head) * slots * D;
const size_t value_base = size_t(kv_heads + kv_head) * slots * D;

float m = -INFINITY;
float l = 0.0f;
float acc[DL];
for (uint e = 0; e < DL; ++e) {
  acc[e] = 0.0f;
}
for (uint t = sg; t <= n; t += SG) {  // t == n: the token's own key (t is the simdgroup's: uniform)
  if (t < n && t == skip) {
    continue;
  }
  const device T* key = t < n ? cache + key_base + size_t(t) * D : own_key;
  const device T* value = t < n ? cache + value_base + size_t(t) * D : own_value;
  float dot = 0.0f;
  for (uint e = 0; e < DL; ++e) {
    dot += qd[e] * static_cast<float>(key[lane * DL + e]);
  }
  const float s = simd_sum(dot);
  const float m_new = metal::max(m, s);
  const float correction = metal::exp(m - m_new);  // 0 while nothing was seen (m = -inf)
  const float weight = metal::exp(s - m_new);
  l = l * correction + weight;
  for (uint e = 0; e < DL; ++e) {
    acc[e] = acc[e] * correction + weight * static_cast<float>(value[lane * DL + e]);
  }
  m = m_new;
}
if (lane == 0) {
  maxima[sg] = m;
  sums[sg] = l;
}
for (uint e = 0; e < DL; ++e) {
  accs[sg * D + lane * DL + e] = acc[e];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// Simdgroup 0 merges the SG partial sums with the sink (which takes weight and adds no value).
if (sg == 0) {
  const float mi = lane < SG ? maxima[lane] : -INFINITY;
  const float sink = static_cast<float>(sinks[head]);
  const float M = metal::max(simd_max(mi), sink);
  const float w = metal::exp(mi - M);  // 0 for a simdgroup that saw no key
  const float L = simd_sum(lane < SG ? sums[lane] * w : 0.0f) + metal::exp(sink - M);
  float o[DL];
  for (uint e = 0; e < DL; ++e) {
    o[e] = 0.0f;
  }
  for (uint i = 0; i < SG; ++i) {
    const float wi = simd_shuffle(w, ushort(i));
    for (uint e = 0; e < DL; ++e) {
      o[e] += accs[i * D + lane * DL + e] * wi;
    }
  }
  for (uint e = 0; e < DL; ++e) {
    out[size_t(head) * D + lane * DL + e] = static_cast<T>(o[e] / L);
  }
}

// Passed on: the earlier layers' keys and values, then this layer's, then zeros.
const uint row_size = 2 * kv_heads * D;
for (uint i = head * 32 * SG + tid; i < LAYERS * row_size; i += heads * 32 * SG) {
  const uint layer = i / row_size;
  if (layer < INDEX) {
    passed[i] = pending[i];
  } else if (layer == INDEX) {
    passed[i] = kv[i % row_size];
  } else {
    passed[i] = static_cast<T>(0.0f);
  }
}
