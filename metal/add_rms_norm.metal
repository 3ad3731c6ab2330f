// add_rms_norm — a residual add fused with the RMSNorm that follows it.
//
//   h = x + residual                                (rounded to T, exactly as the unfused add)
//   y = weight * T(h * rsqrt(mean(h^2) + eps))      (as mx.fast.rms_norm orders it)
//
// Grid (TG, rows, 1) threads, threadgroup (TG, 1, 1): one threadgroup per row; TG a multiple
// of 32, at most 1024 (the launcher picks enough threads for one column each, at most 1024).
// Data: x, residual, h, y row-major [rows, D] of T; weight [D] of T; eps a float scalar.
// Template: T (activation dtype), D (row length), TG (threads per threadgroup).
// At decode a row is one 2880-vector: the kernel's time is latency, not bytes. So each thread
// issues every load of its columns tid, tid + TG, ... (x, residual, weight) before any store or
// reduction, holds h in registers, and stores h and y once: one round trip to memory instead
// of one per column (a store to h between loads of x would order them). sum(h^2) is reduced
// with simd_sum, then across simdgroups through threadgroup memory.
// Fuses: the add and the norm (two dispatches -> one).

// ---- body ----
constexpr uint PER = (D + TG - 1) / TG;  // columns per thread
const uint row = threadgroup_position_in_grid.y;
const uint tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint simd_id = simdgroup_index_in_threadgroup;
threadgroup float partial[32];
threadgroup float total[1];

const device T* x_row = x + size_t(row) * D;
const device T* r_row = residual + size_t(row) * D;
device T* h_row = h + size_t(row) * D;
device T* y_row = y + size_t(row) * D;

float hv[PER];
float wv[PER];
float sumsq = 0.0f;
for (uint k = 0; k < PER; ++k) {
  const uint i = tid + TG * k;
  hv[k] = 0.0f;
  wv[k] = 0.0f;
  if (i < D) {
    hv[k] = static_cast<float>(static_cast<T>(static_cast<float>(x_row[i]) + static_cast<float>(r_row[i])));
    wv[k] = static_cast<float>(weight[i]);
  }
  sumsq += hv[k] * hv[k];
}
sumsq = simd_sum(sumsq);
if (lane == 0) {
  partial[simd_id] = sumsq;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (simd_id == 0) {
  float v = lane < TG / 32 ? partial[lane] : 0.0f;
  v = simd_sum(v);
  if (lane == 0) {
    total[0] = v;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float inv = metal::precise::rsqrt(total[0] / float(D) + eps);
for (uint k = 0; k < PER; ++k) {
  const uint col = tid + TG * k;
  if (col < D) {
    const T hi = static_cast<T>(hv[k]);
    h_row[col] = hi;
    const T normed = static_cast<T>(hv[k] * inv);
    y_row[col] = static_cast<T>(wv[k] * static_cast<float>(normed));
  }
}
