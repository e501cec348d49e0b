//! The `effdet` element: EfficientDet object detection on every video frame.
//!
//! A video filter that passes frames through unchanged and attaches one
//! `GstVideoRegionOfInterestMeta` per detection (see [`crate::meta`] for the convention).
//!
//! ```sh
//! gst-launch-1.0 filesrc location=in.mp4 ! decodebin ! videoconvert ! \
//!     effdet model=models/tf_efficientdet_d0.safetensors score-threshold=0.4 ! \
//!     effdetoverlay ! videoconvert ! autovideosink
//! ```

use gst::glib;
use gst::prelude::*;

mod imp;

/// Which engine runs the network (property `backend`).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstEffdetBackend")]
pub enum Backend {
    #[enum_value(
        name = "Auto: the best engine available (falls back to the CPU)",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(name = "CPU: the f32 CPU engine", nick = "cpu")]
    Cpu = 1,
    #[enum_value(
        name = "CUDA: the FP16 CUDA engine (needs an NVIDIA GPU)",
        nick = "cuda"
    )]
    Cuda = 2,
    #[enum_value(
        name = "TensorRT: the TensorRT FP16 engine (needs TensorRT)",
        nick = "tensorrt"
    )]
    Tensorrt = 3,
}

impl Backend {
    /// The engine name the `effdet` library understands.
    pub(crate) fn library_name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Tensorrt => "tensorrt",
        }
    }
}

glib::wrapper! {
    /// The `effdet` element.
    pub struct Effdet(ObjectSubclass<imp::Effdet>)
        @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Registers `effdet` with the plugin.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Backend::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "effdet",
        gst::Rank::NONE,
        Effdet::static_type(),
    )
}
