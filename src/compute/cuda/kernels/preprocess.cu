// Frame -> letterboxed, normalised FP16 network input, in one kernel: colour conversion (packed
// RGB/BGR or YUV 4:2:0 with strides), Pillow-exact bilinear resize (22-bit fixed-point taps,
// uint8 between the passes, Pillow 13's pass order) and effdet's normalisation. The CPU
// reference is src/preprocess.rs; every step is the same integer arithmetic, and the final
// normalisation reads the same f32 table, so the result equals the CPU's f32 input rounded to
// FP16 (round to nearest even), exactly.
//
// One thread per output pixel (x, y) of image blockIdx.z; it writes the 3 channels of
// out[z][c][y][x] (NCHW, FP16). Inside the resized area it recomputes the taps of both passes
// (at most ksize_h * ksize_v source pixels, 81 for a 1920x1080 frame into 512x512): no shared
// memory, no synchronisation, so the kernel also runs under host emulation.

#include "prelude.cuh"

#define EFFDET_FMT_RGB 0   // R G B
#define EFFDET_FMT_RGBX 1  // R G B x (also RGBA)
#define EFFDET_FMT_BGRX 2  // B G R x (also BGRA)
#define EFFDET_FMT_NV12 3  // Y plane, interleaved U V plane
#define EFFDET_FMT_I420 4  // Y, U, V planes

#define EFFDET_PRECISION_BITS 22
#define EFFDET_YUV_SHIFT 16

// One frame of a batch. Mirrored by `PreprocessImage` in src/compute/cuda/preprocess.rs
// (#[repr(C)], same field order): keep them in sync.
struct PreprocessImage {
  u64 plane[3];  // device addresses of the planes (unused ones 0)
  u64 h_start;   // int[resized_w]: first source column of output column x
  u64 h_len;     // int[resized_w]: number of taps
  u64 h_k;       // int[resized_w * h_ksize]: 22-bit fixed-point weights
  u64 v_start;   // the same for rows
  u64 v_len;
  u64 v_k;
  int stride[3];  // bytes per row of each plane
  int format;     // EFFDET_FMT_*
  int width;      // frame size
  int height;
  int resized_w;  // size of the image inside the square (top-left)
  int resized_h;
  int h_ksize;
  int v_ksize;
  int vertical_first;  // 1: Pillow's vertical pass runs first
  int yuv[6];          // y_off, cy, crv, cgu, cgv, cbu (x 2^16, rounded)
};

__device__ __forceinline__ u8 clip8(int v) {
  return (u8)clamp_i(v >> EFFDET_PRECISION_BITS, 0, 255);
}

// Source pixel (x, y) as RGB8, as src/preprocess.rs `convert_row`.
__device__ __forceinline__ void load_rgb(const PreprocessImage& im, int x, int y, int rgb[3]) {
  const u8* p0 = (const u8*)im.plane[0];
  switch (im.format) {
    case EFFDET_FMT_RGB: {
      const u8* p = p0 + (long long)y * im.stride[0] + 3 * x;
      rgb[0] = p[0]; rgb[1] = p[1]; rgb[2] = p[2];
      return;
    }
    case EFFDET_FMT_RGBX: {
      const u8* p = p0 + (long long)y * im.stride[0] + 4 * x;
      rgb[0] = p[0]; rgb[1] = p[1]; rgb[2] = p[2];
      return;
    }
    case EFFDET_FMT_BGRX: {
      const u8* p = p0 + (long long)y * im.stride[0] + 4 * x;
      rgb[0] = p[2]; rgb[1] = p[1]; rgb[2] = p[0];
      return;
    }
    default: {
      int luma = p0[(long long)y * im.stride[0] + x];
      int u, v;
      const u8* p1 = (const u8*)im.plane[1];
      if (im.format == EFFDET_FMT_NV12) {
        const u8* uv = p1 + (long long)(y / 2) * im.stride[1] + 2 * (x / 2);
        u = uv[0]; v = uv[1];
      } else {
        const u8* p2 = (const u8*)im.plane[2];
        u = p1[(long long)(y / 2) * im.stride[1] + x / 2];
        v = p2[(long long)(y / 2) * im.stride[2] + x / 2];
      }
      u -= 128;
      v -= 128;
      const int half = 1 << (EFFDET_YUV_SHIFT - 1);
      int yy = (luma - im.yuv[0]) * im.yuv[1] + half;
      int dr = im.yuv[2] * v;
      int dg = -(im.yuv[3] * u + im.yuv[4] * v);
      int db = im.yuv[5] * u;
      rgb[0] = clamp_i((yy + dr) >> EFFDET_YUV_SHIFT, 0, 255);
      rgb[1] = clamp_i((yy + dg) >> EFFDET_YUV_SHIFT, 0, 255);
      rgb[2] = clamp_i((yy + db) >> EFFDET_YUV_SHIFT, 0, 255);
      return;
    }
  }
}

