// The network's elementwise and small reduction ops in FP16 storage with FP32 math, NCHW, one
// thread per output element unless said otherwise. They implement the `Backend` ops that are
// not convolutions (src/compute/mod.rs; CPU reference src/compute/cpu/ops.rs) and the epilogue
// of a cuDNN convolution (bias, activation, residual add).

#include "prelude.cuh"

// y = act(y + bias[c]) + residual, in place; bias and residual may be null.
extern "C" __global__ void bias_act_residual(half_t* __restrict__ y, const half_t* __restrict__ bias,
                                             const half_t* __restrict__ residual, long long n,
                                             int channels, long long hw, int act) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = h2f(y[i]);
  if (bias) v += h2f(bias[(i / hw) % channels]);
  v = activate(v, act);
  if (residual) v += h2f(residual[i]);
  y[i] = f2h(v);
}

// y = act(x * scale[c] + shift[c]) (inference batch norm when it is not folded).
extern "C" __global__ void channel_affine(const half_t* __restrict__ x, half_t* __restrict__ y,
                                          const half_t* __restrict__ scale,
                                          const half_t* __restrict__ shift, long long n,
                                          int channels, long long hw, int act) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int c = (int)((i / hw) % channels);
  y[i] = f2h(activate(h2f(x[i]) * h2f(scale[c]) + h2f(shift[c]), act));
}

// y = act(x).
extern "C" __global__ void activation(const half_t* __restrict__ x, half_t* __restrict__ y,
                                      long long n, int act) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = f2h(activate(h2f(x[i]), act));
}

// y = a + b.
extern "C" __global__ void add(const half_t* __restrict__ a, const half_t* __restrict__ b,
                               half_t* __restrict__ y, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = f2h(h2f(a[i]) + h2f(b[i]));
}

// Block per (n, c) plane (blockIdx.x): the mean over H x W, each thread summing a strided share
// in FP32, then `block_sum`. (The CPU uses f64; the FP16 input already limits the result to
// ~1e-3 relative.) One thread per plane summed a whole 256x256 plane alone before: 65536 serial
// loads. blockDim.x: a multiple of 32.
extern "C" __global__ void global_avg_pool(const half_t* __restrict__ x, half_t* __restrict__ y,
                                           long long planes, long long hw) {
  long long p = blockIdx.x;
  if (p >= planes) return;  // the whole block alike
  const half_t* src = x + p * hw;
  float s = 0.0f;
  for (long long i = threadIdx.x; i < hw; i += blockDim.x) s += h2f(src[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) y[p] = f2h(s / (float)hw);
}

// y = x * s[n, c] (squeeze-excitation), s broadcast over H x W.
extern "C" __global__ void scale_channels(const half_t* __restrict__ x,
                                          const half_t* __restrict__ s, half_t* __restrict__ y,
                                          long long n, long long hw) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = f2h(h2f(x[i]) * h2f(s[i / hw]));
}

// Max pooling, TF-SAME: window k x k, stride s, pad_top / pad_left before (the rest after),
// padding counts as -inf.
extern "C" __global__ void max_pool_same(const half_t* __restrict__ x, half_t* __restrict__ y,
                                         long long planes, int h, int w, int oh, int ow, int k,
                                         int stride, int pad_top, int pad_left) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= planes * oh * ow) return;
  int ox = (int)(i % ow);
  int oy = (int)((i / ow) % oh);
  long long p = i / ((long long)oh * ow);
  const half_t* src = x + p * h * w;
  float m = EFFDET_NEG_INF;
  for (int ky = 0; ky < k; ++ky) {
    int iy = oy * stride + ky - pad_top;
    if (iy < 0 || iy >= h) continue;
    for (int kx = 0; kx < k; ++kx) {
      int ix = ox * stride + kx - pad_left;
      if (ix < 0 || ix >= w) continue;
      float v = h2f(src[(long long)iy * w + ix]);
      m = v > m ? v : m;
    }
  }
  y[i] = f2h(m);
}

// PyTorch 'nearest': src = min(floor(dst * (in / out)), in - 1), the ratio in f32.
extern "C" __global__ void upsample_nearest(const half_t* __restrict__ x, half_t* __restrict__ y,
                                            long long planes, int h, int w, int oh, int ow) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= planes * oh * ow) return;
  int ox = (int)(i % ow);
  int oy = (int)((i / ow) % oh);
  long long p = i / ((long long)oh * ow);
  float sy = (float)h / (float)oh;
  float sx = (float)w / (float)ow;
  int iy = (int)floorf((float)oy * sy);
  int ix = (int)floorf((float)ox * sx);
  iy = iy < h - 1 ? iy : h - 1;
  ix = ix < w - 1 ? ix : w - 1;
  y[i] = x[p * h * w + (long long)iy * w + ix];
}

// BiFPN fast normalised fusion: y = act(w0 x0 + w1 x1 + w2 x2), weights already normalised on
// the host; x2 may be null (two inputs).
extern "C" __global__ void weighted_sum(const half_t* __restrict__ x0,
                                        const half_t* __restrict__ x1,
                                        const half_t* __restrict__ x2, float w0, float w1,
                                        float w2, half_t* __restrict__ y, long long n, int act) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = w0 * h2f(x0[i]) + w1 * h2f(x1[i]);
  if (x2) v += w2 * h2f(x2[i]);
  y[i] = f2h(activate(v, act));
}

// Precision conversions at the engine's edges.
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, half_t* __restrict__ y,
                                      long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = f2h(x[i]);
}

extern "C" __global__ void f16_to_f32(const half_t* __restrict__ x, float* __restrict__ y,
                                      long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = h2f(x[i]);
}
