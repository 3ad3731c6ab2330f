// sdpa_decode_partial — decode attention with GQA, pass 1 of flash-decoding: one partition of
// the keys, all query heads of one KV head, each key and value read from memory once.
//
//   for q head h of KV head g, keys t in [p*CHUNK, min((p+1)*CHUNK, n_keys)):
//     m = max_t s_t,  l = sum_t exp(s_t - m),  acc = sum_t exp(s_t - m) * v_t,  s_t = scale * q_h . k_t
//
// Grid (32 * GQA, KV_HEADS, P) threads, threadgroup (32 * GQA, 1, 1): one threadgroup per
// (KV head, partition of CHUNK keys); simdgroup j is query head g * GQA + j.
// Data: q [HEADS, D] of T; k, v: the cache buffers [1, KV_HEADS, CAPACITY, D] of T (whole buffers,
// the first n_keys positions valid: a full layer's growing cache or a sliding layer's 128-slot
// ring, whose order does not matter at decode); scale float; n_keys int.
// partial [HEADS, P, D + 2] float32: (m, l, acc[D]). Template: T, D (a multiple of 32), GQA,
// CHUNK (keys per partition, a multiple of TILE).
// Per tile of 32 keys the threadgroup stages K and V in threadgroup memory (K rows padded to D+1
// floats: no bank conflicts), lane i scores key i for its query head, and the online softmax
// rescales the running sums; each lane owns D/32 output dimensions. sdpa_decode_combine merges
// the partitions and the sink.
// Fuses: sharing each K/V read across the GQA query heads (MLX's 1-pass vector kernel re-reads
// K/V per query head), and splitting long caches across threadgroups.
// ---- body ----
constexpr uint TILE = 32;
constexpr uint DL = D / 32;  // output dimensions per lane
const uint lane = thread_index_in_simdgroup;
const uint j = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint threads = 32 * GQA;
const uint kv_head = threadgroup_position_in_grid.y;
const uint part = threadgroup_position_in_grid.z;
const uint n_parts = threadgroups_per_grid.z;
const uint head = kv_head * GQA + j;
const uint capacity = k_shape[2];

threadgroup float q_tile[GQA * D];
threadgroup float k_tile[TILE * (D + 1)];
threadgroup float v_tile[TILE * D];

for (uint i = tid; i < GQA * D; i += threads) {
  q_tile[i] = static_cast<float>(q[size_t(kv_head) * GQA * D + i]) * scale;
}
const size_t head_offset = size_t(kv_head) * capacity * D;
const uint start = part * CHUNK;
const uint end = metal::min(start + CHUNK, uint(n_keys));

float m = -INFINITY;
float l = 0.0f;
float acc[DL];
for (uint i = 0; i < DL; ++i) {
  acc[i] = 0.0f;
}
for (uint t0 = start; t0 < end; t0 += TILE) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is no longer read
  for (uint i = tid; i < TILE * D; i += threads) {
    const uint row = i / D;
    const uint col = i % D;
    const bool valid = t0 + row < end;
    const size_t at = head_offset + size_t(t0 + row) * D + col;
    k_tile[row * (D + 1) + col] = valid ? static_cast<float>(k[at]) : 0.0f;
    v_tile[row * D + col] = valid ? static_cast<float>(v[at]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const bool mine = t0 + lane < end;
  float s = -INFINITY;
  if (mine) {
    s = 0.0f;
    for (uint d = 0; d < D; ++d) {
      s += q_tile[j * D + d] * k_tile[lane * (D + 1) + d];
    }
  }
  const float m_new = metal::max(m, simd_max(s));
  const float p = mine ? metal::exp(s - m_new) : 0.0f;
  const float correction = metal::exp(m - m_new);  // 0 on the first tile (m = -inf)
  l = l * correction + simd_sum(p);
  for (uint i = 0; i < DL; ++i) {
    acc[i] *= correction;
  }
  for (uint r = 0; r < TILE; ++r) {
    const float pr = simd_shuffle(p, ushort(r));
    for (uint i = 0; i < DL; ++i) {
      acc[i] += pr * v_tile[r * D + lane + 32 * i];
    }
  }
  m = m_new;
}
device float* out = partial + (size_t(head) * n_parts + part) * (D + 2);
if (lane == 0) {
  out[0] = m;
  out[1] = l;
}
for (uint i = 0; i < DL; ++i) {
  out[2 + lane + 32 * i] = acc[i];
}
