// Shared prelude of every effdet kernel source. Self-contained: NVRTC runs without the CUDA
// toolkit's headers (pip's NVRTC ships none), so FP16 conversions are written in PTX here
// instead of taken from cuda_fp16.h. Under a host C++ compiler (EFFDET_HOST_EMULATION) the same
// kernels compile as plain functions that the tests run against the CPU reference
// (tests/emulation/harness.cpp): thread by thread, or, for block-cooperative kernels (shared
// memory, __syncthreads, warp shuffles), one host thread per CUDA thread of a block.

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
// Cooperative launches run a block's threads concurrently: a real atomic.
static inline u32 atomic_add_u32(u32* p, u32 v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
// Block-cooperative kernels under emulation (see the harness's EMU_LAUNCH_BLOCKS): blocks run
// one after another, so a `__shared__` variable is one static instance, the block's; a barrier
// of the block's host threads is __syncthreads; a shuffle goes through the warp's slots.
#define __shared__ static
void effdet_syncthreads();
float effdet_shfl_down_f32(float v, unsigned delta);
#define __syncthreads() effdet_syncthreads()
static inline float warp_shfl_down(float v, unsigned delta) { return effdet_shfl_down_f32(v, delta); }
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
__device__ __forceinline__ float warp_shfl_down(float v, unsigned delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
#endif

// The sum of every thread's `v` over the block, valid in thread 0: a shuffle tree within each
// warp, then the warps' sums (through shared memory) by a shuffle tree in warp 0. The order is
// fixed, so the result does not depend on scheduling. blockDim.x must be a multiple of 32 (at
// most 1024) and every thread of the block must call it; a second call in the same kernel
// needs a __syncthreads() before it (the warp sums are reused).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (unsigned d = 16; d > 0; d >>= 1) v += warp_shfl_down(v, d);
  unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    for (unsigned d = 16; d > 0; d >>= 1) v += warp_shfl_down(v, d);
  }
  return v;
}

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
