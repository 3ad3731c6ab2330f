// sdpa_decode_combine — decode attention, pass 2 of flash-decoding: merges the partitions of
// sdpa_decode_partial and the learned sink of each query head into the output.
//
//   M = max(sink_h, max_p m_p),  L = exp(sink_h - M) + sum_p l_p exp(m_p - M)
//   out_h = sum_p acc_p exp(m_p - M) / L          (the sink takes weight, adds no value)
//
// Grid (32, HEADS, 1) threads, threadgroup (32, 1, 1): one simdgroup per query head; each lane
// owns D/32 output dimensions. The partitions go 32 at a time: lane p loads partition p's m
// and l (all loads of a turn in flight together, not one after another), the maximum and the
// sum are simd reductions, and each partition's weight reaches the lanes by a shuffle.
// Data: partial [HEADS, P, D + 2] float32 (m, l, acc[D]), P read from its shape (no scalar
// input: on CUDA one would live in MLX's pool of small arrays); sinks [HEADS] of S_T. A
// partition with no keys is (-inf, 0, 0) and adds nothing.
// out [HEADS, D] of T. Template: T, S_T (the sinks' dtype), D (a multiple of 32).
// Fuses: the sink column of the softmax and the final normalisation.
// ---- body ----
constexpr uint DL = D / 32;
const uint lane = thread_index_in_simdgroup;
const uint head = threadgroup_position_in_grid.y;
const int n_parts = partial_shape[1];
const device float* base = partial + size_t(head) * n_parts * (D + 2);
const float sink = static_cast<float>(sinks[head]);
float M = sink;
for (int p0 = 0; p0 < n_parts; p0 += 32) {
  const int p = p0 + int(lane);
  M = metal::max(M, simd_max(p < n_parts ? base[p * (D + 2)] : -INFINITY));
}
float L = metal::exp(sink - M);
float acc[DL];
for (uint i = 0; i < DL; ++i) {
  acc[i] = 0.0f;
}
for (int p0 = 0; p0 < n_parts; p0 += 32) {
  const int p = p0 + int(lane);
  // exp(-inf - M) = 0: an empty partition (m = -inf, l = 0) weighs nothing
  const float w = p < n_parts ? metal::exp(base[p * (D + 2)] - M) : 0.0f;
  L += simd_sum(p < n_parts ? base[p * (D + 2) + 1] * w : 0.0f);
  const int turn = metal::min(32, n_parts - p0);
  for (int q = 0; q < turn; ++q) {
    const float wq = simd_shuffle(w, ushort(q));
    const device float* part = base + (p0 + q) * (D + 2);
    for (uint i = 0; i < DL; ++i) {
      acc[i] += part[2 + lane + 32 * i] * wq;
    }
  }
}
for (uint i = 0; i < DL; ++i) {
  out[size_t(head) * D + lane + 32 * i] = static_cast<T>(acc[i] / L);
}
