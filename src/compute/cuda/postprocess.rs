//! Host side of the GPU post-processing (`kernels/postprocess.cu`): the head outputs stay on
//! the device; gather, top-k, decode and NMS run as a fixed sequence of launches on the
//! detector's stream (no host synchronisation in between, so it can join a CUDA graph), and
//! only the final detections are copied back.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{GpuContext, driver_error};
use super::kernels::POSTPROCESS;
use super::params::{DecodeImage, GpuDetection, TopkState};
use crate::error::{Error, Result};
use crate::postprocess::{Anchors, ImageInfo, NmsMethod, PostprocessConfig, RawDetection};

/// One level's head outputs on the device, FP16 NCHW for the whole batch.
pub struct GpuLevel<'a> {
    /// `[N, A*K, H, W]`.
    pub class: &'a CudaSlice<u16>,
    /// `[N, A*4, H, W]`.
    pub boxes: &'a CudaSlice<u16>,
}

struct Buffers {
    batch: usize,
    logits: CudaSlice<f32>,
    codes: CudaSlice<f32>,
    states: CudaSlice<TopkState>,
    hist: CudaSlice<u32>,
    selected: CudaSlice<u64>,
    boxes: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    classes: CudaSlice<u32>,
    mask: CudaSlice<u64>,
    removed: CudaSlice<u64>,
    images: CudaSlice<DecodeImage>,
    dets: CudaSlice<GpuDetection>,
    counts: CudaSlice<u32>,
}

struct Functions {
    gather: CudaFunction,
    init: CudaFunction,
    histogram: CudaFunction,
    select: CudaFunction,
    gather_topk: CudaFunction,
    rank_decode: CudaFunction,
    mask: CudaFunction,
    reduce: CudaFunction,
}

/// GPU top-k + decode + hard NMS for one model's anchors and post-processing settings.
pub struct GpuPostprocessor {
    gpu: Arc<GpuContext>,
    f: Functions,
    anchors: CudaSlice<f32>,
    feat_sizes: Vec<(usize, usize)>,
    anchors_per_loc: usize,
    num_anchors: usize,
    cfg: PostprocessConfig,
    iou_threshold: f64,
    buffers: Mutex<Option<Buffers>>,
}

fn launch_err(name: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| driver_error(&format!("launch {name}"), e)
}

fn grid(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize).max(1)) as u32
}

