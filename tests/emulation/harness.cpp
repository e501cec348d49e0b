// Host emulation of the CUDA kernels for tests/cuda_emulated.rs: the kernel sources compiled
// as C++ (EFFDET_HOST_EMULATION, see prelude.cuh) and launched in one of two ways:
//
// - EMU_LAUNCH: every thread of the grid in turn, on this thread. For kernels whose threads do
//   not cooperate (no shared memory, no barrier, no shuffle): fast.
// - EMU_LAUNCH_BLOCKS: block after block, each block's threads as concurrent host threads.
//   `__shared__` is then the block's (one static instance, blocks run one at a time),
//   __syncthreads() is a barrier of the block's threads, warp_shfl_down exchanges values
//   through the warp's slots between two barriers of the warp's threads. A thread that returns
//   leaves the barriers (as an exited thread does on a GPU since Volta). One cooperative launch
//   runs at a time in the process (shared memory is static). Used for
//   global_avg_pool, topk_histogram and nms_reduce.
//
// The launch sequence of emu_postprocess mirrors src/compute/cuda/postprocess.rs (the GPU test
// covers that file itself).

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "preprocess.cu"
#include "postprocess.cu"
#include "conv.cu"
#include "elementwise.cu"

thread_local effdet_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define EMU_LAUNCH(grid, block, call)                                         \
  do {                                                                        \
    gridDim = grid;                                                           \
    blockDim = block;                                                         \
    for (unsigned bz = 0; bz < gridDim.z; ++bz)                               \
      for (unsigned by = 0; by < gridDim.y; ++by)                             \
        for (unsigned bx = 0; bx < gridDim.x; ++bx)                           \
          for (unsigned tz = 0; tz < blockDim.z; ++tz)                        \
            for (unsigned ty = 0; ty < blockDim.y; ++ty)                      \
              for (unsigned tx = 0; tx < blockDim.x; ++tx) {                  \
                blockIdx = effdet_dim3{bx, by, bz};                           \
                threadIdx = effdet_dim3{tx, ty, tz};                          \
                call;                                                         \
              }                                                               \
  } while (0)

// A reusable barrier for `expected` threads; a thread that is done leaves it (`drop`), so the
// others do not wait for it.
struct EmuBarrier {
  std::mutex m;
  std::condition_variable cv;
  unsigned expected = 0, arrived = 0, generation = 0;
  void release() { arrived = 0; ++generation; cv.notify_all(); }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m);
    unsigned gen = generation;
    if (++arrived == expected) { release(); return; }
    cv.wait(lock, [&] { return generation != gen; });
  }
  void drop() {
    std::lock_guard<std::mutex> lock(m);
    --expected;
    if (expected > 0 && arrived == expected) release();
  }
};

// The block being run by EMU_LAUNCH_BLOCKS: its barrier, one barrier and 32 slots per warp.
struct EmuBlock {
  unsigned threads;
  EmuBarrier block;
  std::vector<std::unique_ptr<EmuBarrier>> warps;
  std::vector<float> slots;
  explicit EmuBlock(unsigned n) : threads(n), warps((n + 31) / 32), slots(((n + 31) / 32) * 32) {
    block.expected = n;
    for (unsigned w = 0; w < warps.size(); ++w) {
      warps[w] = std::make_unique<EmuBarrier>();
      warps[w]->expected = std::min(32u, n - 32 * w);
    }
  }
};
static EmuBlock* emu_block = nullptr;
// `__shared__` variables and emu_block are process-wide, so cooperative launches from
// concurrent callers (the Rust tests run in parallel) take turns.
static std::mutex emu_coop_launch;
static thread_local unsigned emu_linear = 0;  // the thread's index within its block

void effdet_syncthreads() { emu_block->block.arrive_and_wait(); }

float effdet_shfl_down_f32(float v, unsigned delta) {
  unsigned w = emu_linear / 32, lane = emu_linear % 32;
  unsigned width = emu_block->warps[w]->expected;  // lanes of this warp still running
  emu_block->slots[w * 32 + lane] = v;
  emu_block->warps[w]->arrive_and_wait();
  float r = lane + delta < width ? emu_block->slots[w * 32 + lane + delta] : v;
  emu_block->warps[w]->arrive_and_wait();
  return r;
}

