// Direct convolution in FP16 storage with FP32 accumulation: regular, strided, grouped or
// depthwise, TF-SAME or explicit zero padding, with the fused epilogue of the `Backend`
// contract, `act(conv(x, w) + bias) + residual`. One thread per output element, no shared
// memory: the correctness reference on the GPU and the engine's path for every convolution
// until the cuDNN/cuBLAS paths (chosen per layer at load) replace it where they are faster.
// The CPU reference is src/compute/cpu/conv.rs.

#include "prelude.cuh"

// Shapes of one convolution. Mirrored by `ConvParams` in src/compute/cuda/params.rs.
struct ConvParams {
  int n, cin, h, w;        // input [n][cin][h][w]
  int cout, kh, kw;        // weight [cout][cin / groups][kh][kw]
  int oh, ow;              // output [n][cout][oh][ow]
  int stride, groups;
  int pad_top, pad_left;   // zero padding before (the rest after)
  int act;                 // EFFDET_ACT_*
};

// bias [cout] and residual (the output's shape) may be null.
extern "C" __global__ void conv2d_direct(const half_t* __restrict__ x,
                                         const half_t* __restrict__ weight,
                                         const half_t* __restrict__ bias,
                                         const half_t* __restrict__ residual,
                                         half_t* __restrict__ y, ConvParams p) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long total = (long long)p.n * p.cout * p.oh * p.ow;
  if (i >= total) return;
  int ox = (int)(i % p.ow);
  int oy = (int)((i / p.ow) % p.oh);
  int co = (int)((i / ((long long)p.ow * p.oh)) % p.cout);
  int n = (int)(i / ((long long)p.ow * p.oh * p.cout));
  int cin_g = p.cin / p.groups;
  int g = co / (p.cout / p.groups);
  const half_t* wk = weight + (long long)co * cin_g * p.kh * p.kw;
  float acc = 0.0f;
  for (int ci = 0; ci < cin_g; ++ci) {
    const half_t* xc = x + ((long long)n * p.cin + (long long)g * cin_g + ci) * p.h * p.w;
    const half_t* wc = wk + (long long)ci * p.kh * p.kw;
    for (int ky = 0; ky < p.kh; ++ky) {
      int iy = oy * p.stride + ky - p.pad_top;
      if (iy < 0 || iy >= p.h) continue;
      for (int kx = 0; kx < p.kw; ++kx) {
        int ix = ox * p.stride + kx - p.pad_left;
        if (ix < 0 || ix >= p.w) continue;
        acc += h2f(xc[(long long)iy * p.w + ix]) * h2f(wc[ky * p.kw + kx]);
      }
    }
  }
  if (bias) acc += h2f(bias[co]);
  acc = activate(acc, p.act);
  if (residual) acc += h2f(residual[i]);
  y[i] = f2h(acc);
}
