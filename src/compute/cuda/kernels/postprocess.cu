// Detections on the GPU: gather the head outputs, exact top-k of the (anchor, class) logits,
// box decoding and clipping, and per-class hard NMS; only the final detections (at most
// max_det per image) go back to the host. The CPU reference is src/postprocess: the same
// selection and tie rules, and the same f32 operations in the same order (compiled with
// --fmad=false so that no multiply-add is contracted). Only exp differs (the device's expf is
// within 2 ulp of libm's), so scores and box sizes can differ by an ulp or two.
//
// Per image (blockIdx.y, or the thread index for the per-image kernels):
//   gather_level      head outputs of one level (FP16 NCHW) -> dense logits [anchors * K] and
//                     box codes [anchors][4] (f32), in the CPU's flat order
//   topk_init         state: prefix 0, need = min(k, n)
//   8 x (topk_histogram, topk_select)
//                     radix select of the k-th largest 64-bit key, 8 bits per round; the key
//                     is (order_key(logit) << 32) | ~flat_index, so keys are unique and larger
//                     keys are larger logits, equal logits ordered by lower flat index first
//                     (the CPU's rule)
//   topk_gather       every key >= the k-th one -> selected (exactly k of them, any order)
//   topk_rank_decode  rank of each selected key (its position, best first), decode its box,
//                     clip it, sigmoid its logit
//   nms_mask          bit j of row i: candidate j (ranked after i) has i's class and
//                     IoU(i, j) > threshold
//   nms_reduce        greedy walk in rank order; kept boxes scaled by img_scale, score filter
// topk_histogram and nms_reduce are block-cooperative (shared memory, __syncthreads); the host
// emulation runs them with a host thread per CUDA thread.

#include "prelude.cuh"

// Mirrored by `TopkState` in src/compute/cuda/postprocess.rs.
struct TopkState {
  u64 prefix;  // the k-th largest key, once all rounds ran
  u32 need;    // how many keys are still to be taken inside the current prefix
  u32 count;   // keys gathered by topk_gather
};

// One image's decoding parameters. Mirrored by `DecodeImage` in src/compute/cuda/postprocess.rs.
struct DecodeImage {
  float clip_w;     // clip limits (orig size / img_scale) in network pixels
  float clip_h;
  float img_scale;  // network -> frame pixels
  float pad;
};

// One detection as it returns to the host. Mirrored by `GpuDetection`.
struct GpuDetection {
  float box[4];  // x1, y1, x2, y2 in frame pixels
  float score;
  u32 class_id;  // 1-based
};

#define EFFDET_NAN_KEY 0xffc00000u

// src/postprocess/topk.rs `order_key`: a u32 whose unsigned order is the float order, with
// every NaN mapped to one key above +inf and -0 equal to +0.
__device__ __forceinline__ u32 order_key(float x) {
  u32 b = float_bits(x);
  u32 k = b ^ ((u32)(((int)b) >> 31) | 0x80000000u);
  if (k < 0x007fffffu || k > 0xff800000u) k = EFFDET_NAN_KEY;
  return k == 0x7fffffffu ? 0x80000000u : k;
}

__device__ __forceinline__ u64 make_key(float logit, u32 flat) {
  return ((u64)order_key(logit) << 32) | (u64)(0xffffffffu - flat);
}

// Head outputs of one level for image blockIdx.y: cls [A*K][H][W], box [A*4][H][W] (FP16,
// batch-strided by cls_stride / box_stride elements) -> logits[(anchor0 + (y*W + x)*A + a)*K + k]
// and codes[anchor][4] (ty, tx, th, tw), per image strided by n_logits / n_anchors.
extern "C" __global__ void gather_level(const half_t* __restrict__ cls,
                                        const half_t* __restrict__ box, long long cls_stride,
                                        long long box_stride, int num_anchors_per_loc,
                                        int num_classes, int height, int width, int anchor0,
                                        float* __restrict__ logits, long long n_logits,
                                        float* __restrict__ codes, long long n_anchors) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long hw = (long long)height * width;
  if (t >= hw * num_anchors_per_loc) return;
  int a = (int)(t % num_anchors_per_loc);
  long long pix = t / num_anchors_per_loc;
  const half_t* c = cls + blockIdx.y * cls_stride;
  const half_t* b = box + blockIdx.y * box_stride;
  long long anchor = anchor0 + pix * num_anchors_per_loc + a;
  float* lg = logits + blockIdx.y * n_logits + anchor * num_classes;
  for (int k = 0; k < num_classes; ++k) {
    lg[k] = h2f(c[((long long)a * num_classes + k) * hw + pix]);
  }
  float* cd = codes + blockIdx.y * n_anchors * 4 + anchor * 4;
  for (int i = 0; i < 4; ++i) cd[i] = h2f(b[((long long)a * 4 + i) * hw + pix]);
}

// states[batch]: need = min(k, n).
extern "C" __global__ void topk_init(TopkState* __restrict__ states, int batch, u32 k, u32 n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  states[i].prefix = 0;
  states[i].need = k < n ? k : n;
  states[i].count = 0;
}

