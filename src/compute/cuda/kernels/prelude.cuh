// Shared prelude of every effdet kernel source. Self-contained: NVRTC runs without the CUDA
// toolkit's headers (pip's NVRTC ships none), so FP16 conversions are written in PTX here
// instead of taken from cuda_fp16.h. Under a host C++ compiler (EFFDET_HOST_EMULATION) the same
// kernels compile as plain functions that the tests run thread by thread against the CPU
// reference (kernels meant for emulation use no shared memory and no __syncthreads).

#ifndef EFFDET_PRELUDE_CUH
#define EFFDET_PRELUDE_CUH

typedef unsigned char u8;
typedef unsigned short half_t;  // IEEE binary16 bits
typedef unsigned int u32;
typedef unsigned long long u64;

#ifdef EFFDET_HOST_EMULATION
#include <cmath>
struct effdet_dim3 { unsigned x, y, z; };
extern thread_local effdet_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
static inline half_t f2h(float f) {
  _Float16 h = (_Float16)f;  // round to nearest even, as cvt.rn.f16.f32
  half_t bits;
  __builtin_memcpy(&bits, &h, 2);
  return bits;
}
static inline float h2f(half_t bits) {
  _Float16 h;
  __builtin_memcpy(&h, &bits, 2);
  return (float)h;
}
static inline float expf_(float x) { return std::exp(x); }
static inline u32 float_bits(float x) {
  u32 u;
  __builtin_memcpy(&u, &x, 4);
  return u;
}
#define EFFDET_NEG_INF (-HUGE_VALF)
// Emulated launches run one thread at a time: a plain read-modify-write is atomic.
static inline u32 atomic_add_u32(u32* p, u32 v) {
  u32 old = *p;
  *p = old + v;
  return old;
}
#else
__device__ __forceinline__ half_t f2h(float f) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float h2f(half_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ float expf_(float x) { return expf(x); }
#define EFFDET_NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ u32 float_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ u32 atomic_add_u32(u32* p, u32 v) { return atomicAdd(p, v); }
#endif

__device__ __forceinline__ int clamp_i(int v, int lo, int hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Activations, numbered as `params::activation_code` (the CPU reference is
// `compute::Activation::apply`).
#define EFFDET_ACT_NONE 0
#define EFFDET_ACT_SWISH 1
#define EFFDET_ACT_SIGMOID 2
#define EFFDET_ACT_RELU 3

__device__ __forceinline__ float activate(float x, int act) {
  switch (act) {
    case EFFDET_ACT_SWISH: return x / (1.0f + expf_(-x));
    case EFFDET_ACT_SIGMOID: return 1.0f / (1.0f + expf_(-x));
    case EFFDET_ACT_RELU: return x > 0.0f ? x : 0.0f;
    default: return x;
  }
}

#endif  // EFFDET_PRELUDE_CUH
