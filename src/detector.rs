//! The user-facing detector: frames in, labelled detections out.
//!
//! A frame flows `preprocess` (letterbox + normalise into a batch tensor) -> `forward` (the
//! network on the chosen engine) -> `postprocess` (top-k, decode, clip, NMS, labels). Each stage
//! is public so tools can time or test it alone.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::compute::Tensor;
use crate::compute::cpu::CpuBackend;
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::labels::Labels;
use crate::model::{EfficientDet, EfficientDetConfig, LevelOutputs, WeightStore};
use crate::postprocess::{
    AnchorConfig, Anchors, ImageInfo, LevelOutput, PostprocessConfig, postprocess,
};
use crate::preprocess::{Letterbox, preprocess_into};

/// Which engine runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The best engine available on this machine: the CPU today; the CUDA engine once it is
    /// validated on a GPU ([`CUDA_IN_AUTO`]).
    #[default]
    Auto,
    /// The f32 CPU engine.
    Cpu,
    /// The CUDA FP16 engine (`compute::cuda`): GPU pre-processing, the network in FP16 and
    /// GPU top-k/decode/NMS. Where no GPU can be used, building a detector with it fails with
    /// the reason. Not yet validated on a GPU, so `Auto` does not choose it (see
    /// [`CUDA_IN_AUTO`]).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "tensorrt" => Err(Error::BackendUnavailable {
                backend: s.into(),
                reason: "this build has no TensorRT engine yet; use `cpu` or `auto`".into(),
            }),
            other => Err(Error::InvalidArgument(format!(
                "unknown backend `{other}` (expected auto, cpu or cuda)"
            ))),
        }
    }
}

/// Whether [`BackendKind::Auto`] picks the CUDA engine when a GPU is usable. Off until the
/// engine's GPU tests (`tests/cuda_gpu.rs`) have passed on real hardware: its kernels are
/// verified under host emulation and NVRTC, its cudarc orchestration only on a GPU.
pub const CUDA_IN_AUTO: bool = false;

/// Everything that configures a [`Detector`] besides its weights.
#[derive(Clone, Debug)]
pub struct DetectorOptions {
    pub config: EfficientDetConfig,
    pub backend: BackendKind,
    /// CPU worker threads; 0 = one per core.
    pub threads: usize,
    pub postprocess: PostprocessConfig,
    /// A label file; `None` uses COCO's names.
    pub labels: Option<PathBuf>,
    /// GPU ordinal for the CUDA engine (0 = the first GPU).
    pub device: usize,
    /// Square network input size for a model loaded from weights (a multiple of 128). `None`
    /// runs it at the size it was trained at (the `effdet.image_size` metadata, else
    /// `config.image_size`). A larger size makes small objects larger to the network; a model
    /// trained with scale jitter usually finds more of them there, at the cost of more compute.
    pub input_size: Option<usize>,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions {
            config: EfficientDetConfig::d0(),
            backend: BackendKind::Auto,
            threads: 0,
            postprocess: PostprocessConfig::default(),
            labels: None,
            device: 0,
            input_size: None,
        }
    }
}

// One engine per detector, never moved in a hot loop: the variants' size difference is moot.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Cpu {
        backend: CpuBackend,
        model: EfficientDet<CpuBackend>,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda_engine::CudaEngine>),
}

/// An EfficientDet detector: loaded once, then `detect` per frame (thread-safe: `&self`).
pub struct Detector {
    engine: Engine,
    anchors: Anchors,
    labels: Labels,
    post: PostprocessConfig,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("backend", &self.backend_name())
            .field("postprocess", &self.post)
            .finish()
    }
}

/// Weights metadata key: the square network input size the model was trained at.
pub const META_IMAGE_SIZE: &str = "effdet.image_size";
/// Weights metadata key: the label file text (`<class> <name>` lines).
pub const META_LABELS: &str = "effdet.labels";

