//! Implementation of the `effdet` element. See `mod.rs` for the user-facing description.
//!
//! Locking: `settings` and `state` are held only to copy values in or out. The detector lives
//! behind an `Arc` in the state, so inference runs with no lock held: caps queries, property
//! reads and threshold changes never wait for a frame to finish.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use effdet::postprocess::PostprocessConfig;
use effdet::{Detection, Detector, DetectorOptions, Frame, YuvMatrix, YuvRange};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;

use super::Backend;
use crate::formats::{FORMATS, pixel_format};
use crate::meta;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "effdet",
        gst::DebugColorFlags::empty(),
        Some("EfficientDet object detector"),
    )
});

const DEFAULT_BACKEND: Backend = Backend::Auto;

/// The model this repository trained and ships (EfficientDet-D0 on the synthetic shapes
/// dataset, 384x384 input; see models/README.md), as a path fixed when the plugin is built.
const BUNDLED_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/effdet-d0-shapes256.safetensors"
);

/// The `model` property's default: `$EFFDET_MODEL` when set, otherwise the bundled model when
/// its file exists (a plugin built from this repository), otherwise none.
fn default_model() -> Option<PathBuf> {
    if let Some(m) = std::env::var_os("EFFDET_MODEL").filter(|m| !m.is_empty()) {
        return Some(PathBuf::from(m));
    }
    let bundled = std::path::Path::new(BUNDLED_MODEL);
    bundled.is_file().then(|| {
        // Tidy the `plugins/gst-effdet/../../` for messages; the raw path works as well.
        bundled
            .canonicalize()
            .unwrap_or_else(|_| bundled.to_path_buf())
    })
}
const DEFAULT_DEVICE_ID: u32 = 0;
const DEFAULT_SCORE_THRESHOLD: f64 = 0.3;
const DEFAULT_IOU_THRESHOLD: f64 = 0.5;
const DEFAULT_MAX_DETECTIONS: u32 = 100;
const DEFAULT_INTERVAL: u32 = 1;
const DEFAULT_POST_MESSAGES: bool = false;
const DEFAULT_THREADS: u32 = 0;
const DEFAULT_INPUT_SIZE: u32 = 0;

#[derive(Debug, Clone)]
struct Settings {
    model: Option<PathBuf>,
    backend: Backend,
    device_id: u32,
    score_threshold: f64,
    iou_threshold: f64,
    max_detections: u32,
    labels: Option<PathBuf>,
    interval: u32,
    /// Class ids to keep; empty keeps all.
    classes: Vec<u32>,
    post_messages: bool,
    threads: u32,
    /// Network input size; 0 = the size the model was trained at.
    input_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: default_model(),
            backend: DEFAULT_BACKEND,
            device_id: DEFAULT_DEVICE_ID,
            score_threshold: DEFAULT_SCORE_THRESHOLD,
            iou_threshold: DEFAULT_IOU_THRESHOLD,
            max_detections: DEFAULT_MAX_DETECTIONS,
            labels: None,
            interval: DEFAULT_INTERVAL,
            classes: Vec::new(),
            post_messages: DEFAULT_POST_MESSAGES,
            threads: DEFAULT_THREADS,
            input_size: DEFAULT_INPUT_SIZE,
        }
    }
}

impl Settings {
    fn postprocess(&self) -> PostprocessConfig {
        PostprocessConfig {
            score_threshold: self.score_threshold as f32,
            iou_threshold: self.iou_threshold as f32,
            max_detections: self.max_detections as usize,
            ..PostprocessConfig::default()
        }
    }
}

/// Everything that exists between `start()` and `stop()`.
struct State {
    detector: Arc<Detector>,
    info: Option<gst_video::VideoInfo>,
    /// Frames seen since start or the last flush (drives `interval`).
    frames: u64,
    /// The last inference's detections, re-attached on skipped frames.
    last: Arc<Vec<Detection>>,
}

