// msl_check.h — lets clang type-check the Metal source MLX generates, on a machine without Metal.
//
// Used as: clang++ -x c++ -std=c++17 -fsyntax-only -Werror -Wno-unknown-attributes
//          -include msl_check.h kernel.metal.cpp   (gptoss_mlx/testing/toolchain.py)
// Only declarations: nothing here runs. Address-space words are empty (not checked), vector types
// are clang ext_vector_types (component access, swizzles and arithmetic as in MSL), and the
// Metal standard library functions a kernel may call are declared as templates. What is
// declared here is at least what metal/msl_emulate.h and metal/msl_cuda.h provide, so a name
// that neither of those knows fails in their builds, and a typo or a type error fails here.
#pragma once

#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline

typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;
struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
  unsigned short bits;
};
typedef bfloat16_t bfloat;

#define MSL_VECTORS(T, name)                                    \
  typedef T name##2 __attribute__((ext_vector_type(2)));        \
  typedef T name##3 __attribute__((ext_vector_type(3)));        \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MSL_VECTORS(float, float)
MSL_VECTORS(half, half)
MSL_VECTORS(int, int)
MSL_VECTORS(uint, uint)
MSL_VECTORS(short, short)
MSL_VECTORS(ushort, ushort)
MSL_VECTORS(char, char)
MSL_VECTORS(uchar, uchar)
MSL_VECTORS(bool, bool)
#undef MSL_VECTORS

#define INFINITY (__builtin_inff())
#define FLT_MAX 3.40282346638528859812e+38F
#define MAXFLOAT 3.40282346638528859812e+38F

template <typename T, typename U>
T as_type(U);

namespace metal {
#define MSL_UNARY(name) template <typename T> T name(T);
MSL_UNARY(exp) MSL_UNARY(exp2) MSL_UNARY(log) MSL_UNARY(log2) MSL_UNARY(sqrt) MSL_UNARY(rsqrt)
MSL_UNARY(tanh) MSL_UNARY(floor) MSL_UNARY(ceil) MSL_UNARY(fabs) MSL_UNARY(abs)
MSL_UNARY(cos) MSL_UNARY(sin)
#undef MSL_UNARY
template <typename T> bool isnan(T);
template <typename T> bool isinf(T);
template <typename T> T fma(T, T, T);
template <typename T> T pow(T, T);
template <typename T> T max(T, T);
template <typename T> T min(T, T);
template <typename T> T clamp(T, T, T);
namespace fast {
using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt;
using metal::rsqrt; using metal::tanh; using metal::pow; using metal::max; using metal::min;
using metal::fabs; using metal::abs; using metal::clamp; using metal::cos; using metal::sin;
}
namespace precise {
using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt;
using metal::rsqrt; using metal::tanh; using metal::pow; using metal::max; using metal::min;
using metal::fabs; using metal::abs; using metal::clamp; using metal::cos; using metal::sin;
}

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
template <typename T> T simd_min(T);
template <typename T> T simd_shuffle(T, ushort);
template <typename T> T simd_shuffle_xor(T, ushort);
template <typename T> T simd_shuffle_down(T, ushort);
template <typename T> T simd_shuffle_up(T, ushort);
template <typename T> T simd_broadcast(T, ushort);
template <typename T> T simd_broadcast_first(T);
}  // namespace metal

using namespace metal;  // as in every MLX Metal source

// From MLX's utils.h, which MLX prepends to custom kernels.
template <typename T> T ceildiv(T, T);
