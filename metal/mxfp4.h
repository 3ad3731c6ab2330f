// mxfp4.h — MXFP4 helpers shared by the expert kernels (included by moe_*.metal).
//
// Layout (the checkpoints' and MLX's, byte-identical): a row of K values is K/8 uint32 words of
// packed E2M1 nibbles — element 8w + n in nibble n (low first) of word w — and K/32 E8M0 scale
// bytes (2^(s - 127)), one per 32-value block (4 words), in a separate [rows, K/32] array.
// The expert kernels give each lane whole blocks: lane l of a simdgroup takes blocks l, l + 32,
// ... (16 bytes of weights and a scale byte each), so a simdgroup's loads of a row are 512
// contiguous bytes and 32 consecutive scale bytes, and its loads of x 2 KB (bf16).

// E2M1 -> half, two at a time: nibbles n and n+4 of a word sit at the same offset in its two
// 16-bit halves, so one shift-and-mask places both magnitudes (3 bits) into a half's exponent
// and mantissa (bits 9-11) and both signs into bit 15 (MLX's fp4.h trick, paired as in
// gpt-oss's Metal kernel). The halves hold value * 2^-14; e2m1_unit() folds 2^14 back.
METAL_FUNC half2 e2m1_pair(uint q, uint n) {
  const uint t = q >> (4 * n);
  return as_type<half2>(((t << 9) & 0x0E000E00u) | ((t << 12) & 0x80008000u));
}

// The block scale 2^(s - 127) (s = 0 reads as 0). Not times 2^14 for e2m1_pair: that overflowed
// float from s = 241 (2^128), so blocks of large scale gave inf and NaN where the values are finite.
METAL_FUNC float mxfp4_scale(uint s) {
  return as_type<float>(s << 23);
}

// A finished dot product of e2m1_pair values (all its blocks scaled, summed over the simdgroup)
// in the values' own units: times 2^14, exact, and inf only where the value is.
METAL_FUNC float e2m1_unit(float sum) {
  return sum * 16384.0f;
}

// Eight consecutive activations as floats, in one 16-byte load for 16-bit types (p is 16-byte
// aligned: rows are multiples of 32 values and p advances by 8).
METAL_FUNC void load8(const device float* p, thread float* out) {
  const float4 a = ((const device float4*)p)[0];
  const float4 b = ((const device float4*)p)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

METAL_FUNC void load8(const device half* p, thread float* out) {
  const uint4 q = *(const device uint4*)p;
  const uint words[4] = {q.x, q.y, q.z, q.w};
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = static_cast<float>(as_type<half>(ushort(words[k] & 0xffffu)));
    out[2 * k + 1] = static_cast<float>(as_type<half>(ushort(words[k] >> 16)));
  }
}

METAL_FUNC void load8(const device bfloat16_t* p, thread float* out) {
  const uint4 q = *(const device uint4*)p;
  const uint words[4] = {q.x, q.y, q.z, q.w};
  for (int k = 0; k < 4; ++k) {  // a bfloat16 is the top half of a float32
    out[2 * k] = as_type<float>(words[k] << 16);
    out[2 * k + 1] = as_type<float>(words[k] & 0xffff0000u);
  }
}

// Dot product of one packed word (8 values) with xv[0 .. 7], unscaled: a chain of fused
// multiply-adds (two per pair of values; no separate multiply and add).
METAL_FUNC float dot8(uint q, thread const float* xv) {
  half2 w = e2m1_pair(q, 0);
  float acc = static_cast<float>(w.x) * xv[0];
  acc = metal::fma(static_cast<float>(w.y), xv[4], acc);
  for (uint n = 1; n < 4; ++n) {
    w = e2m1_pair(q, n);
    acc = metal::fma(static_cast<float>(w.x), xv[n], acc);
    acc = metal::fma(static_cast<float>(w.y), xv[n + 4], acc);
  }
  return acc;
}

// Word i (0-3, a compile-time constant after unrolling) of a block's four: q.x, q.y, q.z, q.w.
METAL_FUNC uint word_of(uint4 q, uint i) {
  return i == 0 ? q.x : (i == 1 ? q.y : (i == 2 ? q.z : q.w));
}