#define EMU_LAUNCH_BLOCKS(GRID, BLOCK, CALL)                                        \
  do {                                                                              \
    const effdet_dim3 g_ = GRID, b_ = BLOCK;                                        \
    std::lock_guard<std::mutex> one_at_a_time_(emu_coop_launch);                    \
    const unsigned n_ = b_.x * b_.y * b_.z;                                         \
    for (unsigned bz = 0; bz < g_.z; ++bz)                                          \
      for (unsigned by = 0; by < g_.y; ++by)                                        \
        for (unsigned bx = 0; bx < g_.x; ++bx) {                                    \
          EmuBlock blk(n_);                                                         \
          emu_block = &blk;                                                         \
          std::vector<std::thread> threads_;                                        \
          for (unsigned t_ = 0; t_ < n_; ++t_)                                      \
            threads_.emplace_back([&, t_] {                                         \
              gridDim = g_;                                                         \
              blockDim = b_;                                                        \
              blockIdx = effdet_dim3{bx, by, bz};                                   \
              threadIdx = effdet_dim3{t_ % b_.x, (t_ / b_.x) % b_.y, t_ / (b_.x * b_.y)}; \
              emu_linear = t_;                                                      \
              CALL;                                                                 \
              blk.warps[t_ / 32]->drop();                                           \
              blk.block.drop();                                                     \
            });                                                                     \
          for (auto& th : threads_) th.join();                                      \
          emu_block = nullptr;                                                      \
        }                                                                           \
  } while (0)

static unsigned blocks(long long n, unsigned b) { return (unsigned)((n + b - 1) / b > 0 ? (n + b - 1) / b : 1); }

