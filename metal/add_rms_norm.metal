// add_rms_norm — a residual add fused with the RMSNorm that follows it.
//
//   h = x + residual                                (rounded to T, exactly as the unfused add)
//   y = weight * T(h * rsqrt(mean(h^2) + eps))      (as mx.fast.rms_norm orders it)
//
// Grid (TG, rows, 1) threads, threadgroup (TG, 1, 1): one threadgroup per row; TG a multiple
// of 32, at most 1024 (the launcher picks 256, or less for short rows).
// Data: x, residual, h, y row-major [rows, D] of T; weight [D] of T; eps a float scalar.
// Template: T (activation dtype), D (row length).
// Each thread takes columns tid, tid + TG, ...: writes h, accumulates sum(h^2) in float; the
// sum is reduced with simd_sum, then across simdgroups through threadgroup memory.
// Fuses: the add and the norm (two dispatches -> one; h is read back by the thread that wrote it).

// ---- body ----
const uint row = threadgroup_position_in_grid.y;
const uint tid = thread_index_in_threadgroup;
const uint tg_size = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint simd_id = simdgroup_index_in_threadgroup;
threadgroup float partial[32];
threadgroup float total[1];

const device T* x_row = x + size_t(row) * D;
const device T* r_row = residual + size_t(row) * D;
device T* h_row = h + size_t(row) * D;
device T* y_row = y + size_t(row) * D;

float sumsq = 0.0f;
for (uint i = tid; i < D; i += tg_size) {
  const T hi = static_cast<T>(static_cast<float>(x_row[i]) + static_cast<float>(r_row[i]));
  h_row[i] = hi;
  const float hf = static_cast<float>(hi);
  sumsq += hf * hf;
}
sumsq = simd_sum(sumsq);
if (lane == 0) {
  partial[simd_id] = sumsq;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (simd_id == 0) {
  float v = lane < tg_size / 32 ? partial[lane] : 0.0f;
  v = simd_sum(v);
  if (lane == 0) {
    total[0] = v;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float inv = metal::precise::rsqrt(total[0] / float(D) + eps);
for (uint i = tid; i < D; i += tg_size) {
  const T normed = static_cast<T>(static_cast<float>(h_row[i]) * inv);
  y_row[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
}
