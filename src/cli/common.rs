//! What the subcommands share: the model arguments, detector options, exit statuses.

use std::path::PathBuf;

use effdet::postprocess::PostprocessConfig;
use effdet::{BackendKind, Detector, DetectorOptions, Error};

/// Exit status for errors in the weights file (missing, corrupt, wrong tensors).
pub const EXIT_WEIGHTS: u8 = 3;
/// Exit status for an unreadable, corrupt or unsupported image.
pub const EXIT_IMAGE: u8 = 4;
/// Exit status for anything else that went wrong at run time.
pub const EXIT_OTHER: u8 = 1;
/// Exit status for invalid arguments (clap uses the same for syntax errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit status for unusable annotations (training data).
pub const EXIT_DATA: u8 = 5;

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Weights: effdet `tf_efficientdet_d0` state_dict as safetensors (f32, f16 or bf16).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Compute engine: auto (the CPU until the CUDA engine is validated on a GPU), cpu, or cuda
    /// (the CUDA FP16 engine; says why where it cannot run).
    #[arg(long, default_value = "auto", value_name = "NAME")]
    pub backend: String,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Network input size (a multiple of 128). Default: the size the model was trained at (its
    /// `effdet.image_size` metadata; 512 for D0 as released).
    #[arg(long, value_name = "S")]
    pub size: Option<usize>,
}

pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(
            Error::WeightsFormat { .. }
            | Error::MissingTensor { .. }
            | Error::UnexpectedTensors { .. }
            | Error::ShapeMismatch { .. }
            | Error::UnsupportedDtype { .. },
        ) => EXIT_WEIGHTS,
        Some(Error::Image { .. } | Error::InvalidFrame(_)) => EXIT_IMAGE,
        // Images map their read errors to Error::Image, so a plain I/O error is the weights file.
        Some(Error::Io { .. }) => EXIT_WEIGHTS,
        Some(Error::InvalidArgument(_)) => EXIT_USAGE,
        Some(Error::Annotations { .. }) => EXIT_DATA,
        _ => EXIT_OTHER,
    }
}

pub fn options(
    m: &ModelArgs,
    post: PostprocessConfig,
    labels: Option<PathBuf>,
) -> anyhow::Result<DetectorOptions> {
    Ok(DetectorOptions {
        backend: m.backend.parse::<BackendKind>()?,
        threads: m.threads,
        postprocess: post,
        labels,
        input_size: m.size,
        ..DetectorOptions::default()
    })
}

pub fn load_detector(m: &ModelArgs, opts: DetectorOptions) -> anyhow::Result<Detector> {
    // Keep the library error as the root so exit_code() can classify it.
    Ok(Detector::new(&m.weights, opts)?)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn effdet_threads(m: &ModelArgs) -> usize {
    if m.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        m.threads
    }
}

/// A deterministic 640x480 test frame with structure (gradients and blocks), so timings are not
/// taken on an all-zero input.
pub fn synthetic_frame() -> (usize, usize, Vec<u8>) {
    let (w, h) = (640usize, 480usize);
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            let block = ((x / 80) + (y / 60)) % 3;
            rgb[i] = (x * 255 / w) as u8;
            rgb[i + 1] = (y * 255 / h) as u8;
            rgb[i + 2] = [40u8, 140, 240][block];
        }
    }
    (w, h, rgb)
}

/// The training network of `m.weights` (class count from the weights, input size from
/// `--size`, else the weights' metadata), and that input size.
pub fn train_net(m: &ModelArgs) -> anyhow::Result<(effdet::train::model::TrainNet, usize)> {
    let store = effdet::model::WeightStore::open(&m.weights)?;
    let config = effdet::detector::config_for_weights(
        &store,
        effdet::model::EfficientDetConfig::d0(),
        m.size,
    )?;
    let size = config.image_size.0;
    Ok((
        effdet::train::model::TrainNet::from_store(&store, config)?,
        size,
    ))
}
