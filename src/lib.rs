//! effdet: EfficientDet object detection for streaming video.
//!
//! The crate is layered so each piece can be swapped without touching the others:
//!
//! - [`frame`]: borrowed, validated views of raw video frames (RGB, BGRx, NV12, I420, ...).
//! - [`preprocess`]: frame -> letterboxed, normalised network input (effdet's `ResizePad`).
//! - [`compute`]: the tensor operations the network needs, behind the [`compute::Backend`]
//!   trait; [`compute::cpu`] is the f32 reference and CPU engine.
//! - [`model`]: the EfficientDet network (EfficientNet backbone, BiFPN, heads) written once
//!   against `Backend`, its typed config, and weight loading from effdet-named safetensors.
//! - [`postprocess`]: anchors, top-k, box decoding, clipping and NMS (effdet's `DetBenchPredict`).
//! - [`detector`]: the user-facing [`Detector`] tying it all together.
//!
//! See `docs/ARCHITECTURE.md` for how a frame flows through these modules.

pub mod compute;
pub mod detection;
pub mod detector;
pub mod error;
pub mod frame;
pub mod image_io;
pub mod labels;
pub mod model;
pub mod postprocess;
pub mod preprocess;

pub use detection::Detection;
pub use detector::{BackendKind, Detector, DetectorOptions};

pub use error::{Error, Result};
pub use frame::{Frame, PixelFormat, YuvMatrix, YuvRange};
