// sdpa_prefill — attention of a prefill chunk with GQA and learned sinks, causal, optionally
// within a sliding window, without a mask array: each query block visits only the key tiles
// its queries can see, so a sliding layer costs O(L * WINDOW) instead of O(L * K).
//
//   query i (key index i + K - L) sees key j when  j <= i + K - L  and, if WINDOW > 0,
//   j > i + K - L - WINDOW (exactly WINDOW keys, its own included);
//   out_i = sum_j exp(s_ij - M) v_j / (exp(sink_h - M) + sum_j exp(s_ij - M)),  s_ij = scale q_i . k_j
//
// Grid (32 * GQA * BQ * n_blocks, KV_HEADS, 1) threads, threadgroup (32 * GQA * BQ, 1, 1): one
// threadgroup per (block of BQ consecutive queries, KV head); simdgroup sg is query
// block * BQ + sg / GQA of query head kv_head * GQA + sg % GQA.
// Data: q [HEADS, L, D] of T (after RoPE); k, v [KV_HEADS, K, D] of T, K >= L: the keys the chunk
// attends to in position order, ending at the chunk's last token; sinks [HEADS] of S_T; scale
// float. out [L, HEADS, D] of T: token-major, the layout o_proj reads (no transpose after).
// Template: T, S_T, D (a multiple of 32), GQA, BQ, WINDOW (0: causal over all keys).
// Per tile of 32 keys the threadgroup stages K and V in threadgroup memory (K rows padded to D+1
// floats: no bank conflicts), shared by the GQA * BQ (head, query) pairs; lane i scores key i,
// an online softmax keeps (m, l) per simdgroup and each lane owns D/32 output dimensions. A
// simdgroup skips a tile none of whose keys its query sees; the sink joins at the end.
// Fuses: the window and causal masks (computed from indices), the sink column, the softmax
// normalisation and the transpose to token-major output.
// ---- body ----
constexpr uint TILE = 32;
constexpr uint DL = D / 32;  // output dimensions per lane
constexpr uint PAIRS = GQA * BQ;  // (query head, query) pairs per threadgroup, one per simdgroup
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const uint threads = 32 * PAIRS;
const uint kv_head = threadgroup_position_in_grid.y;
const uint heads = q_shape[0];
const int L = q_shape[1];
const int K = k_shape[1];
const int shift = K - L;  // key index of query 0

const uint head = kv_head * GQA + sg % GQA;
const int first = threadgroup_position_in_grid.x * BQ;  // first query of the block
const int query = first + sg / GQA;
const bool live = query < L;  // uniform within the simdgroup
const int newest = query + shift;  // the last key this query sees
const int oldest = WINDOW > 0 ? newest - int(WINDOW) + 1 : 0;

threadgroup float q_tile[PAIRS * D];
threadgroup float k_tile[TILE * (D + 1)];
threadgroup float v_tile[TILE * D];

for (uint d = lane; d < D; d += 32) {
  q_tile[sg * D + d] = live ? static_cast<float>(q[(size_t(head) * L + query) * D + d]) * scale : 0.0f;
}
// The keys the whole block sees: [key_start, key_end).
const int block_last = metal::min(first + int(BQ), L) - 1 + shift;
const int key_start = WINDOW > 0 ? metal::max(0, first + shift - int(WINDOW) + 1) : 0;
const int key_end = block_last + 1;
const size_t head_offset = size_t(kv_head) * K * D;

float m = -INFINITY;
float l = 0.0f;
float acc[DL];
for (uint i = 0; i < DL; ++i) {
  acc[i] = 0.0f;
}
for (int t0 = key_start; t0 < key_end; t0 += TILE) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // q staged; the previous tile no longer read
  for (uint i = tid; i < TILE * D; i += threads) {
    const uint row = i / D;
    const uint col = i % D;
    const bool valid = t0 + int(row) < key_end;
    const size_t at = head_offset + size_t(t0 + int(row)) * D + col;
    k_tile[row * (D + 1) + col] = valid ? static_cast<float>(k[at]) : 0.0f;
    v_tile[row * D + col] = valid ? static_cast<float>(v[at]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (!live || t0 > newest || t0 + int(TILE) <= oldest) {
    continue;  // no key of this tile is visible to this simdgroup's query
  }
  const int key = t0 + int(lane);
  const bool visible = key >= oldest && key <= newest;
  float s = -INFINITY;
  if (visible) {
    s = 0.0f;
    for (uint d = 0; d < D; ++d) {
      s += q_tile[sg * D + d] * k_tile[lane * (D + 1) + d];
    }
  }
  const float m_new = metal::max(m, simd_max(s));  // finite: the tile has a visible key
  const float p = visible ? metal::exp(s - m_new) : 0.0f;
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
if (live) {
  // The sink: one more softmax column that takes weight and adds no value.
  const float sink = static_cast<float>(sinks[head]);
  const float M = metal::max(m, sink);
  const float w = metal::exp(m - M);
  const float denominator = l * w + metal::exp(sink - M);
  for (uint i = 0; i < DL; ++i) {
    out[(size_t(query) * heads + head) * D + lane + 32 * i] = static_cast<T>(acc[i] * w / denominator);
  }
}