// Round `round` (0..7) of the radix select: histogram of digit (key >> (56 - 8 round)) & 255
// over the keys whose higher digits equal the prefix chosen so far. hist: u32[batch][256],
// zero on entry (topk_select clears it for the next round).
extern "C" __global__ void topk_histogram(const float* __restrict__ logits, u32 n,
                                          const TopkState* __restrict__ states, int round,
                                          u32* __restrict__ hist) {
  // Counted per block in shared memory first, then one global atomic per non-empty digit:
  // most keys of a round share a few digits, which made global atomics collide.
  __shared__ u32 local[256];
  const TopkState st = states[blockIdx.y];
  if (st.need == 0) return;  // the whole block alike (one image per blockIdx.y)
  for (u32 b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const float* lg = logits + (long long)blockIdx.y * n;
  int shift = 56 - 8 * round;
  u64 high_mask = round == 0 ? 0 : ~0ull << (shift + 8);
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    u64 key = make_key(lg[i], i);
    if ((key & high_mask) != (st.prefix & high_mask)) continue;
    atomic_add_u32(&local[(key >> shift) & 255], 1u);
  }
  __syncthreads();
  u32* h = hist + blockIdx.y * 256;
  for (u32 b = threadIdx.x; b < 256; b += blockDim.x)
    if (local[b] != 0) atomic_add_u32(&h[b], local[b]);
}

// Picks the digit of this round holding the need-th largest active key; clears the histogram.
extern "C" __global__ void topk_select(u32* __restrict__ hist, TopkState* __restrict__ states,
                                       int batch, int round) {
  int img = blockIdx.x * blockDim.x + threadIdx.x;
  if (img >= batch) return;
  TopkState st = states[img];
  u32* h = hist + img * 256;
  if (st.need > 0) {
    u32 above = 0;
    for (int b = 255; b >= 0; --b) {
      if (above + h[b] >= st.need) {
        st.need -= above;
        st.prefix |= (u64)b << (56 - 8 * round);
        break;
      }
      above += h[b];
    }
    states[img] = st;
  }
  for (int b = 0; b < 256; ++b) h[b] = 0;
}

// Every key >= the k-th largest: exactly min(k, n) keys into selected[img][0..k) (any order).
extern "C" __global__ void topk_gather(const float* __restrict__ logits, u32 n,
                                       TopkState* __restrict__ states, u32 k,
                                       u64* __restrict__ selected) {
  TopkState* st = &states[blockIdx.y];
  if (st->need == 0) return;
  u64 kth = st->prefix;
  const float* lg = logits + (long long)blockIdx.y * n;
  u64* sel = selected + (long long)blockIdx.y * k;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    u64 key = make_key(lg[i], i);
    if (key >= kth) sel[atomic_add_u32(&st->count, 1u)] = key;
  }
}

// src/postprocess `decode_box` (output [x1, y1, x2, y2]) and `clip_box`.
__device__ __forceinline__ void decode_clip(const float* code, const float* anchor, float cw,
                                            float ch, float out[4]) {
  float ycenter_a = (anchor[0] + anchor[2]) / 2.0f;
  float xcenter_a = (anchor[1] + anchor[3]) / 2.0f;
  float ha = anchor[2] - anchor[0];
  float wa = anchor[3] - anchor[1];
  float w = expf_(code[3]) * wa;
  float h = expf_(code[2]) * ha;
  float ycenter = code[0] * ha + ycenter_a;
  float xcenter = code[1] * wa + xcenter_a;
  out[0] = xcenter - w / 2.0f;
  out[1] = ycenter - h / 2.0f;
  out[2] = xcenter + w / 2.0f;
  out[3] = ycenter + h / 2.0f;
  float lim[4] = {cw, ch, cw, ch};
  for (int i = 0; i < 4; ++i) {
    if (out[i] < 0.0f) out[i] = 0.0f;
    if (out[i] > lim[i]) out[i] = lim[i];
  }
}

// Thread per selected key of image blockIdx.y: its rank r (number of larger keys) and, at r,
// the decoded clipped box, the sigmoid score and the 0-based class.
extern "C" __global__ void topk_rank_decode(const u64* __restrict__ selected, u32 k,
                                            const TopkState* __restrict__ states,
                                            const float* __restrict__ logits, u32 n,
                                            const float* __restrict__ codes,
                                            const float* __restrict__ anchors, int num_classes,
                                            const DecodeImage* __restrict__ images,
                                            float* __restrict__ boxes, float* __restrict__ scores,
                                            u32* __restrict__ classes) {
  u32 i = blockIdx.x * blockDim.x + threadIdx.x;
  u32 count = states[blockIdx.y].count;
  if (i >= count) return;
  const u64* sel = selected + (long long)blockIdx.y * k;
  u64 key = sel[i];
  u32 rank = 0;
  for (u32 j = 0; j < count; ++j) rank += sel[j] > key;
  u32 flat = 0xffffffffu - (u32)(key & 0xffffffffu);
  u32 anchor = flat / num_classes;
  u32 cls = flat % num_classes;
  float logit = logits[(long long)blockIdx.y * n + flat];
  long long n_anchors = n / num_classes;
  const DecodeImage im = images[blockIdx.y];
  long long o = (long long)blockIdx.y * k + rank;
  decode_clip(codes + ((long long)blockIdx.y * n_anchors + anchor) * 4,
              anchors + (long long)anchor * 4, im.clip_w, im.clip_h, boxes + o * 4);
  scores[o] = 1.0f / (1.0f + expf_(-logit));
  classes[o] = cls;
}

