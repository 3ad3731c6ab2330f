// mx_blocks.h — the variants' helper next to metal/mxfp4.h: whole MX blocks (uint4) of N rows.

// One MX block (32 values: the 4 words of a uint4) of each of N rows, q[0..N-1], dotted with the
// same x[0..31] (x read and converted once for all N), unscaled: out[0..N-1].
template <uint N, typename T>
METAL_FUNC void dot32_rows(thread const uint4* q, const device T* x, thread float* out) {
  float xv[8];
  load8(x, xv);
  for (uint r = 0; r < N; ++r) {
    out[r] = dot8(q[r].x, xv);
  }
  load8(x + 8, xv);
  for (uint r = 0; r < N; ++r) {
    out[r] += dot8(q[r].y, xv);
  }
  load8(x + 16, xv);
  for (uint r = 0; r < N; ++r) {
    out[r] += dot8(q[r].z, xv);
  }
  load8(x + 24, xv);
  for (uint r = 0; r < N; ++r) {
    out[r] += dot8(q[r].w, xv);
  }
}