/// The model configuration `store` was trained with, starting from `base`: the number of
/// classes from the class predictor's shape (`anchors * classes` outputs) and the input size:
/// `input_size` when given, else the `effdet.image_size` metadata that `effdet train` writes,
/// else `base`'s. Every tool that builds a network from a weights file (the [`Detector`],
/// `effdet loss`) derives its configuration here, so they agree.
pub fn config_for_weights(
    store: &WeightStore,
    base: EfficientDetConfig,
    input_size: Option<usize>,
) -> Result<EfficientDetConfig> {
    let mut config = base;
    let invalid = |s: usize| s == 0 || !s.is_multiple_of(128);
    match (input_size, store.metadata().get(META_IMAGE_SIZE)) {
        (Some(s), _) if invalid(s) => {
            return Err(Error::InvalidArgument(format!(
                "input size {s} is not a positive multiple of 128"
            )));
        }
        (Some(s), _) => config.image_size = (s, s),
        (None, Some(v)) => {
            let bad = |reason| Error::WeightsFormat {
                path: store.path().to_path_buf(),
                reason,
            };
            let s: usize = v
                .parse()
                .map_err(|_| bad(format!("metadata {META_IMAGE_SIZE} = {v:?} is not a size")))?;
            if invalid(s) {
                return Err(bad(format!(
                    "metadata {META_IMAGE_SIZE} = {s} is not a multiple of 128"
                )));
            }
            config.image_size = (s, s);
        }
        (None, None) => {}
    }
    let a = config.anchors_per_location();
    if let Some((_, shape)) = store
        .names()
        .find(|(k, _)| *k == "class_net.predict.conv_pw.weight")
        && shape.first().is_some_and(|&n| n > 0 && n % a == 0)
    {
        config.num_classes = shape[0] / a;
    }
    Ok(config)
}

impl Detector {
    /// Loads weights (effdet-named safetensors, f32/f16/bf16) and builds the detector.
    pub fn new(weights: impl AsRef<Path>, options: DetectorOptions) -> Result<Self> {
        let store = WeightStore::open(weights)?;
        Self::from_weights(&store, options)
    }

    /// Builds the detector from an already-read weight store.
    ///
    /// The number of classes is taken from the weights (the class predictor has
    /// `anchors * classes` outputs), so models trained on other datasets load without extra
    /// settings. Weights written by `effdet train` also carry their input size
    /// (`effdet.image_size`, used unless `options.input_size` is given) and class names
    /// (`effdet.labels`, used unless `options.labels` is given).
    pub fn from_weights(store: &WeightStore, options: DetectorOptions) -> Result<Self> {
        let mut options = options;
        options.config = config_for_weights(store, options.config, options.input_size)?;
        let meta = store.metadata();
        let labels = match (&options.labels, meta.get(META_LABELS)) {
            (Some(p), _) => Labels::from_file(p)?,
            (None, Some(text)) => Labels::parse(text).map_err(|reason| Error::WeightsFormat {
                path: store.path().to_path_buf(),
                reason: format!("metadata {META_LABELS}: {reason}"),
            })?,
            (None, None) => Labels::coco(),
        };
        let cfg = &options.config;
        let anchors = Anchors::new(&AnchorConfig {
            min_level: cfg.min_level,
            max_level: cfg.max_level,
            num_scales: cfg.num_scales,
            aspect_ratios: cfg.aspect_ratios.clone(),
            anchor_scale: cfg.anchor_scale,
            image_size: cfg.image_size,
        })?;
        let mut post = options.postprocess.clone();
        post.num_classes = cfg.num_classes;
        let mut backend = options.backend;
        if backend == BackendKind::Auto {
            match crate::compute::cuda::unavailable_reason() {
                None if CUDA_IN_AUTO => backend = BackendKind::Cuda,
                None => tracing::debug!("backend auto: using the CPU (CUDA engine not validated)"),
                Some(why) => tracing::debug!("backend auto: using the CPU ({why})"),
            }
        }
        let engine = match backend {
            BackendKind::Cuda => cuda_engine::build(store, &options)?,
            BackendKind::Auto | BackendKind::Cpu => {
                let backend = CpuBackend::new(options.threads)?;
                let model = EfficientDet::load(&backend, store, options.config.clone())?;
                Engine::Cpu { backend, model }
            }
        };
        Ok(Detector {
            engine,
            anchors,
            labels,
            post,
        })
    }