// Horizontal pass at output column xo over source row ys (uint8 result, as Pillow stores it).
// A pass that Pillow skips (size unchanged) has identity taps (one tap of weight 2^22), which
// this arithmetic maps to the source value unchanged.
__device__ __forceinline__ void pass_h(const PreprocessImage& im, int xo, int ys, int out[3]) {
  const int* starts = (const int*)im.h_start;
  const int* lens = (const int*)im.h_len;
  const int* ks = (const int*)im.h_k + (long long)xo * im.h_ksize;
  int x0 = starts[xo], n = lens[xo];
  int acc[3] = {1 << (EFFDET_PRECISION_BITS - 1), 1 << (EFFDET_PRECISION_BITS - 1),
                1 << (EFFDET_PRECISION_BITS - 1)};
  for (int i = 0; i < n; ++i) {
    int rgb[3];
    load_rgb(im, x0 + i, ys, rgb);
    acc[0] += rgb[0] * ks[i];
    acc[1] += rgb[1] * ks[i];
    acc[2] += rgb[2] * ks[i];
  }
  out[0] = clip8(acc[0]); out[1] = clip8(acc[1]); out[2] = clip8(acc[2]);
}

// Vertical pass at output row yo over source column xs.
__device__ __forceinline__ void pass_v(const PreprocessImage& im, int xs, int yo, int out[3]) {
  const int* starts = (const int*)im.v_start;
  const int* lens = (const int*)im.v_len;
  const int* ks = (const int*)im.v_k + (long long)yo * im.v_ksize;
  int y0 = starts[yo], n = lens[yo];
  int acc[3] = {1 << (EFFDET_PRECISION_BITS - 1), 1 << (EFFDET_PRECISION_BITS - 1),
                1 << (EFFDET_PRECISION_BITS - 1)};
  for (int i = 0; i < n; ++i) {
    int rgb[3];
    load_rgb(im, xs, y0 + i, rgb);
    acc[0] += rgb[0] * ks[i];
    acc[1] += rgb[1] * ks[i];
    acc[2] += rgb[2] * ks[i];
  }
  out[0] = clip8(acc[0]); out[1] = clip8(acc[1]); out[2] = clip8(acc[2]);
}

// images[n]: the frames; norm_lut[3 * 256]: normalised value of each channel level (the CPU's
// table); fill[3]: the padding colour; out: half_t[n][3][size][size].
extern "C" __global__ void preprocess_letterbox(const PreprocessImage* __restrict__ images,
                                                const float* __restrict__ norm_lut,
                                                const int* __restrict__ fill, int size,
                                                half_t* __restrict__ out) {
  int x = blockIdx.x * blockDim.x + threadIdx.x;
  int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= size || y >= size) return;
  const PreprocessImage& im = images[blockIdx.z];
  int rgb[3] = {fill[0], fill[1], fill[2]};
  if (x < im.resized_w && y < im.resized_h) {
    const int bias = 1 << (EFFDET_PRECISION_BITS - 1);
    int acc[3] = {bias, bias, bias};
    if (im.vertical_first) {
      const int* ks = (const int*)im.h_k + (long long)x * im.h_ksize;
      int x0 = ((const int*)im.h_start)[x], n = ((const int*)im.h_len)[x];
      for (int i = 0; i < n; ++i) {
        int v[3];
        pass_v(im, x0 + i, y, v);
        acc[0] += v[0] * ks[i]; acc[1] += v[1] * ks[i]; acc[2] += v[2] * ks[i];
      }
    } else {
      const int* ks = (const int*)im.v_k + (long long)y * im.v_ksize;
      int y0 = ((const int*)im.v_start)[y], n = ((const int*)im.v_len)[y];
      for (int i = 0; i < n; ++i) {
        int h[3];
        pass_h(im, x, y0 + i, h);
        acc[0] += h[0] * ks[i]; acc[1] += h[1] * ks[i]; acc[2] += h[2] * ks[i];
      }
    }
    rgb[0] = clip8(acc[0]); rgb[1] = clip8(acc[1]); rgb[2] = clip8(acc[2]);
  }
  long long plane = (long long)size * size;
  half_t* o = out + (long long)blockIdx.z * 3 * plane + (long long)y * size + x;
  o[0] = f2h(norm_lut[rgb[0]]);
  o[plane] = f2h(norm_lut[256 + rgb[1]]);
  o[2 * plane] = f2h(norm_lut[512 + rgb[2]]);
}