extern "C" {

// Layout of the shared structs as this compiler sees them: sizes, then selected offsets.
void emu_layout(size_t* out) {
  out[0] = sizeof(PreprocessImage);
  out[1] = offsetof(PreprocessImage, stride);
  out[2] = offsetof(PreprocessImage, yuv);
  out[3] = sizeof(TopkState);
  out[4] = sizeof(DecodeImage);
  out[5] = sizeof(GpuDetection);
  out[6] = offsetof(GpuDetection, class_id);
}

void emu_preprocess(const PreprocessImage* images, int n, const float* lut, const int* fill,
                    int size, half_t* out) {
  effdet_dim3 grid{blocks(size, 16), blocks(size, 16), (unsigned)n};
  EMU_LAUNCH(grid, (effdet_dim3{16, 16, 1}), preprocess_letterbox(images, lut, fill, size, out));
}

// One feature level of a batch: class [N][A*K][H][W] and box [N][A*4][H][W] FP16.
struct EmuLevel {
  const half_t* cls;
  const half_t* box;
  int height;
  int width;
};

// The whole post-processing for `batch` images; dets[batch][max_det], counts[batch].
void emu_postprocess(const EmuLevel* levels, int num_levels, int batch, int anchors_per_loc,
                     int num_classes, const float* anchors, int num_anchors, u32 max_points,
                     int max_det, double iou_threshold, float score_threshold,
                     const DecodeImage* images, GpuDetection* dets, u32* counts) {
  u32 n = (u32)num_anchors * num_classes;
  u32 k = max_points < n ? max_points : n;
  if (k == 0) k = 1;
  int words = (int)((k + 63) / 64);
  std::vector<float> logits((size_t)batch * n), codes((size_t)batch * num_anchors * 4);
  std::vector<TopkState> states(batch);
  std::vector<u32> hist((size_t)batch * 256, 0), classes((size_t)batch * k);
  std::vector<u64> selected((size_t)batch * k), mask((size_t)batch * k * words),
      removed((size_t)batch * words, 0);
  std::vector<float> boxes((size_t)batch * k * 4), scores((size_t)batch * k);
  int anchor0 = 0;
  for (int l = 0; l < num_levels; ++l) {
    const EmuLevel& lv = levels[l];
    long long hw = (long long)lv.height * lv.width;
    long long cls_stride = anchors_per_loc * num_classes * hw, box_stride = anchors_per_loc * 4 * hw;
    effdet_dim3 grid{blocks(hw * anchors_per_loc, 64), (unsigned)batch, 1};
    EMU_LAUNCH(grid, (effdet_dim3{64, 1, 1}),
               gather_level(lv.cls, lv.box, cls_stride, box_stride, anchors_per_loc, num_classes,
                            lv.height, lv.width, anchor0, logits.data(), (long long)n,
                            codes.data(), (long long)num_anchors));
    anchor0 += (int)(hw * anchors_per_loc);
  }
  effdet_dim3 per_image{blocks(batch, 64), 1, 1}, b64{64, 1, 1};
  EMU_LAUNCH(per_image, b64, topk_init(states.data(), batch, max_points, n));
  // A small grid, so that the grid-stride loops wrap several times.
  effdet_dim3 scan{3, (unsigned)batch, 1};
  for (int round = 0; round < 8; ++round) {
    EMU_LAUNCH_BLOCKS(scan, b64, topk_histogram(logits.data(), n, states.data(), round, hist.data()));
    EMU_LAUNCH(per_image, b64, topk_select(hist.data(), states.data(), batch, round));
  }
  EMU_LAUNCH(scan, b64, topk_gather(logits.data(), n, states.data(), k, selected.data()));
  effdet_dim3 per_cand{blocks(k, 64), (unsigned)batch, 1};
  EMU_LAUNCH(per_cand, b64,
             topk_rank_decode(selected.data(), k, states.data(), logits.data(), n, codes.data(),
                              anchors, num_classes, images, boxes.data(), scores.data(),
                              classes.data()));
  effdet_dim3 per_word{blocks((long long)k * words, 64), (unsigned)batch, 1};
  EMU_LAUNCH(per_word, b64,
             nms_mask(boxes.data(), classes.data(), states.data(), k, words, iou_threshold,
                      mask.data()));
  // A block per image, 64 threads: fewer than the words of a 5000-candidate mask, so the
  // word loop wraps.
  EMU_LAUNCH_BLOCKS((effdet_dim3{(unsigned)batch, 1, 1}), b64,
                    nms_reduce(mask.data(), states.data(), k, words, boxes.data(), scores.data(),
                               classes.data(), images, batch, max_det, score_threshold,
                               removed.data(), dets, counts));
}

// One thread per element of an n-element output, 64 per block (launch shape of backend.rs).
#define EMU_1D(n, call) EMU_LAUNCH((effdet_dim3{blocks(n, 64), 1, 1}), (effdet_dim3{64, 1, 1}), call)

void emu_conv2d(const half_t* x, const half_t* w, const half_t* bias, const half_t* residual,
                half_t* y, ConvParams p) {
  EMU_1D((long long)p.n * p.cout * p.oh * p.ow, conv2d_direct(x, w, bias, residual, y, p));
}
void emu_channel_affine(const half_t* x, half_t* y, const half_t* scale, const half_t* shift,
                        long long n, int channels, long long hw, int act) {
  EMU_1D(n, channel_affine(x, y, scale, shift, n, channels, hw, act));
}
void emu_activation(const half_t* x, half_t* y, long long n, int act) {
  EMU_1D(n, activation(x, y, n, act));
}
void emu_add(const half_t* a, const half_t* b, half_t* y, long long n) { EMU_1D(n, add(a, b, y, n)); }
// A block of 256 threads per plane, as backend.rs launches it.
void emu_global_avg_pool(const half_t* x, half_t* y, long long planes, long long hw) {
  EMU_LAUNCH_BLOCKS((effdet_dim3{(unsigned)planes, 1, 1}), (effdet_dim3{256, 1, 1}),
                    global_avg_pool(x, y, planes, hw));
}
void emu_scale_channels(const half_t* x, const half_t* s, half_t* y, long long n, long long hw) {
  EMU_1D(n, scale_channels(x, s, y, n, hw));
}
void emu_max_pool_same(const half_t* x, half_t* y, long long planes, int h, int w, int oh, int ow,
                       int k, int stride, int pad_top, int pad_left) {
  EMU_1D(planes * oh * ow, max_pool_same(x, y, planes, h, w, oh, ow, k, stride, pad_top, pad_left));
}
void emu_upsample_nearest(const half_t* x, half_t* y, long long planes, int h, int w, int oh, int ow) {
  EMU_1D(planes * oh * ow, upsample_nearest(x, y, planes, h, w, oh, ow));
}
void emu_weighted_sum(const half_t* x0, const half_t* x1, const half_t* x2, float w0, float w1,
                      float w2, half_t* y, long long n, int act) {
  EMU_1D(n, weighted_sum(x0, x1, x2, w0, w1, w2, y, n, act));
}

}  // extern "C"
