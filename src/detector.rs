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
    /// The best engine available on this machine (today: the CPU; the CUDA engine joins when
    /// its network is complete).
    #[default]
    Auto,
    /// The f32 CPU engine.
    Cpu,
    /// The CUDA FP16 engine (`compute::cuda`). Its pre- and post-processing kernels exist; the
    /// FP16 network does not yet, so building a detector with it fails with the reason (no GPU
    /// or CUDA libraries here, or the unfinished engine).
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

/// Why [`BackendKind::Cuda`] cannot build a detector on this machine.
fn cuda_unavailable() -> Error {
    let reason = crate::compute::cuda::unavailable_reason().unwrap_or_else(|| {
        "a GPU is present, but the CUDA FP16 network is not implemented yet (GPU pre- and \
         post-processing are); use `cpu` or `auto`"
            .into()
    });
    // The probe's error already reads "backend `cuda` is unavailable: ..."; keep one prefix.
    let reason = reason
        .strip_prefix("backend `cuda` is unavailable: ")
        .map(str::to_string)
        .unwrap_or(reason);
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason,
    }
}

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
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions {
            config: EfficientDetConfig::d0(),
            backend: BackendKind::Auto,
            threads: 0,
            postprocess: PostprocessConfig::default(),
            labels: None,
        }
    }
}

enum Engine {
    Cpu {
        backend: CpuBackend,
        model: EfficientDet<CpuBackend>,
    },
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
    /// (`effdet.image_size`, used unless `options.config.image_size` was changed from D0's
    /// 512x512) and class names (`effdet.labels`, used unless `options.labels` is given).
    pub fn from_weights(store: &WeightStore, options: DetectorOptions) -> Result<Self> {
        let mut options = options;
        let meta = store.metadata();
        if options.config.image_size == EfficientDetConfig::d0().image_size
            && let Some(v) = meta.get(META_IMAGE_SIZE)
        {
            let s: usize = v.parse().map_err(|_| Error::WeightsFormat {
                path: store.path().to_path_buf(),
                reason: format!("metadata {META_IMAGE_SIZE} = {v:?} is not a size"),
            })?;
            if s == 0 || !s.is_multiple_of(128) {
                return Err(Error::WeightsFormat {
                    path: store.path().to_path_buf(),
                    reason: format!("metadata {META_IMAGE_SIZE} = {s} is not a multiple of 128"),
                });
            }
            options.config.image_size = (s, s);
        }
        let a = options.config.anchors_per_location();
        if let Some((_, shape)) = store
            .names()
            .find(|(k, _)| *k == "class_net.predict.conv_pw.weight")
            && shape.first().is_some_and(|&n| n > 0 && n % a == 0)
        {
            options.config.num_classes = shape[0] / a;
        }
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
        if options.backend == BackendKind::Auto
            && let Some(why) = crate::compute::cuda::unavailable_reason()
        {
            tracing::debug!("backend auto: using the CPU ({why})");
        }
        let engine = match options.backend {
            BackendKind::Cuda => return Err(cuda_unavailable()),
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
        }
    }

    pub fn config(&self) -> &EfficientDetConfig {
        match &self.engine {
            Engine::Cpu { model, .. } => model.config(),
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
    /// GStreamer element whose thresholds change while playing).
    pub fn detect_batch_with(
        &self,
        frames: &[Frame],
        post: &PostprocessConfig,
    ) -> Result<Vec<Vec<Detection>>> {
        if frames.is_empty() {
            return Ok(Vec::new());
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
        let run = || {
            data.par_chunks_mut(per)
                .zip(frames.par_iter())
                .map(|(out, f)| preprocess_into(f, h, out))
                .collect::<Result<Vec<_>>>()
        };
        let boxes = match &self.engine {
            Engine::Cpu { backend, .. } => backend.install(run)?,
        };
        Ok((Tensor::new(vec![frames.len(), 3, h, w], data)?, boxes))
    }

    /// Runs the network on a normalised input batch; returns raw per-level outputs on the host.
    pub fn forward(&self, input: &Tensor) -> Result<Vec<LevelOutputs<Tensor>>> {
        let _s = tracing::debug_span!("infer", backend = self.backend_name()).entered();
        match &self.engine {
            Engine::Cpu { backend, model } => backend.install(|| model.forward(backend, input)),
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
            Ok(raw
                .into_iter()
                .map(|r| Detection {
                    x1: r.bbox[0],
                    y1: r.bbox[1],
                    x2: r.bbox[2],
                    y2: r.bbox[3],
                    score: r.score,
                    class_id: r.class_id,
                    label: self.labels.name(r.class_id),
                })
                .collect())
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
        }
    }
}