impl GpuPostprocessor {
    /// Uploads the anchors and loads the kernels. Soft-NMS is not implemented on the GPU
    /// ([`Error::InvalidArgument`]: the engine runs that configuration's NMS on the CPU).
    pub fn new(gpu: Arc<GpuContext>, anchors: &Anchors, cfg: &PostprocessConfig) -> Result<Self> {
        if !matches!(cfg.nms, NmsMethod::Hard) {
            return Err(Error::InvalidArgument(
                "GPU post-processing implements hard NMS only".into(),
            ));
        }
        if cfg.num_classes == 0 {
            return Err(Error::InvalidArgument(
                "num_classes must be at least 1".into(),
            ));
        }
        let total = anchors.len() as u64 * cfg.num_classes as u64;
        if total >= u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!(
                "{} anchors x {} classes exceed the GPU top-k's 32-bit index",
                anchors.len(),
                cfg.num_classes
            )));
        }
        let fun = |name: &str| gpu.function(&POSTPROCESS, name);
        let f = Functions {
            gather: fun("gather_level")?,
            init: fun("topk_init")?,
            histogram: fun("topk_histogram")?,
            select: fun("topk_select")?,
            gather_topk: fun("topk_gather")?,
            rank_decode: fun("topk_rank_decode")?,
            mask: fun("nms_mask")?,
            reduce: fun("nms_reduce")?,
        };
        let flat: Vec<f32> = anchors.boxes().iter().flatten().copied().collect();
        let anchors_dev = gpu
            .stream()
            .clone_htod(&flat)
            .map_err(|e| driver_error("upload anchors", e))?;
        Ok(GpuPostprocessor {
            iou_threshold: crate::postprocess::iou_threshold_f64(cfg.iou_threshold),
            gpu,
            f,
            anchors: anchors_dev,
            feat_sizes: anchors.feat_sizes().to_vec(),
            anchors_per_loc: anchors.anchors_per_location(),
            num_anchors: anchors.len(),
            cfg: cfg.clone(),
            buffers: Mutex::new(None),
        })
    }

    fn k(&self) -> usize {
        self.cfg
            .max_detection_points
            .min(self.num_anchors * self.cfg.num_classes)
            .max(1)
    }

    fn words(&self) -> usize {
        self.k().div_ceil(64)
    }

    fn alloc(&self, batch: usize) -> Result<Buffers> {
        let s = self.gpu.stream();
        let n = self.num_anchors * self.cfg.num_classes;
        let (k, words, max_det) = (self.k(), self.words(), self.cfg.max_detections.max(1));
        let z = |what: &str, e| driver_error(&format!("cuMemAlloc ({what})"), e);
        Ok(Buffers {
            batch,
            logits: s.alloc_zeros(batch * n).map_err(|e| z("logits", e))?,
            codes: s
                .alloc_zeros(batch * self.num_anchors * 4)
                .map_err(|e| z("box codes", e))?,
            states: s.alloc_zeros(batch).map_err(|e| z("top-k state", e))?,
            hist: s.alloc_zeros(batch * 256).map_err(|e| z("histogram", e))?,
            selected: s.alloc_zeros(batch * k).map_err(|e| z("top-k keys", e))?,
            boxes: s.alloc_zeros(batch * k * 4).map_err(|e| z("boxes", e))?,
            scores: s.alloc_zeros(batch * k).map_err(|e| z("scores", e))?,
            classes: s.alloc_zeros(batch * k).map_err(|e| z("classes", e))?,
            mask: s
                .alloc_zeros(batch * k * words)
                .map_err(|e| z("NMS mask", e))?,
            removed: s
                .alloc_zeros(batch * words)
                .map_err(|e| z("NMS state", e))?,
            images: s
                .clone_htod(&vec![DecodeImage::default(); batch])
                .map_err(|e| z("image info", e))?,
            dets: s
                .alloc_zeros(batch * max_det)
                .map_err(|e| z("detections", e))?,
            counts: s.alloc_zeros(batch).map_err(|e| z("detection counts", e))?,
        })
    }

    /// Detections for `infos.len()` images from their head outputs (`levels`, one per feature
    /// level, batch-major). Queues every step on the stream, then waits for the final copy.
    pub fn run(&self, levels: &[GpuLevel], infos: &[ImageInfo]) -> Result<Vec<Vec<RawDetection>>> {
        let batch = infos.len();
        if batch == 0 {
            return Ok(Vec::new());
        }
        if levels.len() != self.feat_sizes.len() {
            return Err(Error::InvalidArgument(format!(
                "{} levels of head outputs, the anchors have {}",
                levels.len(),
                self.feat_sizes.len()
            )));
        }
        let (a, nc) = (self.anchors_per_loc, self.cfg.num_classes);
        for (i, (l, &(h, w))) in levels.iter().zip(&self.feat_sizes).enumerate() {
            let (want_c, want_b) = (batch * a * nc * h * w, batch * a * 4 * h * w);
            if l.class.len() < want_c || l.boxes.len() < want_b {
                return Err(Error::InvalidArgument(format!(
                    "level {i}: head outputs of {} / {} values, {batch} images of {h}x{w} need \
                     {want_c} / {want_b}",
                    l.class.len(),
                    l.boxes.len()
                )));
            }
        }
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|b| b.batch < batch) {
            *guard = None; // free the smaller set first
            *guard = Some(self.alloc(batch)?);
        }
        let Some(b) = guard.as_mut() else {
            return Err(Error::Gpu {
                op: "post-processing buffers".into(),
                reason: "missing after allocation".into(),
            });
        };
        let s = self.gpu.stream().clone();
        let n = (self.num_anchors * nc) as u32;
        let n_logits = i64::from(n);
        let n_anchors = self.num_anchors as i64;
        let (k, words) = (self.k() as u32, self.words() as i32);
        let bsz = batch as i32;

        let decode: Vec<DecodeImage> = infos.iter().map(DecodeImage::new).collect();
        s.memcpy_htod(&decode, &mut b.images.slice_mut(..batch))
            .map_err(|e| driver_error("upload image info", e))?;

        // 1. Gather every level into the dense logits / codes.
        let mut anchor0 = 0i32;
        for (l, &(h, w)) in levels.iter().zip(&self.feat_sizes) {
            let (a_i, nc_i, h_i, w_i) = (a as i32, nc as i32, h as i32, w as i32);
            let cls_stride = (a * nc * h * w) as i64;
            let box_stride = (a * 4 * h * w) as i64;
            let cfg = LaunchConfig {
                grid_dim: (grid(h * w * a, 256), batch as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l_b = s.launch_builder(&self.f.gather);
            l_b.arg(l.class)
                .arg(l.boxes)
                .arg(&cls_stride)
                .arg(&box_stride)
                .arg(&a_i)
                .arg(&nc_i)
                .arg(&h_i)
                .arg(&w_i)
                .arg(&anchor0)
                .arg(&mut b.logits)
                .arg(&n_logits)
                .arg(&mut b.codes)
                .arg(&n_anchors);
            // SAFETY: arguments match `gather_level`; sizes were checked above.
            unsafe { l_b.launch(cfg) }.map_err(launch_err("gather_level"))?;
            anchor0 += (h * w * a) as i32;
        }

        // 2. Exact top-k by radix select.
        let per_image = LaunchConfig {
            grid_dim: (grid(batch, 64), 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let max_points = self.cfg.max_detection_points as u32;
        let mut l_b = s.launch_builder(&self.f.init);
        l_b.arg(&mut b.states).arg(&bsz).arg(&max_points).arg(&n);
        // SAFETY: arguments match `topk_init`.
        unsafe { l_b.launch(per_image) }.map_err(launch_err("topk_init"))?;
        let scan = LaunchConfig {
            grid_dim: (grid(n as usize, 256).min(1024), batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        for round in 0..8i32 {
            let mut l_b = s.launch_builder(&self.f.histogram);
            l_b.arg(&b.logits)
                .arg(&n)
                .arg(&b.states)
                .arg(&round)
                .arg(&mut b.hist);
            // SAFETY: arguments match `topk_histogram`.
            unsafe { l_b.launch(scan) }.map_err(launch_err("topk_histogram"))?;
            let mut l_b = s.launch_builder(&self.f.select);
            l_b.arg(&mut b.hist)
                .arg(&mut b.states)
                .arg(&bsz)
                .arg(&round);
            // SAFETY: arguments match `topk_select`.
            unsafe { l_b.launch(per_image) }.map_err(launch_err("topk_select"))?;
        }
        let mut l_b = s.launch_builder(&self.f.gather_topk);
        l_b.arg(&b.logits)
            .arg(&n)
            .arg(&mut b.states)
            .arg(&k)
            .arg(&mut b.selected);
        // SAFETY: arguments match `topk_gather`; `selected` holds k keys per image.
        unsafe { l_b.launch(scan) }.map_err(launch_err("topk_gather"))?;

        // 3. Rank, decode, clip, score.
        let per_candidate = LaunchConfig {
            grid_dim: (grid(k as usize, 256), batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let nc_i = nc as i32;
        let mut l_b = s.launch_builder(&self.f.rank_decode);
        l_b.arg(&b.selected)
            .arg(&k)
            .arg(&b.states)
            .arg(&b.logits)
            .arg(&n)
            .arg(&b.codes)
            .arg(&self.anchors)
            .arg(&nc_i)
            .arg(&b.images)
            .arg(&mut b.boxes)
            .arg(&mut b.scores)
            .arg(&mut b.classes);
        // SAFETY: arguments match `topk_rank_decode`.
        unsafe { l_b.launch(per_candidate) }.map_err(launch_err("topk_rank_decode"))?;

        // 4. NMS.
        let per_word = LaunchConfig {
            grid_dim: (grid(k as usize * words as usize, 256), batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l_b = s.launch_builder(&self.f.mask);
        l_b.arg(&b.boxes)
            .arg(&b.classes)
            .arg(&b.states)
            .arg(&k)
            .arg(&words)
            .arg(&self.iou_threshold)
            .arg(&mut b.mask);
        // SAFETY: arguments match `nms_mask`.
        unsafe { l_b.launch(per_word) }.map_err(launch_err("nms_mask"))?;
        s.memset_zeros(&mut b.removed)
            .map_err(|e| driver_error("cuMemsetD8Async (NMS state)", e))?;
        let max_det = self.cfg.max_detections as i32;
        let score_thr = self.cfg.score_threshold;
        let mut l_b = s.launch_builder(&self.f.reduce);
        l_b.arg(&b.mask)
            .arg(&b.states)
            .arg(&k)
            .arg(&words)
            .arg(&b.boxes)
            .arg(&b.scores)
            .arg(&b.classes)
            .arg(&b.images)
            .arg(&bsz)
            .arg(&max_det)
            .arg(&score_thr)
            .arg(&mut b.removed)
            .arg(&mut b.dets)
            .arg(&mut b.counts);
        // A block per image; its threads share the ORing of suppression rows, a word each.
        let per_image_block = LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `nms_reduce`; `dets` holds max_det per image.
        unsafe { l_b.launch(per_image_block) }.map_err(launch_err("nms_reduce"))?;

        // 5. Only the detections come back.
        let counts = self
            .gpu
            .read("the detection counts", &b.counts.slice(..batch))?;
        let md = self.cfg.max_detections.max(1);
        let dets = self
            .gpu
            .read("the detections", &b.dets.slice(..batch * md))?;
        Ok((0..batch)
            .map(|i| {
                dets[i * md..i * md + (counts[i] as usize).min(self.cfg.max_detections)]
                    .iter()
                    .map(|d| RawDetection {
                        bbox: d.bbox,
                        score: d.score,
                        class_id: d.class_id,
                    })
                    .collect()
            })
            .collect())
    }
}