// Suppression bits: row i (rank), word w covers candidates 64w .. 64w+63; bit set when the
// candidate ranks after i, has i's class and IoU > iou_threshold (torchvision's f32 IoU,
// compared in f64 as the CPU does). Thread per (i, w) of image blockIdx.y.
extern "C" __global__ void nms_mask(const float* __restrict__ boxes,
                                    const u32* __restrict__ classes,
                                    const TopkState* __restrict__ states, u32 k, int words,
                                    double iou_threshold, u64* __restrict__ mask) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  u32 count = states[blockIdx.y].count;
  if (t >= (long long)count * words) return;
  u32 i = (u32)(t / words);
  int w = (int)(t % words);
  long long base = (long long)blockIdx.y * k;
  const float* bi = boxes + (base + i) * 4;
  float iarea = (bi[2] - bi[0]) * (bi[3] - bi[1]);
  u32 ci = classes[base + i];
  u64 bits = 0;
  for (int b = 0; b < 64; ++b) {
    u32 j = (u32)w * 64 + b;
    if (j <= i || j >= count || classes[base + j] != ci) continue;
    const float* bj = boxes + (base + j) * 4;
    float xx1 = bi[0] < bj[0] ? bj[0] : bi[0];
    float yy1 = bi[1] < bj[1] ? bj[1] : bi[1];
    float xx2 = bj[2] < bi[2] ? bj[2] : bi[2];
    float yy2 = bj[3] < bi[3] ? bj[3] : bi[3];
    float ww = 0.0f < xx2 - xx1 ? xx2 - xx1 : 0.0f;
    float hh = 0.0f < yy2 - yy1 ? yy2 - yy1 : 0.0f;
    float inter = ww * hh;
    float jarea = (bj[2] - bj[0]) * (bj[3] - bj[1]);
    float ovr = inter / (iarea + jarea - inter);
    if ((double)ovr > iou_threshold) bits |= 1ull << b;
  }
  mask[(base + i) * words + w] = bits;
}

// Block per image (blockIdx.x): walk the candidates best first, keep those no kept box
// suppresses, stop at max_det; scale to frame pixels; keep the prefix scoring >= score_threshold
// (scores descend; NaN is kept, as on the CPU). The walk is sequential (greedy NMS), so thread 0
// decides each candidate; ORing a kept candidate's suppression row into `removed` is spread over
// the block's threads, a word each. removed: u64[batch][words], zero on entry.
extern "C" __global__ void nms_reduce(const u64* __restrict__ mask,
                                      const TopkState* __restrict__ states, u32 k, int words,
                                      const float* __restrict__ boxes,
                                      const float* __restrict__ scores,
                                      const u32* __restrict__ classes,
                                      const DecodeImage* __restrict__ images, int batch,
                                      int max_det, float score_threshold, u64* removed,
                                      GpuDetection* __restrict__ dets,
                                      u32* __restrict__ det_count) {
  __shared__ int action;  // for the current candidate: 0 skip, 1 keep, 2 stop
  int img = blockIdx.x;
  if (img >= batch) return;  // the whole block alike
  u32 count = states[img].count;
  long long base = (long long)img * k;
  u64* rm = removed + (long long)img * words;
  GpuDetection* out = dets + (long long)img * max_det;
  float scale = images[img].img_scale;
  int kept = 0;  // thread 0's
  for (u32 i = 0; i < count; ++i) {
    if (threadIdx.x == 0) {
      int a = 1;
      float s = scores[base + i];
      if (kept >= max_det) a = 2;
      else if ((rm[i / 64] >> (i % 64)) & 1ull) a = 0;
      else if (s < score_threshold) a = 2;
      if (a == 1) {
        GpuDetection d;
        for (int c = 0; c < 4; ++c) d.box[c] = boxes[(base + i) * 4 + c] * scale;
        d.score = s;
        d.class_id = classes[base + i] + 1;
        out[kept++] = d;
      }
      action = a;
    }
    __syncthreads();
    int a = action;
    if (a == 2) break;  // every thread read the same value
    if (a == 1) {
      const u64* row = mask + (base + i) * words;
      for (int w = (int)(i / 64) + (int)threadIdx.x; w < words; w += (int)blockDim.x) rm[w] |= row[w];
    }
    __syncthreads();  // the row is in `removed` before thread 0 reads the next bit
  }
  if (threadIdx.x == 0) det_count[img] = (u32)kept;
}
