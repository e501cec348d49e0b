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
//! - [`eval`]: COCO bbox metrics (AP, AR), exactly as pycocotools' `COCOeval`.
//!
//! See `docs/ARCHITECTURE.md` for how a frame flows through these modules.
//!
//! ```no_run
//! use effdet::{Detector, DetectorOptions, Frame, PixelFormat};
//!
//! # fn main() -> effdet::Result<()> {
//! let detector = Detector::new("models/tf_efficientdet_d0.safetensors", DetectorOptions::default())?;
//! let (width, height) = (640, 480);
//! let rgb = vec![0u8; width * height * 3];
//! let frame = Frame::packed(PixelFormat::Rgb, width, height, &rgb)?;
//! for d in detector.detect(&frame)? {
//!     println!("{} {:.2} [{}, {}, {}, {}]", d.label, d.score, d.x1, d.y1, d.x2, d.y2);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Frames are validated when built, so a buffer shorter than its description is an error:
//!
//! ```
//! use effdet::{Error, Frame, PixelFormat};
//!
//! let nv12 = vec![0u8; 64 * 48 * 3 / 2];
//! assert!(Frame::packed(PixelFormat::Nv12, 64, 48, &nv12).is_ok());
//! let short = &nv12[..1000];
//! assert!(matches!(Frame::packed(PixelFormat::Nv12, 64, 48, short), Err(Error::InvalidFrame(_))));
//! ```

pub mod compute;
pub mod detection;
pub mod detector;
pub mod error;
pub mod eval;
pub mod frame;
pub mod image_io;
pub mod labels;
pub mod model;
pub mod onnx;
pub mod postprocess;
pub mod preprocess;
pub mod rng;
pub mod synth;
pub mod train;

pub use detection::Detection;
pub use detector::{BackendKind, Detector, DetectorOptions};

pub use error::{Error, Result};
pub use frame::{Frame, PixelFormat, YuvMatrix, YuvRange};
