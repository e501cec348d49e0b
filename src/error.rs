//! Typed errors for the whole library: every failure a user can cause names what was wrong.

use std::path::PathBuf;

/// The library's error type. Variants carry enough context (file, tensor key, shapes) that the
/// message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The weights file is not a readable safetensors file (truncated, wrong format, bad header).
    #[error("{path}: not a valid safetensors weights file: {reason}")]
    WeightsFormat { path: PathBuf, reason: String },

    /// A tensor the model needs is absent from the weights file.
    #[error("weights: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },

    /// The weights file holds tensors the model does not use (usually: a different model variant).
    #[error(
        "weights: {count} unexpected tensor(s), e.g. `{first}` with shape {shape:?} (is this a tf_efficientdet_d0 state_dict?)"
    )]
    UnexpectedTensors {
        count: usize,
        first: String,
        shape: Vec<usize>,
    },

    /// A tensor has the wrong shape.
    #[error("weights: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// A tensor has a dtype the loader does not read.
    #[error("weights: tensor `{key}` has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype { key: String, dtype: String },

    /// A video frame's description does not fit its data (size, strides, plane lengths).
    #[error("invalid frame: {0}")]
    InvalidFrame(String),

    /// An image file could not be decoded, or has zero size.
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },

    /// A label file is unreadable or malformed.
    #[error("label file {path}: {reason}")]
    Labels { path: PathBuf, reason: String },

    /// A configuration value or argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The requested compute backend cannot run on this machine.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },

    /// A CUDA call failed (driver, NVRTC, cuDNN, ...): which operation and what CUDA said.
    #[error("CUDA error in {op}: {reason}")]
    Gpu { op: String, reason: String },

    /// The GPU ran out of memory; nothing was lost (the caller may retry smaller).
    #[error("GPU out of memory in {op}: {detail}")]
    GpuOutOfMemory { op: String, detail: String },

    /// A CUDA kernel source failed to compile, or compiled with warnings.
    #[error("kernel {kernel} does not compile cleanly for {arch}:\n{log}")]
    KernelCompile {
        kernel: String,
        arch: String,
        log: String,
    },

    /// An internal shape inconsistency between operations: a bug, reported instead of panicking.
    #[error("internal shape error in {op}: {detail}")]
    Shape { op: &'static str, detail: String },

    /// A file could not be written (disk full, permissions, missing directory).
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A data-parallel collective or the launch environment failed.
    #[error("distributed training: {0}")]
    Distributed(#[from] crate::train::dist::DistError),

    /// A training dataset or its annotations cannot be used.
    #[error("annotations {path}: {reason}")]
    Annotations { path: PathBuf, reason: String },
}

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