    /// The engine in use (`cpu`, ...).
    pub fn backend_name(&self) -> &'static str {
        match &self.engine {
            Engine::Cpu { .. } => "cpu",
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => "cuda",
        }
    }

    pub fn config(&self) -> &EfficientDetConfig {
        match &self.engine {
            Engine::Cpu { model, .. } => model.config(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(e) => e.model.config(),
        }
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    pub fn postprocess_config(&self) -> &PostprocessConfig {
        &self.post
    }

    /// Changes thresholds, NMS method or detection count for later calls.
    pub fn set_postprocess_config(&mut self, mut post: PostprocessConfig) {
        post.num_classes = self.config().num_classes;
        self.post = post;
    }

    /// Detects objects in one frame, with the detector's post-processing settings.
    pub fn detect(&self, frame: &Frame) -> Result<Vec<Detection>> {
        Ok(self
            .detect_batch(std::slice::from_ref(frame))?
            .pop()
            .unwrap_or_default())
    }

    /// Detects objects in several frames with one network pass.
    pub fn detect_batch(&self, frames: &[Frame]) -> Result<Vec<Vec<Detection>>> {
        self.detect_batch_with(frames, &self.post)
    }

    /// As [`detect_batch`](Self::detect_batch) with explicit post-processing settings (e.g. a
    /// GStreamer element whose thresholds change while playing). `post.num_classes` is ignored:
    /// the model's class count always applies.
    pub fn detect_batch_with(
        &self,
        frames: &[Frame],
        post: &PostprocessConfig,
    ) -> Result<Vec<Vec<Detection>>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let post = &self.with_model_classes(post);
        #[cfg(feature = "cuda")]
        if let Engine::Cuda(e) = &self.engine {
            return e.detect_batch(self, frames, post);
        }
        let (input, boxes) = self.preprocess(frames)?;
        let outputs = self.forward(&input)?;
        self.postprocess(&outputs, &boxes, post)
    }

    /// Letterboxes and normalises frames into one `[N, 3, H, W]` input tensor.
    pub fn preprocess(&self, frames: &[Frame]) -> Result<(Tensor, Vec<Letterbox>)> {
        let _s = tracing::debug_span!("preprocess", frames = frames.len()).entered();
        let (h, w) = self.config().image_size;
        if h != w {
            return Err(Error::InvalidArgument(format!(
                "non-square network input {h}x{w} is not supported by the letterbox"
            )));
        }
        let per = 3 * h * w;
        let mut data = vec![0f32; frames.len() * per];
        #[allow(unused_mut)] // only the CUDA arm calls it directly
        let mut run = || {
            data.par_chunks_mut(per)
                .zip(frames.par_iter())
                .map(|(out, f)| preprocess_into(f, h, out))
                .collect::<Result<Vec<_>>>()
        };
        let boxes = match &self.engine {
            Engine::Cpu { backend, .. } => backend.install(run)?,
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => run()?,
        };
        Ok((Tensor::new(vec![frames.len(), 3, h, w], data)?, boxes))
    }

    /// Runs the network on a normalised input batch; returns raw per-level outputs on the host.
    pub fn forward(&self, input: &Tensor) -> Result<Vec<LevelOutputs<Tensor>>> {
        let _s = tracing::debug_span!("infer", backend = self.backend_name()).entered();
        match &self.engine {
            Engine::Cpu { backend, model } => {
                backend.install(|| cpu_forward(backend, model, input))
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(e) => e.forward(input),
        }
    }

    /// Times the network alone for benchmarks: `warmup` untimed then `iters` timed passes over
    /// `input`, which is first placed where the engine computes (uploaded once for the GPU);
    /// each pass ends when its outputs are complete on that device (the GPU stream is
    /// synchronised; nothing is copied back). Returns the milliseconds of each timed pass.
    pub fn time_network(&self, input: &Tensor, warmup: usize, iters: usize) -> Result<Vec<f64>> {
        match &self.engine {
            Engine::Cpu { backend, model } => backend.install(|| {
                timed_passes(warmup, iters, || {
                    std::hint::black_box(cpu_forward(backend, model, input)?);
                    Ok(())
                })
            }),
            #[cfg(feature = "cuda")]
            Engine::Cuda(e) => e.time_network(input, warmup, iters),
        }
    }

    /// Device memory in use on this detector's GPU, in bytes (the device's total minus its
    /// free memory, so it includes the CUDA context and anything else on that GPU); `None` for
    /// the CPU engine.
    pub fn device_memory_in_use(&self) -> Result<Option<usize>> {
        match &self.engine {
            Engine::Cpu { .. } => Ok(None),
            #[cfg(feature = "cuda")]
            Engine::Cuda(e) => e.memory_in_use().map(Some),
        }
    }

    /// What the engine chose and holds, for benchmark records and logs: for the CUDA engine
    /// the GPU, whether cuBLAS was found and the policy, how many pointwise shapes chose cuBLAS
    /// and how many the direct kernel, and the memory pool's bytes in use and reserved (now and
    /// at most); `None` for the CPU engine.
    pub fn engine_report(&self) -> Result<Option<serde_json::Value>> {
        match &self.engine {
            Engine::Cpu { .. } => Ok(None),
            #[cfg(feature = "cuda")]
            Engine::Cuda(e) => e.report().map(Some),
        }
    }

    /// Turns raw outputs into labelled detections in original-image pixels, one list per image.
    pub fn postprocess(
        &self,
        outputs: &[LevelOutputs<Tensor>],
        letterboxes: &[Letterbox],
        post: &PostprocessConfig,
    ) -> Result<Vec<Vec<Detection>>> {
        let _s = tracing::debug_span!("postprocess").entered();
        let post = &self.with_model_classes(post);
        let per_image = |b: usize, lb: &Letterbox| -> Result<Vec<Detection>> {
            let levels = outputs
                .iter()
                .map(|o| {
                    let [n, cc, h, w] = o.class.dims4("postprocess")?;
                    let [_, cb, _, _] = o.boxes.dims4("postprocess")?;
                    if b >= n {
                        return Err(Error::Shape {
                            op: "postprocess",
                            detail: format!("image {b} of a batch of {n}"),
                        });
                    }
                    Ok(LevelOutput {
                        class: &o.class.data()[b * cc * h * w..(b + 1) * cc * h * w],
                        boxes: &o.boxes.data()[b * cb * h * w..(b + 1) * cb * h * w],
                        height: h,
                        width: w,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let info = ImageInfo {
                img_scale: lb.img_scale as f32,
                orig_width: lb.orig_width as f32,
                orig_height: lb.orig_height as f32,
            };
            let raw = postprocess(&levels, &self.anchors, Some(info), post)?;
            Ok(raw.into_iter().map(|r| self.label(r)).collect())
        };
        let run = || {
            letterboxes
                .par_iter()
                .enumerate()
                .map(|(b, lb)| per_image(b, lb))
                .collect::<Result<Vec<_>>>()
        };
        match &self.engine {
            Engine::Cpu { backend, .. } => backend.install(run),
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => run(),
        }
    }

    /// `post` with the model's class count (callers such as the GStreamer element build their
    /// settings before they know the model).
    fn with_model_classes(&self, post: &PostprocessConfig) -> PostprocessConfig {
        PostprocessConfig {
            num_classes: self.config().num_classes,
            ..post.clone()
        }
    }

    fn label(&self, r: crate::postprocess::RawDetection) -> Detection {
        Detection {
            x1: r.bbox[0],
            y1: r.bbox[1],
            x2: r.bbox[2],
            y2: r.bbox[3],
            score: r.score,
            class_id: r.class_id,
            label: self.labels.name(r.class_id),
        }
    }
}

/// Runs `pass` `warmup` times untimed, then `iters` times timed; the milliseconds of each timed
/// pass.
fn timed_passes(
    warmup: usize,
    iters: usize,
    mut pass: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        pass()?;
    }
    (0..iters)
        .map(|_| {
            let t = std::time::Instant::now();
            pass()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// Images the CPU engine runs through the network at a time. A batch is run a micro-batch after
/// another and the outputs joined: each op's working set (a few MB at batch 1, eight times that
/// at batch 8) then stays in the caches, so a batch costs the same per image as one image. A
/// whole batch of 8 at once took twice as long per image (`effdet bench --profile`: its
/// depthwise and SE ops became memory-bound). The results are the same bits either way: every
/// op computes each image on its own.
const CPU_MICRO_BATCH: usize = 1;

/// The network of a host-tensor engine (the CPU, or the profiler around it) on `input`,
/// [`CPU_MICRO_BATCH`] images at a time.
pub(crate) fn cpu_forward<B: crate::compute::Backend<Tensor = Tensor>>(
    backend: &B,
    model: &EfficientDet<B>,
    input: &Tensor,
) -> Result<Vec<LevelOutputs<Tensor>>> {
    let n = input.shape().first().copied().unwrap_or(0);
    if n <= CPU_MICRO_BATCH {
        return model.forward(backend, input);
    }
    let per = input.len() / n;
    let mut parts: Vec<Vec<LevelOutputs<Tensor>>> = Vec::with_capacity(n.div_ceil(CPU_MICRO_BATCH));
    for start in (0..n).step_by(CPU_MICRO_BATCH) {
        let end = (start + CPU_MICRO_BATCH).min(n);
        let mut shape = input.shape().to_vec();
        shape[0] = end - start;
        let x = Tensor::new(shape, input.data()[start * per..end * per].to_vec())?;
        parts.push(model.forward(backend, &x)?);
    }
    let join = |tensors: Vec<&Tensor>| -> Result<Tensor> {
        let mut shape = tensors[0].shape().to_vec();
        shape[0] = tensors.iter().map(|t| t.shape()[0]).sum();
        let mut data = Vec::with_capacity(tensors.iter().map(|t| t.len()).sum());
        for t in &tensors {
            data.extend_from_slice(t.data());
        }
        Tensor::new(shape, data)
    };
    (0..parts[0].len())
        .map(|l| {
            Ok(LevelOutputs {
                class: join(parts.iter().map(|p| &p[l].class).collect())?,
                boxes: join(parts.iter().map(|p| &p[l].boxes).collect())?,
            })
        })
        .collect()
}

/// Without the `cuda` feature: the reason the engine cannot be built.
#[cfg(not(feature = "cuda"))]
mod cuda_engine {
    use super::{DetectorOptions, Engine};
    use crate::error::{Error, Result};
    use crate::model::WeightStore;

    pub(super) fn build(_: &WeightStore, _: &DetectorOptions) -> Result<Engine> {
        Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "this build has no CUDA support (built without the `cuda` feature)".into(),
        })
    }
}

/// The CUDA engine inside a [`Detector`]: frames go through GPU pre-processing, the FP16
/// network and GPU post-processing; only detections come back.
#[cfg(feature = "cuda")]
mod cuda_engine {
    use std::sync::{Arc, Mutex};

    use super::{Detector, DetectorOptions, Engine};
    use crate::compute::cuda::GpuContext;
    use crate::compute::cuda::backend::{CudaBackend, GpuTensor};
    use crate::compute::cuda::postprocess::{GpuLevel, GpuPostprocessor};
    use crate::compute::cuda::preprocess::GpuPreprocessor;
    use crate::compute::{Backend, Tensor};
    use crate::detection::Detection;
    use crate::error::{Error, Result};
    use crate::frame::Frame;
    use crate::model::{EfficientDet, LevelOutputs, WeightStore};
    use crate::postprocess::{ImageInfo, NmsMethod, PostprocessConfig};

    pub(super) struct CudaEngine {
        backend: CudaBackend,
        pub(super) model: EfficientDet<CudaBackend>,
        pre: GpuPreprocessor,
        /// Rebuilt when the post-processing settings change.
        post: Mutex<Option<(PostprocessConfig, Arc<GpuPostprocessor>)>>,
    }

    pub(super) fn build(store: &WeightStore, options: &DetectorOptions) -> Result<Engine> {
        if let Some(why) = crate::compute::cuda::unavailable_reason() {
            // The probe's message already reads "backend `cuda` is unavailable: ...".
            let reason = why
                .strip_prefix("backend `cuda` is unavailable: ")
                .map(str::to_string)
                .unwrap_or(why);
            return Err(Error::BackendUnavailable {
                backend: "cuda".into(),
                reason,
            });
        }
        let (h, w) = options.config.image_size;
        if h != w {
            return Err(Error::InvalidArgument(format!(
                "non-square network input {h}x{w} is not supported by the letterbox"
            )));
        }
        let gpu = Arc::new(GpuContext::new(options.device)?);
        let backend = CudaBackend::new(gpu.clone())?;
        let model = EfficientDet::load(&backend, store, options.config.clone())?;
        let pre = GpuPreprocessor::new(gpu, h)?;
        Ok(Engine::Cuda(Box::new(CudaEngine {
            backend,
            model,
            pre,
            post: Mutex::new(None),
        })))
    }

    impl CudaEngine {
        /// The network on a host input batch, outputs back on the host (tools and tests).
        pub(super) fn forward(&self, input: &Tensor) -> Result<Vec<LevelOutputs<Tensor>>> {
            let x = self.backend.upload(input)?;
            self.download(&self.model.forward(&self.backend, &x)?)
        }

        pub(super) fn time_network(
            &self,
            input: &Tensor,
            warmup: usize,
            iters: usize,
        ) -> Result<Vec<f64>> {
            let x = self.backend.upload(input)?;
            let gpu = self.backend.gpu();
            gpu.synchronize()?;
            if std::env::var("EFFDET_CUDA_PROFILE").is_ok_and(|v| v == "1") {
                // One tuned forward pass (the first one tunes and loads), then exactly one
                // pass inside the profiler range: what `ncu --profile-from-start off` sees.
                drop(self.model.forward(&self.backend, &x)?);
                gpu.profiled(|| self.model.forward(&self.backend, &x).map(drop))?;
            }
            super::timed_passes(warmup, iters, || {
                let outs = self.model.forward(&self.backend, &x)?;
                gpu.synchronize()?;
                drop(outs);
                Ok(())
            })
        }

        pub(super) fn report(&self) -> Result<serde_json::Value> {
            let gpu = self.backend.gpu();
            let paths = self.backend.conv_paths();
            // A device without a memory pool reports none (null), not an error.
            let pool = gpu.pool_memory().ok();
            let (used, reserved, reserved_high) =
                (pool.map(|p| p.0), pool.map(|p| p.1), pool.map(|p| p.2));
            Ok(serde_json::json!({
                "gpu": gpu.info().name,
                "arch": format!("sm_{}", gpu.info().arch()),
                "cublas": paths.cublas,
                "conv_policy": format!("{:?}", paths.policy).to_lowercase(),
                "pointwise_shapes_gemm": paths.gemm_shapes,
                "pointwise_shapes_direct": paths.direct_shapes,
                "pool_used_bytes": used,
                "pool_reserved_bytes": reserved,
                "pool_reserved_high_bytes": reserved_high,
            }))
        }

        pub(super) fn memory_in_use(&self) -> Result<usize> {
            let (free, total) = self.backend.gpu().memory()?;
            Ok(total.saturating_sub(free))
        }

        fn download(&self, outs: &[LevelOutputs<GpuTensor>]) -> Result<Vec<LevelOutputs<Tensor>>> {
            outs.iter()
                .map(|o| {
                    Ok(LevelOutputs {
                        class: self.backend.download(&o.class)?,
                        boxes: self.backend.download(&o.boxes)?,
                    })
                })
                .collect()
        }

        fn postprocessor(
            &self,
            det: &Detector,
            cfg: &PostprocessConfig,
        ) -> Result<Arc<GpuPostprocessor>> {
            let mut guard = self.post.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((c, p)) = guard.as_ref()
                && c == cfg
            {
                return Ok(p.clone());
            }
            let p = Arc::new(GpuPostprocessor::new(
                self.backend.gpu().clone(),
                &det.anchors,
                cfg,
            )?);
            *guard = Some((cfg.clone(), p.clone()));
            Ok(p)
        }

        pub(super) fn detect_batch(
            &self,
            det: &Detector,
            frames: &[Frame],
            post: &PostprocessConfig,
        ) -> Result<Vec<Vec<Detection>>> {
            let size = self.model.config().image_size.0;
            let shape = vec![frames.len(), 3, size, size];
            let mut input = self.backend.alloc(shape)?;
            let letterboxes = self.pre.run(frames, input.data_mut())?;
            let outs = self.model.forward(&self.backend, &input)?;
            if !matches!(post.nms, NmsMethod::Hard) {
                // Soft-NMS runs on the CPU: bring the raw outputs back.
                return det.postprocess(&self.download(&outs)?, &letterboxes, post);
            }
            let gp = self.postprocessor(det, post)?;
            let levels: Vec<GpuLevel> = outs
                .iter()
                .map(|o| GpuLevel {
                    class: o.class.data(),
                    boxes: o.boxes.data(),
                })
                .collect();
            let infos: Vec<ImageInfo> = letterboxes
                .iter()
                .map(|lb| ImageInfo {
                    img_scale: lb.img_scale as f32,
                    orig_width: lb.orig_width as f32,
                    orig_height: lb.orig_height as f32,
                })
                .collect();
            Ok(gp
                .run(&levels, &infos)?
                .into_iter()
                .map(|dets| dets.into_iter().map(|r| det.label(r)).collect())
                .collect())
        }
    }
}
