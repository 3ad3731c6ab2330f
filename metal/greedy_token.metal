// greedy_token — the greedy sampler in one launch: each row's argmax of its logits plus the
// additive mask of the ids the model may not emit (0, or -inf for a reserved id), which only ids
// from FIRST on can be.
//
//   token[r] = the lowest i with logits[r, i] + mask[i] = max_j (logits[r, j] + mask[j]),
//   mask[i] = 0 below FIRST, banned[i - FIRST] from it    (as mx.argmax; a row of -inf gives 0)
//
// Grid (TG, ROWS, 1) threads, threadgroup (TG, 1, 1): one threadgroup per row. Thread t reads
// the 8 ids from 8 (t + k TG) on, for k = 0, 1, ... (8 loads in flight a thread), keeping its
// first best; the simdgroups, then simdgroup 0, reduce (value, id) pairs, the lower id winning a
// tie.
// Data: logits [ROWS, V] of T; banned [V - FIRST] of T; token [ROWS] uint32. Template: T, TG (a
// multiple of 32, at most 1024), FIRST.
// NaN counts as the highest value, as in mx.argmax (the first NaN's id; a reserved id's +inf
// plus the mask's -inf is NaN there too).
// Fuses: the mask's add and the argmax (two kernels a token, and no cast to float32 first: the
// add is exact in any float dtype and the comparison is the same in float32).

// Whether (a, ia) goes before (b, ib): the higher value (NaN highest), the lower id on a tie.
METAL_FUNC bool better(float a, uint ia, float b, uint ib) {
  const bool a_nan = metal::isnan(a);
  const bool b_nan = metal::isnan(b);
  if (a_nan || b_nan) {
    return a_nan && (!b_nan || ia < ib);
  }
  return a > b || (a == b && ia < ib);
}
// ---- body ----
constexpr uint WIDTH = 8;  // consecutive ids a thread reads at a time
const uint tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint row = threadgroup_position_in_grid.y;
const uint V = logits_shape[1];
const device T* x = logits + size_t(row) * V;

threadgroup float best_values[32];
threadgroup uint best_ids[32];

float best = -INFINITY;
uint id = 0;
for (uint base = WIDTH * tid; base < V; base += WIDTH * TG) {
  float v[WIDTH];
  for (uint j = 0; j < WIDTH; ++j) {
    v[j] = base + j < V ? static_cast<float>(x[base + j]) : -INFINITY;
  }
  for (uint j = 0; j < WIDTH; ++j) {
    const uint i = base + j;
    const float masked = i >= FIRST && i < V ? v[j] + static_cast<float>(banned[i - FIRST]) : v[j];
    if (better(masked, i, best, id)) {
      best = masked;
      id = i;
    }
  }
}
for (ushort delta = 16; delta > 0; delta /= 2) {
  const float other = simd_shuffle_down(best, delta);
  const uint other_id = simd_shuffle_down(id, delta);
  if (better(other, other_id, best, id)) {
    best = other;
    id = other_id;
  }
}
if (lane == 0) {
  best_values[sg] = best;
  best_ids[sg] = id;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg == 0) {
  best = lane < TG / 32 ? best_values[lane] : -INFINITY;
  id = lane < TG / 32 ? best_ids[lane] : 0;
  for (ushort delta = 16; delta > 0; delta /= 2) {
    const float other = simd_shuffle_down(best, delta);
    const uint other_id = simd_shuffle_down(id, delta);
    if (better(other, other_id, best, id)) {
      best = other;
      id = other_id;
    }
  }
  if (lane == 0) {
    token[row] = id;
  }
}
