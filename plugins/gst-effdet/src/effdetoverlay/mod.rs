//! The `effdetoverlay` element: draws region-of-interest metas into video frames as labelled
//! boxes.
//!
//! An in-place video filter. For every `GstVideoRegionOfInterestMeta` on a buffer it draws the
//! box outline and, above the box's top-left corner, a filled label bar reading `label 0.87`
//! (class name and confidence with two decimals). Metas written by `effdet` (with the
//! `detection` parameter structure, see [`crate::meta`]) are drawn at their exact box, in the
//! stable colour of their class (`effdet::image_io::class_colour`); ROI metas from any other
//! element are drawn with their `roi_type` as the label, no confidence, and a colour hashed from
//! that label. Buffers without ROI metas pass through untouched.
//!
//! Formats: RGB, RGBA, RGBx, BGRx, BGRA (colours written in the format's byte order; alpha set
//! to 255 where drawn, padding bytes left alone) and NV12, I420 (colours converted to BT.601
//! limited-range YUV; chroma samples touched by a line take the line's chroma).
//!
//! Boxes are clipped to the frame; the label bar stays inside the frame and moves inside the
//! box when there is no room above it. Properties (`line-width`, `text-scale`,
//! `show-confidence`, `show-labels`) can change while playing.
//!
//! ```sh
//! gst-launch-1.0 videotestsrc ! video/x-raw,format=NV12,width=1280,height=720 ! \
//!     effdet model=models/tf_efficientdet_d0.safetensors ! \
//!     effdetoverlay line-width=4 text-scale=3 ! videoconvert ! autovideosink
//! ```

use gst::glib;
use gst::prelude::*;

mod draw;
mod font;
mod imp;

glib::wrapper! {
    /// The `effdetoverlay` element.
    pub struct EffdetOverlay(ObjectSubclass<imp::EffdetOverlay>)
        @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Registers `effdetoverlay` with the plugin.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "effdetoverlay",
        gst::Rank::NONE,
        EffdetOverlay::static_type(),
    )
}
