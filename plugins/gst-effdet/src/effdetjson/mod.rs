//! `effdetjson`: writes the detections of every frame as one JSON line (JSON Lines).
//!
//! A pass-through filter: buffers are forwarded untouched (no copy); for each one it writes
//!
//! ```json
//! {"frame":0,"pts":0,"width":640,"height":480,"detections":[{"x1":..,"y1":..,"x2":..,"y2":..,"score":..,"class_id":..,"label":".."}]}
//! ```
//!
//! `frame` counts buffers from 0 since the element started, `pts` is in nanoseconds (`null`
//! when the buffer has none), `width`/`height` come from the negotiated caps and `detections`
//! are the buffer's region-of-interest metas read through [`crate::meta::read`], with the same
//! fields in the same order as `effdet detect --json`. A ROI meta from another element that has
//! no `detection` parameter appears with its integer rectangle, `"score":null` and
//! `"class_id":0`. Numbers that are exactly `f32` values (everything `effdet` attaches) are
//! printed in their shortest `f32` form, so they read the same as the CLI's output.
//!
//! Properties: `location` (file to write; default none = standard output, which is
//! line-buffered; a file is block-buffered and flushed at EOS and when the element stops).
//!
//! ```sh
//! gst-launch-1.0 -e videotestsrc num-buffers=30 ! videoconvert \
//!     ! effdet model=tests/fixtures/golden/weights_f16.safetensors \
//!     ! effdetjson location=detections.jsonl ! fakesink
//! # Without a model (every line has an empty "detections" array):
//! gst-launch-1.0 -q videotestsrc num-buffers=5 ! effdetjson ! fakesink
//! ```

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    /// The `effdetjson` element; see the module documentation.
    pub struct EffdetJson(ObjectSubclass<imp::EffdetJson>)
        @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Registers `effdetjson` with `plugin`.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "effdetjson",
        gst::Rank::NONE,
        EffdetJson::static_type(),
    )
}