#[derive(Default)]
pub struct Effdet {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
}

/// Locks a mutex, recovering the data if a panic elsewhere poisoned it (the element keeps working
/// instead of turning one bug into a crash of the host application).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_classes(s: &str) -> Result<Vec<u32>, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| format!("`{t}` is not a class id"))
        })
        .collect()
}

fn colorimetry(info: &gst_video::VideoInfo) -> (YuvMatrix, YuvRange) {
    let c = info.colorimetry();
    let matrix = match c.matrix() {
        gst_video::VideoColorMatrix::Bt709 => YuvMatrix::Bt709,
        _ => YuvMatrix::Bt601,
    };
    let range = match c.range() {
        gst_video::VideoColorRange::Range0_255 => YuvRange::Full,
        _ => YuvRange::Limited,
    };
    (matrix, range)
}

impl Effdet {
    /// Runs the detector on one mapped buffer.
    fn infer(
        &self,
        detector: &Detector,
        buf: &gst::BufferRef,
        info: &gst_video::VideoInfo,
        post: &PostprocessConfig,
    ) -> Result<Vec<Detection>, gst::ErrorMessage> {
        let frame =
            gst_video::VideoFrameRef::from_buffer_ref_readable(buf, info).map_err(|_| {
                gst::error_msg!(
                    gst::StreamError::Format,
                    [
                        "Buffer of {} bytes cannot be mapped as a {}x{} {} frame",
                        buf.size(),
                        info.width(),
                        info.height(),
                        info.format().to_str()
                    ]
                )
            })?;
        let format = pixel_format(info.format()).ok_or_else(|| {
            gst::error_msg!(
                gst::CoreError::Negotiation,
                ["Unsupported format {}", info.format().to_str()]
            )
        })?;
        let n = frame.n_planes() as usize;
        let mut planes = Vec::with_capacity(n);
        let mut strides = Vec::with_capacity(n);
        for p in 0..n {
            let data = frame.plane_data(p as u32).map_err(|_| {
                gst::error_msg!(
                    gst::StreamError::Format,
                    ["Cannot read plane {p} of the frame"]
                )
            })?;
            planes.push(data);
            let stride = frame.plane_stride()[p];
            strides.push(usize::try_from(stride).map_err(|_| {
                gst::error_msg!(
                    gst::StreamError::Format,
                    ["Negative stride {stride} on plane {p} is not supported"]
                )
            })?);
        }
        let (matrix, range) = colorimetry(info);
        let f = Frame::from_planes(
            format,
            info.width() as usize,
            info.height() as usize,
            &planes,
            &strides,
        )
        .map_err(|e| gst::error_msg!(gst::StreamError::Format, ["{e}"]))?
        .with_colorimetry(matrix, range);
        let mut dets = detector
            .detect_batch_with(&[f], post)
            .map_err(|e| gst::error_msg!(gst::StreamError::Failed, ["Inference failed: {e}"]))?;
        Ok(dets.pop().unwrap_or_default())
    }

    fn post_detections(
        &self,
        frame: u64,
        pts: Option<gst::ClockTime>,
        dets: &[Detection],
        infer_ms: Option<f64>,
    ) {
        let list = gst::List::new(
            dets.iter()
                .map(|d| meta::detection_structure(d).to_send_value()),
        );
        let s = gst::Structure::builder("effdet")
            .field("frame", frame)
            .field_if_some("pts", pts)
            .field("inferred", infer_ms.is_some())
            .field_if_some("inference-ms", infer_ms)
            .field("detections", list)
            .build();
        let obj = self.obj();
        let _ = obj.post_message(gst::message::Element::builder(s).src(&*obj).build());
    }
}

#[glib::object_subclass]
impl ObjectSubclass for Effdet {
    const NAME: &'static str = "GstEffdet";
    type Type = super::Effdet;
    type ParentType = gst_base::BaseTransform;
}

