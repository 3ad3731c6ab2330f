// msl_cuda.h — compiles a Metal kernel body with mx.fast.cuda_kernel (the CUDA mirror).
//
// MLX places this header after its own CUDA includes and before the kernel, which lives in
// namespace mlx::core::cu (mlx/backend/cuda/custom_kernel.cpp). gptoss_mlx/kernels/launch.py
// prepends to the body the Metal thread attributes it uses (from threadIdx/blockIdx) and reads
// scalar inputs, which CUDA passes as pointers, back under their own names.
// A simdgroup is a warp (32 lanes); simd_* are warp shuffles over the full mask, so they need
// all 32 lanes active — the same rule metal/msl_emulate.h enforces. Supported subset:
// metal/README.md.
#pragma once

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef __half half;
typedef __half float16_t;
typedef __half2 half2;
typedef __nv_bfloat16 bfloat16_t;
struct __align__(8) half4 {
  __half x, y, z, w;
};

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef FLT_MAX
#define FLT_MAX 3.40282346638528859812e+38F
#endif

#define device
#define constant
#define thread
#define threadgroup __shared__
#define METAL_FUNC __device__ __forceinline__

template <typename T, typename U>
__device__ __forceinline__ T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T t;
  memcpy(&t, &u, sizeof(T));
  return t;
}

namespace metal {
#define MSL_MATH(name, impl) \
  __device__ __forceinline__ float name(float x) { return impl(x); }
#define MSL_MATH_SET(exp_impl)                                                            \
  MSL_MATH(exp, exp_impl) MSL_MATH(exp2, ::exp2f) MSL_MATH(log, ::logf)                   \
  MSL_MATH(log2, ::log2f) MSL_MATH(sqrt, ::sqrtf) MSL_MATH(rsqrt, ::rsqrtf)               \
  MSL_MATH(tanh, ::tanhf) MSL_MATH(floor, ::floorf) MSL_MATH(ceil, ::ceilf)               \
  MSL_MATH(cos, ::cosf) MSL_MATH(sin, ::sinf)                                             \
  MSL_MATH(fabs, ::fabsf) MSL_MATH(abs, ::fabsf)                                          \
  __device__ __forceinline__ float fma(float a, float b, float c) { return ::fmaf(a, b, c); } \
  __device__ __forceinline__ float pow(float a, float b) { return ::powf(a, b); }         \
  __device__ __forceinline__ float max(float a, float b) { return ::fmaxf(a, b); }        \
  __device__ __forceinline__ float min(float a, float b) { return ::fminf(a, b); }        \
  __device__ __forceinline__ int max(int a, int b) { return a > b ? a : b; }              \
  __device__ __forceinline__ int min(int a, int b) { return a < b ? a : b; }              \
  __device__ __forceinline__ uint max(uint a, uint b) { return a > b ? a : b; }           \
  __device__ __forceinline__ uint min(uint a, uint b) { return a < b ? a : b; }           \
  __device__ __forceinline__ float clamp(float x, float lo, float hi) {                   \
    return ::fminf(::fmaxf(x, lo), hi);                                                   \
  }                                                                                       \
  __device__ __forceinline__ bool isnan(float x) { return ::isnan(x); }                   \
  __device__ __forceinline__ bool isinf(float x) { return ::isinf(x); }
MSL_MATH_SET(::expf)
namespace fast {
MSL_MATH_SET(::__expf)
}
namespace precise {
MSL_MATH_SET(::expf)
}
#undef MSL_MATH_SET
#undef MSL_MATH
}  // namespace metal

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
__device__ __forceinline__ void threadgroup_barrier(mem_flags) { __syncthreads(); }
__device__ __forceinline__ void simdgroup_barrier(mem_flags) { __syncwarp(); }

template <typename T>
__device__ __forceinline__ T simd_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T simd_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T simd_min(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T simd_shuffle(T v, ushort src) { return __shfl_sync(0xffffffffu, v, src); }
template <typename T>
__device__ __forceinline__ T simd_broadcast(T v, ushort src) { return __shfl_sync(0xffffffffu, v, src); }
template <typename T>
__device__ __forceinline__ T simd_broadcast_first(T v) { return __shfl_sync(0xffffffffu, v, 0); }
template <typename T>
__device__ __forceinline__ T simd_shuffle_xor(T v, ushort mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
template <typename T>
__device__ __forceinline__ T simd_shuffle_down(T v, ushort delta) { return __shfl_down_sync(0xffffffffu, v, delta); }
template <typename T>
__device__ __forceinline__ T simd_shuffle_up(T v, ushort delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