impl ObjectImpl for Effdet {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Weights file: an effdet tf_efficientdet_d0 state_dict as safetensors (f32/f16/bf16). Loaded once when the element starts. Default: $EFFDET_MODEL, else the model bundled with the plugin's source (6 synthetic shape classes)")
                    .default_value(default_model().as_deref().and_then(|p| p.to_str()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("backend", DEFAULT_BACKEND)
                    .nick("Backend")
                    .blurb("Inference engine. auto picks the best available and falls back to the CPU with a warning; an unavailable engine chosen explicitly is an error at start")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("device-id")
                    .nick("Device ID")
                    .blurb("GPU to run on (CUDA/TensorRT engines; ignored by the CPU engine)")
                    .default_value(DEFAULT_DEVICE_ID)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("score-threshold")
                    .nick("Score threshold")
                    .blurb("Drop detections scoring below this (0 keeps all, as effdet does). Can change while playing")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_SCORE_THRESHOLD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("iou-threshold")
                    .nick("IoU threshold")
                    .blurb("Non-maximum suppression: a box overlapping a better box of the same class by more than this is removed. Can change while playing")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_IOU_THRESHOLD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-detections")
                    .nick("Maximum detections")
                    .blurb("Keep at most this many detections per frame, best first. Can change while playing")
                    .minimum(1)
                    .maximum(5000)
                    .default_value(DEFAULT_MAX_DETECTIONS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("labels")
                    .nick("Labels")
                    .blurb("Label file (\"<id> <name>\" per line, or one name per line); default: the model's COCO names")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("interval")
                    .nick("Interval")
                    .blurb("Run inference on every Nth frame; frames in between carry the last detections. Can change while playing")
                    .minimum(1)
                    .maximum(1000)
                    .default_value(DEFAULT_INTERVAL)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("classes")
                    .nick("Classes")
                    .blurb("Comma-separated class ids to keep, e.g. \"1,3\" for person and car (empty: all). Can change while playing")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("post-messages")
                    .nick("Post messages")
                    .blurb("Post an element message named \"effdet\" on the bus for every frame, with its detections. Can change while playing")
                    .default_value(DEFAULT_POST_MESSAGES)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("threads")
                    .nick("Threads")
                    .blurb("CPU engine worker threads (0 = one per core)")
                    .maximum(1024)
                    .default_value(DEFAULT_THREADS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("input-size")
                    .nick("Input size")
                    .blurb("Square network input size, a multiple of 128 (0 = the size the model was trained at, from its metadata). Larger finds smaller objects, for more compute")
                    .maximum(4096)
                    .default_value(DEFAULT_INPUT_SIZE)
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = lock(&self.settings);
        match pspec.name() {
            "model" => {
                // An empty string unsets the model (start then fails with "No model set").
                s.model = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .filter(|m| !m.is_empty())
                    .map(PathBuf::from)
            }
            "backend" => s.backend = value.get().unwrap_or(DEFAULT_BACKEND),
            "device-id" => s.device_id = value.get().unwrap_or(DEFAULT_DEVICE_ID),
            "score-threshold" => s.score_threshold = value.get().unwrap_or(DEFAULT_SCORE_THRESHOLD),
            "iou-threshold" => s.iou_threshold = value.get().unwrap_or(DEFAULT_IOU_THRESHOLD),
            "max-detections" => s.max_detections = value.get().unwrap_or(DEFAULT_MAX_DETECTIONS),
            "labels" => {
                s.labels = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .map(PathBuf::from)
            }
            "interval" => s.interval = value.get().unwrap_or(DEFAULT_INTERVAL),
            "classes" => {
                let text = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                match parse_classes(&text) {
                    Ok(c) => s.classes = c,
                    Err(e) => gst::error!(CAT, imp = self, "Ignoring classes=\"{text}\": {e}"),
                }
            }
            "post-messages" => s.post_messages = value.get().unwrap_or(DEFAULT_POST_MESSAGES),
            "threads" => s.threads = value.get().unwrap_or(DEFAULT_THREADS),
            "input-size" => s.input_size = value.get().unwrap_or(DEFAULT_INPUT_SIZE),
            other => gst::warning!(CAT, imp = self, "Unknown property {other}"),
        }
        gst::debug!(CAT, imp = self, "Set {} = {:?}", pspec.name(), value);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = lock(&self.settings);
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        match pspec.name() {
            "model" => path(&s.model).to_value(),
            "backend" => s.backend.to_value(),
            "device-id" => s.device_id.to_value(),
            "score-threshold" => s.score_threshold.to_value(),
            "iou-threshold" => s.iou_threshold.to_value(),
            "max-detections" => s.max_detections.to_value(),
            "labels" => path(&s.labels).to_value(),
            "interval" => s.interval.to_value(),
            "classes" => s
                .classes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .to_value(),
            "post-messages" => s.post_messages.to_value(),
            "threads" => s.threads.to_value(),
            "input-size" => s.input_size.to_value(),
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        // Standard video-filter QoS: late buffers are dropped before inference, so a live source
        // is not delayed without bound when inference is slower than the stream.
        self.obj().set_qos(true);
    }
}

impl GstObjectImpl for Effdet {}

impl ElementImpl for Effdet {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "EfficientDet object detector",
                "Filter/Analyzer/Video",
                "Detects objects with EfficientDet-D0 and attaches one GstVideoRegionOfInterestMeta per \
                 detection (roi_type = label, param structure \"detection\" with label, class-id, \
                 confidence and the exact box x1/y1/x2/y2); frames pass through unchanged",
                "effdet-rs developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list(FORMATS)
                .build();
            [gst::PadDirection::Src, gst::PadDirection::Sink]
                .into_iter()
                .filter_map(|dir| {
                    let name = if dir == gst::PadDirection::Src {
                        "src"
                    } else {
                        "sink"
                    };
                    gst::PadTemplate::new(name, dir, gst::PadPresence::Always, &caps).ok()
                })
                .collect()
        });
        TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for Effdet {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let s = lock(&self.settings).clone();
        let Some(model) = s.model.clone() else {
            return Err(gst::error_msg!(
                gst::ResourceError::NotFound,
                ["No model set: set the model property to an effdet weights file (.safetensors)"]
            ));
        };
        if !model.is_file() {
            return Err(gst::error_msg!(
                gst::ResourceError::NotFound,
                ["Model file {} not found", model.display()]
            ));
        }
        let backend = match s.backend.library_name().parse::<effdet::BackendKind>() {
            Ok(b) => b,
            Err(e) => return Err(gst::error_msg!(gst::LibraryError::Init, ["{e}"])),
        };
        if s.backend == Backend::Auto {
            let why = effdet::compute::cuda::unavailable_reason()
                .unwrap_or_else(|| "the CUDA engine is not validated on a GPU yet".into());
            gst::info!(
                CAT,
                imp = self,
                "backend=auto: using the CPU engine ({why})"
            );
        }
        let options = DetectorOptions {
            backend,
            threads: s.threads as usize,
            labels: s.labels.clone(),
            postprocess: s.postprocess(),
            device: s.device_id as usize,
            input_size: (s.input_size > 0).then_some(s.input_size as usize),
            ..DetectorOptions::default()
        };
        let t = Instant::now();
        let detector = Detector::new(&model, options).map_err(|e| match e {
            effdet::Error::Labels { .. } => gst::error_msg!(gst::ResourceError::OpenRead, ["{e}"]),
            effdet::Error::BackendUnavailable { .. } => {
                gst::error_msg!(gst::LibraryError::Init, ["{e}"])
            }
            effdet::Error::InvalidArgument(_) => {
                gst::error_msg!(gst::LibraryError::Settings, ["{e}"])
            }
            _ => gst::error_msg!(
                gst::ResourceError::OpenRead,
                ["Cannot load model {}: {e}", model.display()]
            ),
        })?;
        gst::info!(
            CAT,
            imp = self,
            "Loaded {} on the {} engine in {:.0} ms",
            model.display(),
            detector.backend_name(),
            t.elapsed().as_secs_f64() * 1e3
        );
        *lock(&self.state) = Some(State {
            detector: Arc::new(detector),
            info: None,
            frames: 0,
            last: Arc::new(Vec::new()),
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        *lock(&self.state) = None;
        gst::info!(CAT, imp = self, "Stopped");
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_video::VideoInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "Cannot parse caps {incaps}"))?;
        if pixel_format(info.format()).is_none() {
            return Err(gst::loggable_error!(
                CAT,
                "Unsupported format {}",
                info.format().to_str()
            ));
        }
        gst::debug!(
            CAT,
            imp = self,
            "Configured for {}x{} {}",
            info.width(),
            info.height(),
            info.format().to_str()
        );
        let mut state = lock(&self.state);
        if let Some(st) = state.as_mut() {
            // New geometry: earlier detections no longer describe the frames.
            st.info = Some(info);
            st.last = Arc::new(Vec::new());
            st.frames = 0;
        }
        Ok(())
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        if let gst::EventView::FlushStop(_) = event.view()
            && let Some(st) = lock(&self.state).as_mut()
        {
            st.last = Arc::new(Vec::new());
            st.frames = 0;
        }
        self.parent_sink_event(event)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = lock(&self.settings).clone();
        // Copy what this frame needs out of the state, then release the lock for inference.
        let (detector, info, frame_no, last) = {
            let mut state = lock(&self.state);
            let Some(st) = state.as_mut() else {
                gst::element_imp_error!(self, gst::CoreError::Negotiation, ["Not started"]);
                return Err(gst::FlowError::NotNegotiated);
            };
            let Some(info) = st.info.clone() else {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Negotiation,
                    ["No caps were negotiated"]
                );
                return Err(gst::FlowError::NotNegotiated);
            };
            let n = st.frames;
            st.frames += 1;
            (st.detector.clone(), info, n, st.last.clone())
        };

        let run = frame_no % settings.interval.max(1) as u64 == 0;
        let (dets, infer_ms) = if run {
            let t = Instant::now();
            let mut dets = match self.infer(&detector, buf, &info, &settings.postprocess()) {
                Ok(d) => d,
                Err(msg) => {
                    self.post_error_message(msg);
                    return Err(gst::FlowError::Error);
                }
            };
            if !settings.classes.is_empty() {
                dets.retain(|d| settings.classes.contains(&d.class_id));
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            gst::trace!(
                CAT,
                imp = self,
                "Frame {frame_no}: {} detections in {ms:.1} ms",
                dets.len()
            );
            let dets = Arc::new(dets);
            if let Some(st) = lock(&self.state).as_mut() {
                st.last = dets.clone();
            }
            (dets, Some(ms))
        } else {
            (last, None)
        };

        let (w, h) = (info.width(), info.height());
        for d in dets.iter() {
            meta::attach(buf, d, w, h);
        }
        #[cfg(feature = "analytics")]
        if let Err(e) = meta::attach_analytics(buf, &dets, w, h) {
            gst::warning!(CAT, imp = self, "Cannot attach GstAnalytics metadata: {e}");
        }
        if settings.post_messages {
            self.post_detections(frame_no, buf.pts(), &dets, infer_ms);
        }
        Ok(gst::FlowSuccess::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_and_reject_garbage() {
        assert_eq!(parse_classes("1,3, 17").unwrap(), vec![1, 3, 17]);
        assert!(parse_classes("").unwrap().is_empty());
        assert!(parse_classes("1,person").is_err());
    }
}
